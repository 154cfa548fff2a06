"""HypCluster (Mansour et al., 2020): k global models; each client trains the one that fits it best.

Per round every client receives all k models, picks the one with the lowest loss on its own
train split (:func:`choose_model`, the client half below), trains only that one
for ``local-epochs`` and returns it; the server averages each model over the clients that chose
it (weighted by train-set size, as FedAvg); a model nobody chose stays as it was.

Choices, following the FedMe paper where it speaks: k = 2 (``hypcluster.k``; the paper's value);
the k models start from different seeded initialisations (identical ones would never separate);
the assignment uses the TRAIN split (the data HypCluster's objective is defined on). The per-round
curve and the final assignment come from an evaluate round after aggregation, where each client
chooses again among the aggregated models and tests its choice. The FedMe paper fine-tunes
HypCluster, so the reported accuracy is after fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from torch import nn

from fedapps import training
from fedapps.config import RunConfig
from fedapps.protocol import engine
from fedapps.protocol.engine import ResumableStrategy, run_rounds
from fedapps.protocol.evaluation import final_evaluation, per_client
from fedapps.protocol.messages import check_state, config_record, from_arrays, new_model
from fedapps.protocol.method import Method
from fedapps.protocol.node import (
    eval_metrics,
    generator,
    injected_fault,
    optim_of,
    outgoing,
    reply,
    setup,
)
from fedapps.protocol.results import RunRecorder

State = dict[str, torch.Tensor]


def aggregate_clusters(models: list[State], updates: Iterable[tuple[int, State, float]]
                       ) -> list[State]:
    """Average each model with the updates ``(cluster, state, weight)`` of the clients that
    chose it; models nobody chose are returned unchanged."""
    chosen: dict[int, list[tuple[State, float]]] = {}
    for cluster, state, weight in updates:
        chosen.setdefault(cluster, []).append((state, weight))
    return [
        training.average_states([s for s, _ in chosen[j]], [w for _, w in chosen[j]])
        if j in chosen else model
        for j, model in enumerate(models)
    ]


class HypCluster(ResumableStrategy):
    def __init__(self, config: RunConfig, nodes: Mapping[int, int]) -> None:
        self.config = config
        self.node_of = dict(nodes)
        self.models: list[State] = []
        for j in range(config.hypcluster_k):
            torch.manual_seed(config.seed * 1000 + j)
            self.models.append(new_model(config.model, config).state_dict())
        self.assignment: dict[int, int] = {}
        self.rng = np.random.default_rng(config.seed)
        self.record: dict[str, Any] = {}

    def _messages(self, server_round: int, message_type: str, pids: list[int]) -> list[Message]:
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
                dst_node_id=self.node_of[pid],
            )
            for pid in pids
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        chosen = engine.participants(sorted(self.node_of), self.config, self.rng)
        return self._messages(server_round, f"{MessageType.TRAIN}.hypcluster", chosen)

    def _unpack(self, pid: int, reply: Message) -> tuple[int, State, float, float]:
        metrics = reply.content["metrics"]
        cluster = int(metrics["cluster"])
        if not 0 <= cluster < len(self.models):
            raise ValueError(f"cluster {cluster} out of range")
        state = reply.content["arrays"].to_torch_state_dict()
        check_state(self.config.model, state, self.models[cluster])
        return cluster, state, float(metrics["num-examples"]), float(metrics["train-loss"])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = engine.screen(server_round, replies, self.node_of, self._unpack,
                                 self.config.min_replies)
        self.record = screened.record
        if screened.skipped:
            return None, None
        accepted = screened.accepted
        self.models = aggregate_clusters(
            self.models, ((cluster, state, weight) for cluster, state, weight, _
                          in accepted.values()))
        self.assignment.update({pid: update[0] for pid, update in accepted.items()})
        self.record.update({
            "train-clusters": {str(p): c for p, c in sorted(self.assignment.items())},
            "train-loss": float(np.mean([update[3] for update in accepted.values()])),
        })
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round % self.config.eval_every and server_round != self.config.num_rounds:
            return []
        return self._messages(server_round, f"{MessageType.EVALUATE}.hypcluster",
                              sorted(self.node_of))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        accuracies = per_client(replies, "test-accuracy")
        self.assignment.update({pid: int(c) for pid, c in per_client(replies, "cluster").items()})
        if not accuracies:
            return None
        values = list(accuracies.values())
        self.record.update({
            "accuracy": float(np.mean(values)),
            "accuracy-sd": float(np.std(values)),
            "client-accuracy": {str(p): a for p, a in sorted(accuracies.items())},
            "clusters": {str(p): c for p, c in sorted(self.assignment.items())},
            "cluster-sizes": np.bincount(list(self.assignment.values()),
                                         minlength=len(self.models)).tolist(),
        })
        return MetricRecord({"accuracy": self.record["accuracy"]})

    def round_record(self) -> dict[str, Any]:
        return self.record

    def state_dict(self) -> dict[str, Any]:
        return {"models": self.models, "assignment": dict(self.assignment),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.models = list(state["models"])
        self.assignment = dict(state["assignment"])
        self.rng.bit_generator.state = state["rng"]

    def final_models(self) -> dict[int, tuple[str, ArrayRecord]]:
        """Each client's latest choice among the final models (model 0 if it never answered)."""
        return {pid: (self.config.model, ArrayRecord(self.models[self.assignment.get(pid, 0)]))
                for pid in sorted(self.node_of)}


def run_hypcluster(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
                   recorder: RunRecorder) -> dict[str, Any]:
    strategy = HypCluster(config, {p: c["node"] for p, c in clients.items()})
    run_rounds(strategy, grid, config, recorder)
    return {**final_evaluation(grid, config, clients, strategy.final_models()),
            "reported": "after-finetune",
            "clusters": {str(p): c for p, c in sorted(strategy.assignment.items())}}


# ------------------------------------------------------------------------------ client half


def choose_model(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                 device: torch.device) -> tuple[int, list[float]]:
    """HypCluster's assignment: the model with the lowest loss on ``(x, y)`` (ties: first)."""
    losses = [training.evaluate(model, x, y, device).loss for model in models]
    return min(range(len(losses)), key=losses.__getitem__), losses


def _received_models(msg: Message, config: RunConfig) -> list[nn.Module]:
    k = int(msg.content["hypcluster"]["k"])
    return [from_arrays(config.model, msg.content[f"model-{j}"], config) for j in range(k)]


def train_hypcluster(msg: Message, context: Context) -> Message:
    """Pick the global model with the lowest loss on the local train split, train only that."""
    config, pid, data, device = setup(msg, context)
    server_round = int(msg.content["hypcluster"]["server-round"])
    fault = injected_fault(config, pid, server_round)
    models = _received_models(msg, config)
    chosen, _ = choose_model(models, data.train.x, data.train.y, device)
    loss = training.train(models[chosen], data.train.x, data.train.y, config.local_epochs,
                          optim_of(config), generator(config, "hypcluster", server_round, pid),
                          device)
    return reply(msg, {"partition-id": pid, "num-examples": len(data.train), "cluster": chosen,
                       "train-loss": loss}, arrays=outgoing(models[chosen], fault))


def evaluate_hypcluster(msg: Message, context: Context) -> Message:
    """Test the model this client would choose now (same rule as in training)."""
    config, pid, data, device = setup(msg, context)
    models = _received_models(msg, config)
    chosen, _ = choose_model(models, data.train.x, data.train.y, device)
    result = training.evaluate(models[chosen], data.test.x, data.test.y, device)
    return reply(msg, {"partition-id": pid, "num-examples": result.num_examples,
                       "cluster": chosen, **eval_metrics("test", result)})


METHOD = Method(run=run_hypcluster, handlers={("train", "hypcluster"): train_hypcluster,
                                              ("evaluate", "hypcluster"): evaluate_hypcluster})
