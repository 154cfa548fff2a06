"""Time budgets and the snapshot time grid: when the servers stop and when the global model is
looked at, both counted from the same origin.

The origin is the moment the initial model is ready (the global model's first snapshot, taken
just before the distillation server publishes the initial distilled model). It is a
``time.time()`` value, so the two servers — separate processes, runs or machines — count from
the same instant; it travels with every model in the channel (meta key :data:`ORIGIN`), so a
restarted server keeps counting from it. The benchmark's time axis starts there too, so a budget
of ``T`` seconds ends every variant at ``T`` on the axis its times to target are read from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

ORIGIN = "origin"  # channel meta key: the origin as a time.time() value
BY_ROUNDS, BY_BUDGET = "num-rounds", "time-budget-s"  # why the averaging loop ended


class TimeUp(Exception):
    """Raised from a distillation step once the time budget is spent: it ends the pass there,
    so the global model's last state is the one it had when the budget ran out."""


@dataclass(frozen=True)
class TimeBudget:
    """``seconds`` of work from ``origin`` (a ``clock()`` value); 0 seconds: no budget."""

    seconds: float
    origin: float
    clock: Callable[[], float] = time.time

    def spent(self) -> bool:
        return self.seconds > 0 and self.clock() - self.origin >= self.seconds


def stopped_by(rounds_done: int, num_rounds: int) -> str:
    """Why the averaging rounds ended: only a spent budget ends them before ``num-rounds``."""
    return BY_ROUNDS if rounds_done >= num_rounds else BY_BUDGET


def grid_index(elapsed: float, every: float, growth: float) -> int:
    """Index of the newest snapshot grid point at or before ``elapsed`` seconds (0: the origin).

    Points are ``every`` seconds apart until a step of ``growth`` times the elapsed time is no
    shorter (from ``n = floor(1 / growth)`` steps on); from there each point is ``1 + growth``
    times the one before. A time to target read from the grid is then known within ``growth``
    of itself (and within ``every`` before that), with far fewer snapshots to test in a long run
    than a fixed step gives: the fixed grid's cost grows with the run, this one's with its log.
    ``every = 0``: no grid (index 0 throughout).
    """
    if not every or elapsed <= 0:
        return 0
    linear_steps = int(1 / growth) if growth else 0
    if not growth or elapsed < linear_steps * every:
        return int(elapsed // every)
    return linear_steps + int(math.log(elapsed / (linear_steps * every)) / math.log1p(growth))
