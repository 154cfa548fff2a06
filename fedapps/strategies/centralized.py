"""Centralized, the paper's ideal: all clients' training data pooled in one place.

Simulated inside the federation so it shares partitions, models and training code with the other
methods: the node of partition 0 trains ``model`` on every client's train split pooled
(``num-rounds * local-epochs`` epochs, the passes FedAvg makes; the epoch with the lowest pooled
validation loss is kept; client side: :func:`fedapps.baselines_client.train_centralized`). The
model is then evaluated, and fine-tuned as in the FedMe paper, on every client's own splits by
the shared end-of-training evaluation. Reported accuracy: after fine-tuning, as in the paper.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Message, MessageType, RecordDict

from fedapps.messages import config_record


def run_centralized(grid, config, clients, recorder) -> dict[str, Any]:
    from fedapps.server import ClientFailure, finetune_clients, finetune_summary

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
    return {**finetune_summary(finetune_clients(grid, config, clients, final)),
            "reported": "after-finetune"}
