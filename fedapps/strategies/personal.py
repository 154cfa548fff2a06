"""A shared model plus one personalized model per client: the server half of FML, pFedMe, MAPPER.

Each round every client gets the shared model (``arrays``) and, after round 1, its own ``state``
(FML: its private model; MAPPER: its local parameters and mixing weight). It replies with its
update of the shared model, its new state, its personalized model and that model's test
accuracy. The server averages the shared updates weighted by train-set size (as FedAvg), mixed
into the old shared model by ``mix`` (pFedMe's beta; 1 = plain averaging), and keeps each
client's state and personalized model.

Keeping the clients' private state on the server is a convenience that keeps ClientApps stateless
(a restarted SuperNode loses nothing); the server never reads or averages it. The FedMe paper's
server holds every personalized model too. The per-round curve is the mean test accuracy of the
personalized models, reported by the clients in their train replies (no separate evaluate round).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedapps.config import RunConfig
from fedapps.messages import (
    BadModelError,
    check_state,
    config_record,
    in_partition_order,
    new_model,
)
from fedapps.strategies.fedme import RoundLogger, average_states

log = logging.getLogger(__name__)


class SharedAndPersonal(Strategy):
    """Sends message type ``train.<action>`` to every client each round; see the module doc."""

    def __init__(self, config: RunConfig, nodes: Mapping[int, int], action: str,
                 on_round: RoundLogger, mix: float = 1.0) -> None:
        self.config = config
        self.node_of = dict(nodes)
        self.action = action
        self.on_round = on_round
        self.mix = mix
        torch.manual_seed(config.seed)
        self.shared = new_model(config.model, config).state_dict()
        self.states: dict[int, ArrayRecord] = {}
        self.personal: dict[int, ArrayRecord] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = []
        for pid, node in sorted(self.node_of.items()):
            content = RecordDict({
                "config": config_record(self.config, **{"server-round": server_round}),
                "arrays": ArrayRecord(self.shared),
            })
            if pid in self.states:
                content["state"] = self.states[pid]
            messages.append(Message(content=content, dst_node_id=node,
                                    message_type=f"{MessageType.TRAIN}.{self.action}"))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        pid_of = {node: pid for pid, node in self.node_of.items()}
        updates, sizes, metrics, rejected = [], [], {}, {}
        for reply in in_partition_order(replies):
            pid = pid_of.get(reply.metadata.src_node_id)
            if pid is None:
                continue
            if reply.has_error():
                rejected[pid] = reply.error.reason
                log.warning("round %d: client %d failed: %s", server_round, pid,
                            reply.error.reason)
                continue
            content = reply.content
            update = content["arrays"].to_torch_state_dict()
            try:
                check_state(self.config.model, update, self.shared)
                check_state(self.config.model, content["personal"].to_torch_state_dict(),
                            self.shared)
            except BadModelError as error:
                rejected[pid] = str(error)
                log.warning("round %d: reply of client %d rejected: %s", server_round, pid, error)
                continue
            updates.append(update)
            sizes.append(float(content["metrics"]["num-examples"]))
            self.personal[pid] = content["personal"]
            if "state" in content.array_records:
                self.states[pid] = content["state"]
            metrics[pid] = dict(content["metrics"])
        if not updates:
            raise RuntimeError(f"round {server_round}: no client replied usefully: {rejected}")
        average = average_states(updates, sizes)
        self.shared = average_states([self.shared, average], [1 - self.mix, self.mix])
        accuracies = {pid: float(m["test-accuracy"]) for pid, m in metrics.items()}
        fields: dict[str, Any] = {
            "replies": len(updates),
            "rejected": rejected,
            "train-loss": float(np.mean([m["train-loss"] for m in metrics.values()])),
            "accuracy": float(np.mean(list(accuracies.values()))),
            "accuracy-sd": float(np.std(list(accuracies.values()))),
            "client-accuracy": {str(p): a for p, a in sorted(accuracies.items())},
        }
        if all("lambda" in m for m in metrics.values()):
            fields["lambda"] = {str(p): float(m["lambda"]) for p, m in sorted(metrics.items())}
        self.on_round(server_round, **fields)
        return ArrayRecord(self.shared), MetricRecord({"accuracy": fields["accuracy"]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the train replies already carry the personalized models' test accuracy

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None

    def summary(self) -> None:
        log.info("%s: %d clients", self.action, len(self.node_of))

    def final_models(self) -> dict[int, tuple[str, ArrayRecord]]:
        """Each client's last personalized model (clients that never replied are an error)."""
        missing = sorted(set(self.node_of) - set(self.personal))
        if missing:
            raise RuntimeError(f"{self.action}: no personalized model from client(s) {missing}")
        return {pid: (self.config.model, self.personal[pid]) for pid in sorted(self.node_of)}


def run_shared_and_personal(grid: Grid, config: RunConfig, clients: Mapping[int, Mapping],
                            recorder, action: str, mix: float = 1.0) -> dict[str, Any]:
    """Train with :class:`SharedAndPersonal`, then the shared end-of-training evaluation."""
    from fedapps.server import finetune_clients, finetune_summary

    strategy = SharedAndPersonal(config, {p: c["node"] for p, c in clients.items()}, action,
                                 recorder.log_round, mix)
    strategy.start(grid, ArrayRecord(), num_rounds=config.num_rounds, timeout=config.round_timeout)
    final = strategy.final_models()
    return finetune_summary(finetune_clients(grid, config, clients, final))
