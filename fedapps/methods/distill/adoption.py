"""The adoption check of accuracy recovery: a forward-distilled model replaces the clients'
averaged one only when it is more accurate on a labelled validation split the server holds.

Why: forward distillation hands the global model's knowledge back to the clients, which helps
while the global model is ahead of the averaged one (3 IID clients) and drags the clients back
when it lags (10 non-IID clients: the global model has only learnt the averaged model's plateau,
docs/async-distill.md). Checking each offer against the model it would replace keeps the first
and refuses the second.

The validation split is ``distill.validation-fraction`` of the server's held-out labelled set,
disjoint from the test set the global model's accuracy is reported on
(:func:`.distillation.server_data`); the averaging server holds it (it runs where the
distillation server does, on the server side) and decides between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from fedapps import training
from fedapps.config import RunConfig
from fedapps.methods.distill.channel import State
from fedapps.methods.distill.distillation import server_data
from fedapps.protocol.messages import from_arrays


def better(candidate: training.EvalResult, current: training.EvalResult) -> bool:
    """Higher validation accuracy wins; at equal accuracy (e.g. both at chance) lower loss."""
    return (candidate.accuracy, -candidate.loss) > (current.accuracy, -current.loss)


@dataclass(frozen=True)
class Verdict:
    """One offer's decision and the two scores it was made on."""

    adopted: bool
    candidate: training.EvalResult
    current: training.EvalResult

    def record(self) -> dict[str, Any]:
        """The fields logged with the round (``offer`` in rounds.jsonl)."""
        return {"adopted": self.adopted,
                "candidate-accuracy": self.candidate.accuracy,
                "candidate-loss": self.candidate.loss,
                "current-accuracy": self.current.accuracy,
                "current-loss": self.current.loss}


class AdoptionCheck:
    """Scores small models on the server's validation split and judges an offer."""

    def __init__(self, config: RunConfig) -> None:
        data = server_data(config)
        self.config = config
        self.x, self.y = data.validation_x, data.validation_y
        self.device = training.resolve_device(config.device)

    def score(self, state: State) -> training.EvalResult:
        model = from_arrays(self.config.model, ArrayRecord(state), self.config)
        return training.evaluate(model, self.x, self.y, self.device)

    def __call__(self, candidate: State, current: State) -> Verdict:
        """Adopt ``candidate`` (forward-distilled) instead of ``current`` (averaged)?"""
        candidate_score, current_score = self.score(candidate), self.score(current)
        return Verdict(better(candidate_score, current_score), candidate_score, current_score)
