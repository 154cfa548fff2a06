"""FedAvg (the paper's FedAvg+FT baseline): Flower's own FedAvg, with checked replies.

Server half: Flower's FedAvg would average whatever arrives; on real devices a reply may carry
arrays of the wrong shape or NaNs, so replies are screened by the round engine
(:func:`fedapps.protocol.engine.screen`) against the model that was sent, and a round with fewer
than ``min-replies`` usable replies keeps the previous model. With ``privacy.mode = "central"``
the average is uniform over the clients' clipped updates and noised before anyone sees it; with
``privacy.secagg = 1`` the train phase runs through Flower's SecAgg+ (docs/privacy.md). Client
half: :func:`train_global`, a local update of the shared model (the async and sync distillation
schemes use it too).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedapps import training
from fedapps.config import RunConfig
from fedapps.privacy import NOISE_SD_KEY
from fedapps.protocol import engine
from fedapps.protocol.dp import CentralNoise, central_noise
from fedapps.protocol.engine import ResumableStrategy, run_rounds
from fedapps.protocol.evaluation import final_evaluation, per_client
from fedapps.protocol.messages import check_state, config_record, from_arrays, new_model
from fedapps.protocol.method import Method
from fedapps.protocol.node import generator, injected_fault, optim_of, outgoing, reply, setup
from fedapps.protocol.results import RunRecorder
from fedapps.protocol.secagg import secure_grid


class RecordedFedAvg(FedAvg, ResumableStrategy):
    """Flower's FedAvg whose replies are screened and whose rounds are recorded; with
    ``central_dp`` its average is :class:`fedapps.protocol.dp.CentralNoise`'s."""

    def __init__(self, node_of: Mapping[int, int], arch: str, min_replies: int = 1,
                 central_dp: CentralNoise | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.node_of = dict(node_of)
        self.arch = arch
        self.min_replies = min_replies
        self.central_dp = central_dp
        self.sent: ArrayRecord | None = None
        self.round_info: dict[str, Any] = {}
        self.record: dict[str, Any] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        if self.central_dp is not None:
            self.central_dp.ask_clients_to_clip(config)
        return self._to_clients(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._to_clients(super().configure_evaluate(server_round, arrays, config, grid))

    def _to_clients(self, messages: Iterable[Message]) -> list[Message]:
        """Flower samples every connected node; a device left out at set-up (its data did not
        fit) is connected but no client of this run."""
        ours = set(self.node_of.values())
        return [m for m in messages if m.metadata.dst_node_id in ours]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reference = self.sent.to_torch_state_dict() if self.sent is not None else {}

        def unpack(pid: int, reply: Message) -> Message:
            check_state(self.arch, reply.content["arrays"].to_torch_state_dict(), reference)
            return reply

        screened = engine.screen(server_round, replies, self.node_of, unpack, self.min_replies)
        self.round_info = screened.record
        if screened.skipped:
            self.record = dict(self.round_info)
            return None, None
        usable = list(screened.accepted.values())
        started = time.perf_counter()
        if self.central_dp is None:
            result = super().aggregate_train(server_round, usable)
        else:
            noised, self.round_info[NOISE_SD_KEY] = self.central_dp.noised_mean(server_round,
                                                                                 usable)
            result = noised, None
        self.round_info.update({
            "train-loss": float(np.mean(list(per_client(usable, "train-loss").values()))),
            "client-train-s": round(sum(per_client(usable, "train-s").values()), 4),
            "server-aggregate-s": round(time.perf_counter() - started, 4),
        })
        self.record = dict(self.round_info)
        return result

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        accuracies = per_client(replies, "test-accuracy")
        if accuracies:
            values = list(accuracies.values())
            self.record.update({
                "accuracy": float(np.mean(values)),
                "accuracy-sd": float(np.std(values)),
                "client-accuracy": {str(p): a for p, a in accuracies.items()},
            })
        return super().aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])

    def round_record(self) -> dict[str, Any]:
        return self.record

    def state_dict(self) -> dict[str, Any]:
        return {}  # the global arrays, which the round engine saves, are all FedAvg carries

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing beyond the global arrays, which the round engine restores."""


def run_fedavg(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
               recorder: RunRecorder) -> dict[str, Any]:
    # Node minimums stay low: on real devices a vanished node must not stall sampling.
    strategy = RecordedFedAvg(
        {pid: info["node"] for pid, info in clients.items()},
        arch=config.model,
        min_replies=config.min_replies,
        fraction_train=config.fraction_train,
        min_train_nodes=min(2, len(clients)),
        min_evaluate_nodes=1,
        min_available_nodes=1,
        central_dp=central_noise(config),
    )
    torch.manual_seed(config.seed)
    initial = ArrayRecord(new_model(config.model, config).state_dict())
    arrays = run_rounds(strategy, secure_grid(grid, config, clients), config, recorder, initial,
                        config_record(config), config_record(config))
    return final_evaluation(grid, config, clients, dict.fromkeys(clients, (config.model, arrays)))


def train_global(msg: Message, context: Context) -> Message:
    """FedAvg local update of the shared model."""
    config, pid, data, device = setup(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    fault = injected_fault(config, pid, server_round)
    model = from_arrays(config.model, msg.content["arrays"], config)
    started = time.perf_counter()
    loss = training.train(model, data.train.x, data.train.y, config.local_epochs,
                          optim_of(config), generator(config, "train", server_round, pid), device)
    return reply(
        msg,
        {"partition-id": pid, "num-examples": len(data.train), "train-loss": loss,
         "train-s": time.perf_counter() - started},
        arrays=outgoing(model, fault),
    )


METHOD = Method(run=run_fedavg, handlers={("train", ""): train_global})
