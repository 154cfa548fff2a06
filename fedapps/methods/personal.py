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

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedapps import training
from fedapps.config import RunConfig
from fedapps.data.federated import ClientData
from fedapps.protocol import engine
from fedapps.protocol.engine import ResumableStrategy, run_rounds
from fedapps.protocol.evaluation import final_evaluation
from fedapps.protocol.messages import check_state, config_record, new_model, to_arrays
from fedapps.protocol.node import eval_metrics, outgoing, reply
from fedapps.protocol.results import RunRecorder


class SharedAndPersonal(ResumableStrategy):
    """Sends message type ``train.<action>`` to every client each round; see the module doc."""

    def __init__(self, config: RunConfig, nodes: Mapping[int, int], action: str,
                 mix: float = 1.0) -> None:
        self.config = config
        self.node_of = dict(nodes)
        self.action = action
        self.mix = mix
        torch.manual_seed(config.seed)
        self.shared = new_model(config.model, config).state_dict()
        self.states: dict[int, ArrayRecord] = {}
        self.personal: dict[int, ArrayRecord] = {}
        self.rng = np.random.default_rng(config.seed)
        self.record: dict[str, Any] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = []
        for pid in engine.participants(sorted(self.node_of), self.config, self.rng):
            content = RecordDict({
                "config": config_record(self.config, **{"server-round": server_round}),
                "arrays": ArrayRecord(self.shared),
            })
            if pid in self.states:
                content["state"] = self.states[pid]
            messages.append(Message(content=content, dst_node_id=self.node_of[pid],
                                    message_type=f"{MessageType.TRAIN}.{self.action}"))
        return messages

    def _unpack(self, pid: int, reply: Message) -> dict[str, Any]:
        content = reply.content
        update = content["arrays"].to_torch_state_dict()
        check_state(self.config.model, update, self.shared)
        check_state(self.config.model, content["personal"].to_torch_state_dict(), self.shared)
        return {"update": update, "personal": content["personal"],
                "state": content.array_records.get("state"),
                "metrics": dict(content["metrics"])}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = engine.screen(server_round, replies, self.node_of, self._unpack,
                                 self.config.min_replies)
        self.record = screened.record
        if screened.skipped:
            return None, None
        accepted = screened.accepted
        average = training.average_states(
            [a["update"] for a in accepted.values()],
            [float(a["metrics"]["num-examples"]) for a in accepted.values()])
        self.shared = training.average_states([self.shared, average], [1 - self.mix, self.mix])
        for pid, answer in accepted.items():
            self.personal[pid] = answer["personal"]
            if answer["state"] is not None:
                self.states[pid] = answer["state"]
        metrics = {pid: answer["metrics"] for pid, answer in accepted.items()}
        accuracies = {pid: float(m["test-accuracy"]) for pid, m in metrics.items()}
        self.record.update({
            "train-loss": float(np.mean([m["train-loss"] for m in metrics.values()])),
            "accuracy": float(np.mean(list(accuracies.values()))),
            "accuracy-sd": float(np.std(list(accuracies.values()))),
            "client-accuracy": {str(p): a for p, a in sorted(accuracies.items())},
        })
        if all("lambda" in m for m in metrics.values()):
            self.record["lambda"] = {str(p): float(m["lambda"]) for p, m in sorted(metrics.items())}
        return ArrayRecord(self.shared), MetricRecord({"accuracy": self.record["accuracy"]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the train replies already carry the personalized models' test accuracy

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None

    def round_record(self) -> dict[str, Any]:
        return self.record

    def state_dict(self) -> dict[str, Any]:
        return {"shared": self.shared, "rng": self.rng.bit_generator.state,
                "states": {p: r.to_torch_state_dict() for p, r in self.states.items()},
                "personal": {p: r.to_torch_state_dict() for p, r in self.personal.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shared = dict(state["shared"])
        self.rng.bit_generator.state = state["rng"]
        self.states = {p: ArrayRecord(s) for p, s in state["states"].items()}
        self.personal = {p: ArrayRecord(s) for p, s in state["personal"].items()}

    def final_models(self) -> dict[int, tuple[str, ArrayRecord]]:
        """Each client's last personalized model (the shared one if it never trained)."""
        return {pid: (self.config.model, self.personal.get(pid, ArrayRecord(self.shared)))
                for pid in sorted(self.node_of)}


def run_shared_and_personal(grid: Grid, config: RunConfig, clients: Mapping[int, Mapping],
                            recorder: RunRecorder, action: str, mix: float = 1.0
                            ) -> dict[str, Any]:
    """Train with :class:`SharedAndPersonal`, then the shared end-of-training evaluation."""
    strategy = SharedAndPersonal(config, {p: c["node"] for p, c in clients.items()}, action, mix)
    run_rounds(strategy, grid, config, recorder)
    return final_evaluation(grid, config, clients, strategy.final_models())


def personal_reply(msg: Message, pid: int, data: ClientData, device: torch.device,
                   shared: nn.Module, personal: nn.Module, metrics: dict[str, float],
                   state: ArrayRecord | None = None, fault: str = "") -> Message:
    """The client half's reply: shared update, personalized model (tested here), own state."""
    tested = training.evaluate(personal, data.test.x, data.test.y, device)
    records = {"arrays": outgoing(shared, fault), "personal": to_arrays(personal)}
    if state is not None:
        records["state"] = state
    return reply(msg, {"partition-id": pid, "num-examples": len(data.train), **metrics,
                       **eval_metrics("test", tested)}, **records)
