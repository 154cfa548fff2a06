"""Whole asynchronous runs through Flower's simulation engine on digits (slow: ~30 s each)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from fedapps.config import RunConfig
from fedapps.distill.averaging import run_async_distillation
from fedapps.distill.distillation import GLOBAL_LOG, read_log
from fedapps.launch import app_defaults
from fedapps.results import RunRecorder, read_rounds
from fedapps.simulation import simulate

pytestmark = pytest.mark.slow

SMALL = {"dataset": "digits", "num-clients": 2, "partitioner": "iid", "model": "cnn-small",
         "global-model": "cnn2", "local-epochs": 1, "distill-epochs": 2, "distill-lr": 0.05,
         "unlabeled-size": 400}
DELAY = 3.0


def test_averaging_never_waits_for_a_slow_distillation_server():
    folder = simulate({**SMALL, "method": "async-distill", "num-rounds": 6,
                       "distill-mode": "continuous", "distill-delay": DELAY})
    rounds = read_rounds(folder)
    tests = read_log(folder / GLOBAL_LOG)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    # nobody waits: rounds follow each other much faster than one distillation pass...
    gaps = [b["time"] - a["time"] for a, b in zip(rounds, rounds[1:])]
    assert max(gaps) < DELAY, gaps
    # ...so the averaging server finished while the distillation server was still at work
    passes_before_end = [t for t in tests[1:] if t["time"] <= rounds[-1]["time"]]
    assert len(passes_before_end) < len(rounds) - 2, (rounds, tests)
    # the global model learnt from the distilled ones, and its final model is the last round's
    assert tests[-1]["version"] == 6
    assert tests[-1]["accuracy"] > tests[0]["accuracy"] + 0.15, tests
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["averaging-rounds"] == 6 and summary["global-accuracy"] == tests[-1]["accuracy"]


def distillation_run(values: dict, folder: str) -> None:
    """What the second Flower run (method async-distillation) does; it needs no clients."""
    config = RunConfig.from_mapping(values)
    run_async_distillation(None, config, {}, RunRecorder(config, Path(folder)))


def test_two_halves_as_separate_runs_share_a_channel(tmp_path):
    """Deployment: async-averaging and async-distillation as two runs on one channel-dir."""
    shared = {**SMALL, "num-rounds": 4, "distill-mode": "per-round",
              "channel-dir": str(tmp_path / "channel")}
    context = multiprocessing.get_context("spawn")
    distillation = context.Process(
        target=distillation_run,
        args=({**app_defaults(), **shared, "method": "async-distillation"},
              str(tmp_path / "distillation")),
    )
    distillation.start()
    folder = simulate({**shared, "method": "async-averaging"})
    distillation.join(120)
    assert distillation.exitcode == 0
    assert [r["round"] for r in read_rounds(folder)] == [1, 2, 3, 4]
    tests = read_log(tmp_path / "distillation" / GLOBAL_LOG)
    assert tests[-1]["version"] == 4 and tests[-1]["accuracy"] > tests[0]["accuracy"]
