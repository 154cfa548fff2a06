"""Centralized, the paper's ideal: all clients' training data pooled in one place.

Simulated inside the federation so it shares partitions, models and training code with the other
methods: the node of partition 0 trains ``model`` on every client's train split pooled
(``num-rounds * local-epochs`` epochs, the passes FedAvg makes; the epoch with the lowest pooled
validation loss is kept; client half: :func:`train_centralized`). The
model is then evaluated, and fine-tuned as in the FedMe paper, on every client's own splits by
the shared end-of-training evaluation. Reported accuracy: after fine-tuning, as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedapps import training
from fedapps.config import RunConfig
from fedapps.data.federated import client_data, partition_for
from fedapps.protocol.discovery import ClientFailure
from fedapps.protocol.evaluation import final_evaluation
from fedapps.protocol.messages import config_record, new_model, to_arrays
from fedapps.protocol.method import Method
from fedapps.protocol.node import generator, optim_of, reply, setup
from fedapps.protocol.results import RunRecorder


def run_centralized(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
                    recorder: RunRecorder) -> dict[str, Any]:
    pid = min(clients)
    message = Message(content=RecordDict({"config": config_record(config)}),
                      message_type=f"{MessageType.TRAIN}.centralized",
                      dst_node_id=clients[pid]["node"])
    replies = list(grid.send_and_receive([message], timeout=config.round_timeout))
    if not replies or replies[0].has_error():
        reason = replies[0].error.reason if replies else "no reply"
        raise ClientFailure(f"centralized training on partition {pid} failed: {reason}")
    content = replies[0].content
    for number, accuracy in enumerate(content["metrics"]["round-accuracy"], start=1):
        recorder.log_round(number, accuracy=float(accuracy))
    final = dict.fromkeys(clients, (config.model, content["arrays"]))
    return {**final_evaluation(grid, config, clients, final),
            "reported": "after-finetune"}


def train_centralized(msg: Message, context: Context) -> Message:
    """Centralized (the ideal): one node trains on every client's train split pooled.

    Runs ``num-rounds * local-epochs`` epochs (the passes over the data FedAvg makes) and keeps
    the epoch with the lowest pooled validation loss. After every ``local-epochs`` epochs ("a
    round") it reports the mean over clients of each client's test accuracy, for the curve.
    """
    config, pid, _, device = setup(msg, context)
    parts = [client_data(config, p) for p in range(partition_for(config).num_clients)]
    train_x = torch.cat([part.train.x for part in parts])
    train_y = torch.cat([part.train.y for part in parts])
    val_x, val_y = torch.cat([p.val.x for p in parts]), torch.cat([p.val.y for p in parts])
    torch.manual_seed(config.seed)
    model = new_model(config.model, config)
    rng = generator(config, "centralized")
    best_loss, best_state, curve = float("inf"), None, []
    for epoch in range(1, config.num_rounds * config.local_epochs + 1):
        training.train(model, train_x, train_y, 1, optim_of(config), rng, device)
        loss = training.evaluate(model, val_x, val_y, device).loss
        if best_state is None or loss < best_loss:
            best_loss = loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch % max(config.local_epochs, 1) == 0:
            tests = [training.evaluate(model, p.test.x, p.test.y, device).accuracy for p in parts]
            curve.append(sum(tests) / len(tests))
    if best_state is not None:  # local-epochs=0 leaves the initial model
        model.load_state_dict(best_state)
    return reply(msg, {"partition-id": pid, "num-examples": len(train_y), "val-loss": best_loss,
                        "round-accuracy": curve}, arrays=to_arrays(model))


METHOD = Method(run=run_centralized, handlers={("train", "centralized"): train_centralized})
