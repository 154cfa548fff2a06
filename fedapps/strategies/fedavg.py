"""FedAvg (the paper's FedAvg+FT baseline): Flower's own FedAvg, with per-client records.

Flower's FedAvg would average whatever arrives; on real devices a reply may carry arrays of the
wrong shape or NaNs, so replies are checked against the model that was sent and rejected (and
logged) before aggregation, and a round with fewer than ``min-replies`` usable replies keeps the
previous model. Fine-tuning at the end is not a strategy concern:
:func:`fedapps.server.finetune_clients` runs it for every method.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedapps.messages import BadModelError, check_state, error_summary, in_partition_order
from fedapps.strategies.fedme import RoundLogger, per_client

log = logging.getLogger(__name__)


class RecordedFedAvg(FedAvg):
    """Flower's FedAvg that checks replies and reports each round to ``on_round``."""

    def __init__(self, on_round: RoundLogger, arch: str, min_replies: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.on_round = on_round
        self.arch = arch
        self.min_replies = min_replies
        self.sent: ArrayRecord | None = None
        self.round_info: dict[str, object] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable, rejected = self._usable(replies)
        losses = per_client(usable, "train-loss")
        self.round_info = {"replies": len(usable), "rejected": rejected}
        if len(usable) < self.min_replies:
            reason = f"{len(usable)} usable replies < min-replies={self.min_replies}"
            log.warning("round %d skipped: %s", server_round, reason)
            self.round_info["skipped"] = reason
            return None, None
        started = time.perf_counter()
        result = super().aggregate_train(server_round, usable)
        self.round_info.update({
            "train-loss": float(np.mean(list(losses.values()))),
            "client-train-s": round(sum(per_client(usable, "train-s").values()), 4),
            "server-aggregate-s": round(time.perf_counter() - started, 4),
        })
        return result

    def _usable(self, replies: Iterable[Message]) -> tuple[list[Message], dict[str, str]]:
        reference = self.sent.to_torch_state_dict() if self.sent is not None else {}
        usable, rejected = [], {}
        for reply in in_partition_order(replies):
            if reply.has_error():
                reason = error_summary(reply.error.reason)
                rejected[str(reply.metadata.src_node_id)] = f"client error: {reason}"
                continue
            try:
                check_state(self.arch, reply.content["arrays"].to_torch_state_dict(), reference)
            except (BadModelError, KeyError) as error:
                rejected[str(reply.metadata.src_node_id)] = str(error)
                log.warning("reply of node %s rejected: %s", reply.metadata.src_node_id, error)
                continue
            usable.append(reply)
        return usable, rejected

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        accuracies = per_client(replies, "test-accuracy")
        fields = dict(self.round_info)
        if accuracies:
            values = list(accuracies.values())
            fields.update({
                "accuracy": float(np.mean(values)),
                "accuracy-sd": float(np.std(values)),
                "client-accuracy": {str(p): a for p, a in accuracies.items()},
            })
        self.on_round(server_round, **fields)
        return super().aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])

    def state_dict(self) -> dict[str, object]:
        return {}  # the global arrays are all FedAvg carries between rounds

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Nothing beyond the global arrays, which the round loop restores."""
