"""FedMe's automatic model-structure tuning, without Flower: the initial choice and adoption.

Two decisions make FedMe pick architectures by itself:

* **local-best** (the initial architecture): each client trains every candidate alone, with early
  stopping on its validation split, and keeps the candidate with the highest validation accuracy
  (the paper's rule; ties go to the lower validation loss, then to the earlier candidate).
  ``spread`` instead gives every candidate an equal share of the clients, so the comparisons
  start with every architecture present (with ``fedme.adoption-warmup``: docs/fedme-tuning.md).
* **adoption** (every round): after deep mutual learning the client compares its personal model
  with the exchange model on validation data and may adopt the exchange model, architecture
  included. The paper adopts when the exchange model's validation loss is strictly lower
  (``fedme.adoption-rule = "loss"``). That rule lets the smallest model take over in the first
  rounds: it learns fastest, so it has the lowest loss after two epochs, although a larger model
  ends better (docs/fedme-tuning.md, "Why tuning drifted to the smallest model"). The other
  rules are named options.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedapps import training
from fedapps.config import ADOPTION_RULES, RunConfig
from fedapps.data.federated import Split
from fedapps.training import EvalResult, Optim


@dataclass(frozen=True)
class AdoptionRule:
    """When a client replaces its personal model by the exchange model.

    ``margin``: how much better the exchange model must be (loss units for ``loss``, a fraction
    of the validation set for ``accuracy``). ``warmup``: rounds ``1..warmup`` allow adopting a
    model of the client's own architecture only, so structures are compared once the models
    are trained rather than by how fast they learn from scratch. The config gives it as a share
    of the run (``fedme.adoption-warmup``), so it scales with ``num-rounds``.
    """

    rule: str = "loss"
    margin: float = 0.0
    warmup: int = 0

    @classmethod
    def of(cls, config: RunConfig) -> AdoptionRule:
        return cls(config.adoption_rule, config.adoption_margin,
                   warmup_rounds(config.adoption_warmup, config.num_rounds))

    def __post_init__(self) -> None:
        if self.rule not in ADOPTION_RULES:
            raise ValueError(
                f"fedme.adoption-rule='{self.rule}' is not known; allowed: "
                f"{', '.join(ADOPTION_RULES)}"
            )

    def adopt(
        self, personal: EvalResult, exchange: EvalResult, same_arch: bool, server_round: int
    ) -> bool:
        """The client's decision: the exchange model is better by more than the margin.

        Ties keep the personal model. ``population`` decides like the paper here; the server
        then lets a structure change through only on the population's evidence
        (:meth:`allows_structure_change`).
        """
        if not same_arch and server_round <= self.warmup:
            return False
        if self.rule == "accuracy":
            return exchange.accuracy > personal.accuracy + self.margin
        if self.rule == "population":
            return exchange.loss < personal.loss
        return exchange.loss < personal.loss - self.margin

    def allows_structure_change(
        self, evidence: Mapping[Pair, float], current: str, other: str
    ) -> bool:
        """The server's check of a client's adoption: always, except for ``population``."""
        if self.rule != "population" or current == other:
            return True
        gain = structure_gain(evidence, current, other)
        return gain is not None and gain > self.margin


def warmup_rounds(share: float, num_rounds: int) -> int:
    """Rounds ``1..N`` of a warm-up that takes ``share`` of a ``num_rounds`` run (rounded)."""
    return round(share * num_rounds)


# Weight of the older evidence when a round brings new comparisons (about 5 rounds' memory).
EVIDENCE_DECAY = 0.8

Pair = tuple[str, str]  # two architecture names, sorted


def pair_gains(comparisons: Iterable[tuple[str, str, float]]) -> dict[Pair, float]:
    """One round's population evidence: for architectures a < b, quality(b) - quality(a).

    ``comparisons`` are (personal arch, exchange arch, exchange minus personal validation
    accuracy) from every client. A client's own model has a home advantage (it was trained on
    that client's data for many rounds; the exchange model for two epochs), whatever its
    architecture; the mean gain of a -> b minus that of b -> a cancels it:
    (d(a->b) - d(b->a)) / 2. Pairs seen in only one direction give no evidence.
    """
    seen: dict[tuple[str, str], list[float]] = {}
    for personal, exchange, gain in comparisons:
        if personal != exchange:
            seen.setdefault((personal, exchange), []).append(gain)
    gains = {}
    for (a, b), forward in seen.items():
        backward = seen.get((b, a))
        if a < b and backward:
            gains[(a, b)] = (sum(forward) / len(forward) - sum(backward) / len(backward)) / 2
    return gains


def smooth_evidence(
    evidence: Mapping[Pair, float], gains: Mapping[Pair, float]
) -> dict[Pair, float]:
    """Exponential moving average over rounds; a pair's first evidence is taken as it is."""
    merged = dict(evidence)
    for pair, gain in gains.items():
        merged[pair] = EVIDENCE_DECAY * merged[pair] + (1 - EVIDENCE_DECAY) * gain \
            if pair in merged else gain
    return merged


def structure_gain(evidence: Mapping[Pair, float], current: str, other: str) -> float | None:
    """Estimated quality(other) - quality(current), or None without evidence."""
    if current < other:
        return evidence.get((current, other))
    value = evidence.get((other, current))
    return None if value is None else -value


@dataclass(frozen=True)
class CandidateResult:
    """A candidate's best validation result under local-only training with early stopping."""

    name: str
    accuracy: float
    loss: float
    best_epoch: int


def best_candidate(results: Sequence[CandidateResult]) -> CandidateResult:
    """Highest validation accuracy; ties: lower validation loss, then the earlier candidate."""
    if not results:
        raise ValueError("no candidate architectures to choose from")
    return min(enumerate(results), key=lambda item: (-item[1].accuracy, item[1].loss, item[0]))[1]


def pooled_choice(
    results: Mapping[int, Sequence[CandidateResult]], val_sizes: Mapping[int, int],
    pseudo_count: float,
) -> dict[int, str]:
    """Each client's local-best, its validation accuracies shrunk toward the population's.

    A client with n validation samples scores candidate c as
    (n * own accuracy + m * population accuracy) / (n + m), the population accuracy being the
    validation-size-weighted mean over clients (m = ``pseudo_count``). With m = 0 this is the
    paper's per-client choice; with n small (10 samples: one sample is 10 points) a client's own
    figures are mostly noise, and the shrinkage keeps it from choosing by luck.
    """
    total = sum(val_sizes[c] for c in results) or 1
    names = [r.name for r in next(iter(results.values()), [])]
    population = {
        name: sum(val_sizes[c] * r.accuracy for c, rs in results.items() for r in rs
                  if r.name == name) / total
        for name in names
    }
    choice = {}
    for client, own in results.items():
        n = val_sizes[client]
        weight = (n + pseudo_count) or 1.0
        shrunk = [dataclasses.replace(
            r, accuracy=(n * r.accuracy + pseudo_count * population[r.name]) / weight)
            for r in own]
        choice[client] = best_candidate(shrunk).name
    return choice


def spread_choice(pids: Sequence[int], candidates: Sequence[str], seed: int) -> dict[int, str]:
    """Every candidate to an equal share of the clients (seeded order; shares differ by <= 1).

    Adoption can only move clients to architectures some client holds: a population that
    starts without the best one never finds it (docs/fedme-tuning.md).
    """
    order = np.random.default_rng([seed, 13]).permutation(list(pids))
    return {int(pid): candidates[i % len(candidates)] for i, pid in enumerate(order)}


def train_with_early_stopping(
    model: nn.Module,
    data: Split,
    val: Split,
    max_epochs: int,
    patience: int,
    optim: Optim,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[EvalResult, int, int]:
    """Local-only training; returns (best validation result, its epoch, epochs trained).

    The best epoch has the highest validation accuracy (ties: lower loss); training stops after
    ``patience`` epochs without a new best. The model is left as trained (the caller only needs
    the figures: FedMe starts every client's model afresh).
    """
    best, best_epoch, epoch = None, 0, 0
    for epoch in range(1, max_epochs + 1):
        training.train(model, data.x, data.y, 1, optim, generator, device)
        result = training.evaluate(model, val.x, val.y, device)
        if best is None or (result.accuracy, -result.loss) > (best.accuracy, -best.loss):
            best, best_epoch = result, epoch
        elif epoch - best_epoch >= patience:
            break
    if best is None:  # max_epochs == 0: the untrained model is all there is to judge
        best = training.evaluate(model, val.x, val.y, device)
    return best, best_epoch, epoch


def choose_local_best(
    candidates: Sequence[str],
    build: Callable[[str], nn.Module],
    data: Split,
    val: Split,
    max_epochs: int,
    patience: int,
    optim: Optim,
    generator_of: Callable[[str], torch.Generator],
    device: torch.device,
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[str, list[CandidateResult]]:
    """The paper's initial architecture: every candidate trained alone, the best kept."""
    results = []
    for name in candidates:
        started = time.perf_counter()
        best, best_epoch, epochs = train_with_early_stopping(
            build(name), data, val, max_epochs, patience, optim, generator_of(name), device
        )
        results.append(CandidateResult(name, best.accuracy, best.loss, best_epoch))
        progress(f"{name}: val accuracy {best.accuracy:.4f} (loss {best.loss:.4f}) at epoch "
                 f"{best_epoch}/{epochs} in {time.perf_counter() - started:.1f}s")
    return best_candidate(results).name, results
