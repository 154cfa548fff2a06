"""Whole asynchronous and synchronous distillation runs on digits: the real servers (the
distillation server in its own process) and client halves, without Flower's runtime, whose path
for these methods has its own tests (test_end_to_end, test_deployment, test_devices). Slow: they
wait on the clock (a slow distillation server, time budgets)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from fedapps.config import RunConfig, app_defaults
from fedapps.inprocess import run_in_process
from fedapps.methods.distill.adoption import better
from fedapps.methods.distill.averaging import run_async_distillation
from fedapps.methods.distill.distillation import GLOBAL_LOG, PASSES_LOG, read_log
from fedapps.protocol.results import RunRecorder, read_rounds
from fedapps.training import EvalResult

pytestmark = pytest.mark.slow

SMALL = {"dataset": "digits", "num-clients": 2, "partitioner": "iid", "model": "cnn-small",
         "distill.global-model": "cnn2", "local-epochs": 2, "distill.epochs": 2, "distill.lr": 0.05,
         "unlabeled-size": 400}
# A distillation pass this slow outlasts several averaging rounds even on a machine busy with
# other tests (a round of these two small clients takes 1-8 s), so the test does not depend on
# the load: a server that waited for the passes could not end its rounds before them.
DELAY = 15.0


def test_averaging_never_waits_for_a_slow_distillation_server():
    folder = run_in_process({**SMALL, "method": "async-distill", "num-rounds": 4,
                       "distill.mode": "continuous", "distill.delay": DELAY})
    rounds = read_rounds(folder)
    tests = read_log(folder / GLOBAL_LOG)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    # nobody waits: the averaging server finished all its rounds while the slow distillation
    # server (DELAY s per pass) had ended fewer passes than rounds
    passes = read_log(folder / PASSES_LOG)
    passes_before_end = [p for p in passes if p["end"] <= rounds[-1]["time"]]
    assert len(passes_before_end) < len(rounds) - 1, (rounds, passes)
    # the global model learnt from the distilled ones, and its final model is the last round's
    assert tests[-1]["version"] == 4
    assert tests[-1]["accuracy"] > tests[0]["accuracy"], tests
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["averaging-rounds"] == 4 and summary["global-accuracy"] == tests[-1]["accuracy"]


def distillation_run(values: dict, folder: str) -> None:
    """What the second Flower run (method async-distillation) does; it needs no clients."""
    config = RunConfig.from_mapping(values)
    run_async_distillation(None, config, {}, RunRecorder(config, Path(folder)))


def test_two_halves_as_separate_runs_share_a_channel(tmp_path):
    """Deployment: async-averaging and async-distillation as two runs on one distill.channel-dir."""
    shared = {**SMALL, "num-rounds": 4, "distill.mode": "per-round",
              "distill.channel-dir": str(tmp_path / "channel"),
              "distill.channel-timeout": 900.0}  # Flower's start-up on a busy machine
    context = multiprocessing.get_context("spawn")
    distillation = context.Process(
        target=distillation_run,
        args=({**app_defaults(), **shared, "method": "async-distillation"},
              str(tmp_path / "distillation")),
    )
    distillation.start()
    folder = run_in_process({**shared, "method": "async-averaging"})
    distillation.join(120)
    assert distillation.exitcode == 0
    assert [r["round"] for r in read_rounds(folder)] == [1, 2, 3, 4]
    tests = read_log(tmp_path / "distillation" / GLOBAL_LOG)
    assert tests[-1]["version"] == 4 and tests[-1]["accuracy"] > tests[0]["accuracy"]


def test_async_averaging_rejects_a_poisoned_reply_and_continuous_distils_more_than_rounds():
    folder = run_in_process({**SMALL, "num-clients": 3, "method": "async-distill", "num-rounds": 3,
                       "distill.mode": "continuous", "distill.final-passes": 4,
                       "fault-injection": "nan:1:2"})
    rounds = read_rounds(folder)
    assert [r["replies"] for r in rounds] == [3, 2, 3]
    [reason] = rounds[1]["rejected"].values()
    assert "NaN" in reason
    passes = read_log(folder / PASSES_LOG)
    assert len(passes) > len(rounds)  # continuous: it keeps distilling the newest model
    assert [p["version"] for p in passes][-4:] == [3, 3, 3, 3]
    assert read_log(folder / GLOBAL_LOG)[-1]["version"] == 3


def test_sync_distill_end_to_end():
    folder = run_in_process({**SMALL, "method": "sync-distill", "num-rounds": 3,
                       "distill.forward-distill-every": 1})
    assert [r["round"] for r in read_rounds(folder)] == [1, 2, 3]
    passes = [(p["kind"], p["version"]) for p in read_log(folder / PASSES_LOG)]
    # the initial forward pass comes before the time axis starts; then one per later round
    assert passes == [("reverse", 1), ("forward", 1), ("reverse", 2), ("forward", 2),
                      ("reverse", 3)]
    tests = read_log(folder / GLOBAL_LOG)
    assert tests[0]["version"] == 0 and tests[-1]["version"] == 3
    assert tests[-1]["accuracy"] > tests[0]["accuracy"]
    assert [t["time"] for t in tests] == sorted(t["time"] for t in tests)


ROUND_CAP = 500  # far more rounds than fit in the budgets below: only the budget can end them


def test_a_time_budget_ends_both_servers_and_every_offer_is_checked(tmp_path):
    folder = run_in_process({**SMALL, "results-dir": str(tmp_path), "method": "async-distill",
                       "num-rounds": ROUND_CAP, "distill.mode": "continuous",
                       "distill.time-budget-s": 8.0, "distill.forward-distill-every": 1,
                       "distill.adoption-check": "validation",
                       "distill.validation-fraction": 0.3})
    summary = json.loads((folder / "summary.json").read_text())
    # the averaging server (this run) and the distillation server (its child process, which
    # wrote its own reason) both stopped at the budget
    assert summary["stopped-by"] == "time-budget-s"
    assert summary["distillation-stopped-by"] == "time-budget-s"
    rounds = read_rounds(folder)
    assert len(rounds) == summary["averaging-rounds"] < ROUND_CAP
    assert summary["global-evaluations"] == summary["snapshots-tested"]
    # how many forward-distilled models reach the averaging server in 8 s depends on the
    # machine (the unit test of ForwardOffers makes one arrive): whatever came is accounted for
    offers = [row["offer"] for row in rounds if "offer" in row]
    assert summary["offers"] == len(offers)
    assert summary["adoptions"] == sum(offer["adopted"] for offer in offers)
    for offer in offers:  # each decision follows from the two scores logged with it
        candidate = EvalResult(offer["candidate-loss"], offer["candidate-accuracy"], 0)
        current = EvalResult(offer["current-loss"], offer["current-accuracy"], 0)
        assert offer["adopted"] is better(candidate, current)


def test_sync_distill_stops_at_its_time_budget(tmp_path):
    folder = run_in_process({**SMALL, "results-dir": str(tmp_path), "method": "sync-distill",
                       "num-rounds": ROUND_CAP, "distill.forward-distill-every": 1,
                       "distill.time-budget-s": 5.0})
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stopped-by"] == "time-budget-s"
    assert len(read_rounds(folder)) == summary["averaging-rounds"] < ROUND_CAP
    assert summary["global-evaluations"] == summary["snapshots-tested"]
