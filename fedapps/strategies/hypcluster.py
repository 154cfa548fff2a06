"""HypCluster (Mansour et al., 2020): k global models; each client trains the one that fits it best.

Per round every client receives all k models, picks the one with the lowest loss on its own
train split (client side: :func:`fedapps.baselines_client.choose_model`), trains only that one
for ``local-epochs`` and returns it; the server averages each model over the clients that chose
it (weighted by train-set size, as FedAvg); a model nobody chose stays as it was.

Choices, following the FedMe paper where it speaks: k = 2 (``hypcluster-k``; the paper's value);
the k models start from different seeded initialisations (identical ones would never separate);
the assignment uses the TRAIN split (the data HypCluster's objective is defined on). The per-round
curve and the final assignment come from an evaluate round after aggregation, where each client
chooses again among the aggregated models and tests its choice. The FedMe paper fine-tunes
HypCluster, so the reported accuracy is after fine-tuning.
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

State = dict[str, torch.Tensor]


def aggregate_clusters(models: list[State], updates: Iterable[tuple[int, State, float]]
                       ) -> list[State]:
    """Average each model with the updates ``(cluster, state, weight)`` of the clients that
    chose it; models nobody chose are returned unchanged."""
    chosen: dict[int, list[tuple[State, float]]] = {}
    for cluster, state, weight in updates:
        chosen.setdefault(cluster, []).append((state, weight))
    return [
        average_states([s for s, _ in chosen[j]], [w for _, w in chosen[j]]) if j in chosen
        else model
        for j, model in enumerate(models)
    ]


class HypCluster(Strategy):
    def __init__(self, config: RunConfig, nodes: Mapping[int, int], on_round: RoundLogger):
        self.config = config
        self.node_of = dict(nodes)
        self.on_round = on_round
        self.models: list[State] = []
        for j in range(config.hypcluster_k):
            torch.manual_seed(config.seed * 1000 + j)
            self.models.append(new_model(config.model, config).state_dict())
        self.assignment: dict[int, int] = {}
        self.round_info: dict[str, Any] = {}

    def _messages(self, server_round: int, message_type: str) -> list[Message]:
        models = {f"model-{j}": ArrayRecord(state) for j, state in enumerate(self.models)}
        return [
            Message(
                content=RecordDict({
                    "config": config_record(self.config),
                    "hypcluster": ConfigRecord({"k": len(self.models),
                                                "server-round": server_round}),
                    **models,
                }),
                message_type=message_type,
                dst_node_id=node,
            )
            for _, node in sorted(self.node_of.items())
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, f"{MessageType.TRAIN}.hypcluster")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        pid_of = {node: pid for pid, node in self.node_of.items()}
        updates, losses, rejected = [], {}, {}
        for reply in in_partition_order(replies):
            pid = pid_of.get(reply.metadata.src_node_id)
            if pid is None:
                continue
            try:
                if reply.has_error():
                    raise ValueError(f"client error: {reply.error.reason}")
                metrics = reply.content["metrics"]
                cluster = int(metrics["cluster"])
                if not 0 <= cluster < len(self.models):
                    raise ValueError(f"cluster {cluster} out of range")
                state = reply.content["arrays"].to_torch_state_dict()
                check_state(self.config.model, state, self.models[cluster])
            except (BadModelError, KeyError, ValueError) as error:
                rejected[pid] = str(error)
                log.warning("round %d: reply of client %d rejected: %s", server_round, pid, error)
                continue
            updates.append((cluster, state, float(metrics["num-examples"])))
            losses[pid] = float(metrics["train-loss"])
            self.assignment[pid] = cluster
        self.models = aggregate_clusters(self.models, updates)
        self.round_info = {
            "replies": len(updates),
            "rejected": rejected,
            "train-clusters": {str(p): c for p, c in sorted(self.assignment.items())},
        }
        if losses:
            self.round_info["train-loss"] = float(np.mean(list(losses.values())))
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round % self.config.eval_every and server_round != self.config.num_rounds:
            return []
        return self._messages(server_round, f"{MessageType.EVALUATE}.hypcluster")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        fields = dict(self.round_info)
        accuracies = {}
        for reply in in_partition_order(replies):
            if reply.has_error():
                log.warning("evaluation error: %s", reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            pid = int(metrics["partition-id"])
            accuracies[pid] = float(metrics["test-accuracy"])
            self.assignment[pid] = int(metrics["cluster"])
        if accuracies:
            values = list(accuracies.values())
            fields.update({
                "accuracy": float(np.mean(values)),
                "accuracy-sd": float(np.std(values)),
                "client-accuracy": {str(p): a for p, a in sorted(accuracies.items())},
                "clusters": {str(p): c for p, c in sorted(self.assignment.items())},
                "cluster-sizes": np.bincount(list(self.assignment.values()),
                                             minlength=len(self.models)).tolist(),
            })
        self.on_round(server_round, **fields)
        return MetricRecord({"accuracy": fields["accuracy"]}) if accuracies else None

    def summary(self) -> None:
        log.info("HypCluster: %d models, %d clients", len(self.models), len(self.node_of))

    def final_models(self) -> dict[int, tuple[str, ArrayRecord]]:
        """Each client's latest choice among the final models (model 0 if it never answered)."""
        return {pid: (self.config.model, ArrayRecord(self.models[self.assignment.get(pid, 0)]))
                for pid in sorted(self.node_of)}


def run_hypcluster(grid, config, clients, recorder) -> dict[str, Any]:
    from fedapps.server import finetune_clients, finetune_summary

    strategy = HypCluster(config, {p: c["node"] for p, c in clients.items()}, recorder.log_round)
    strategy.start(grid, ArrayRecord(), num_rounds=config.num_rounds, timeout=config.round_timeout)
    summary = finetune_summary(finetune_clients(grid, config, clients, strategy.final_models()))
    return {**summary, "reported": "after-finetune",
            "clusters": {str(p): c for p, c in sorted(strategy.assignment.items())}}
