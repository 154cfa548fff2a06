"""FedAvg (the paper's FedAvg+FT baseline): Flower's own FedAvg, with per-client records.

Fine-tuning at the end is not a strategy concern: :func:`fedapps.server.finetune_clients`
runs it for every method.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedapps.strategies.fedme import RoundLogger, per_client


class RecordedFedAvg(FedAvg):
    """Flower's FedAvg that also reports each round's per-client metrics to ``on_round``."""

    def __init__(self, on_round: RoundLogger, **kwargs) -> None:
        super().__init__(**kwargs)
        self.on_round = on_round
        self.train_losses: dict[int, float] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.train_losses = per_client(replies, "train-loss")
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        accuracies = per_client(replies, "test-accuracy")
        fields: dict[str, object] = {"replies": len(self.train_losses)}
        if self.train_losses:
            fields["train-loss"] = float(np.mean(list(self.train_losses.values())))
        if accuracies:
            values = list(accuracies.values())
            fields.update({
                "accuracy": float(np.mean(values)),
                "accuracy-sd": float(np.std(values)),
                "client-accuracy": {str(p): a for p, a in accuracies.items()},
            })
        self.on_round(server_round, **fields)
        return super().aggregate_evaluate(server_round, replies)
