"""Whole runs through Flower's simulation engine on digits."""

import json

import pytest

from fedapps.launch import launch
from fedapps.methods.distill.channel import open_channel
from fedapps.methods.distill.distillation import GLOBAL_LOG, read_log
from fedapps.protocol.results import read_rounds
from fedapps.simulation import simulate

pytestmark = pytest.mark.slow


def summary_of(folder):
    return json.loads((folder / "summary.json").read_text())


def test_the_deprecated_in_process_simulation_still_works():
    """:func:`fedapps.simulation.simulate` is the one caller of Flower's deprecated
    ``run_simulation`` (tests patch the server in their own process): when Flower removes or
    changes it, this test fails first, by this name. The run is FedMe with two architectures
    and clustering from round 2, through Ray: its clients run at everyone's priority.

    The same run takes faults as Ray reports them (one run for both: each starts a Ray
    cluster): client 1 fails in round 1, client 2 sends NaNs in round 2, client 3 stalls past
    the round timeout in round 3 (healthy rounds take 1-10 s, more on a busy machine). The
    round engine's in-process tests (tests/test_engine.py) cover the rest for every method,
    and a resume in which every node id changes.
    """
    folder = simulate({
        "method": "fedme", "num-clients": 4, "num-rounds": 3, "local-epochs": 1,
        "fedme.init-arch": "cnn1,cnn2,cnn1,cnn2", "fedme.cluster-schedule": "1:1,2:2",
        "round-timeout": 30.0, "fault-injection": "error:1:1,nan:2:2,slow:3:3",
    })
    summary = summary_of(folder)
    assert summary["status"] == "completed"
    assert summary["after-finetune"]["mean"] > 0.3  # chance is 0.1 on ten digits
    assert set(summary["architectures"].values()) <= {"cnn1", "cnn2"}
    rows = read_rounds(folder)
    assert [r["k"] for r in rows] == [1, 2, 2]
    for row in rows:
        assert sum(row["architectures"].values()) == 4
        assert set(row["exchange"]) == {"0", "1", "2", "3"}
        assert all(int(p) != q for p, q in row["exchange"].items())
        assert row["server-cluster-s"] >= 0
    assert [r["replies"] for r in rows] == [3, 3, 3]
    assert "fault-injection: client 1 fails in round 1" in rows[0]["rejected"]["1"]
    assert "NaN" in rows[1]["rejected"]["2"]
    assert rows[2]["rejected"] == {}  # the slow client is missing, named by its partition
    assert rows[2]["no-reply"] == [3] and "no-reply" not in rows[1]
    assert set(rows[-1]["client-accuracy"]) == {"0", "1", "2", "3"}
    assert (folder / "accuracy.png").stat().st_size > 0
    assert json.loads((folder / "config.json").read_text())["method"] == "fedme"
    assert len(json.loads((folder / "partition.json").read_text())["clients"]) == 4
    roster = json.loads((folder / "clients.json").read_text())
    assert {client["niceness"] for client in roster.values()} == {0}  # Ray's default is 15


# per-round distillation: the wiring is the same as continuous mode's (tested in process in
# tests/test_distill_e2e.py), without a core spent distilling for the whole run
ASYNC = {"method": "async-distill", "dataset": "digits", "num-clients": 2, "partitioner": "iid",
         "model": "cnn-small", "distill.global-model": "cnn2", "num-rounds": 2,
         "distill.mode": "per-round", "local-epochs": 2, "distill.epochs": 2, "distill.lr": 0.05,
         "unlabeled-size": 400}


def test_async_distill_under_flwr_run_is_two_runs_on_one_superlink(tmp_path):
    """The distillation server and the averaging server as two Flower runs, as deployed."""
    code = launch(None, {**ASYNC, "results-dir": str(tmp_path)}, home=tmp_path / "flwr")
    assert code == 0
    [distillation] = tmp_path.glob("async-distill-digits-*-distillation")
    [averaging] = tmp_path.glob("async-distill-digits-*-averaging")
    [channel] = tmp_path.glob("async-distill-digits-*-channel")
    assert [row["round"] for row in read_rounds(averaging)] == [1, 2]
    assert open_channel("directory", channel).latest_version("distilled") == 2
    tests = read_log(distillation / GLOBAL_LOG)
    assert tests[-1]["version"] == 2 and tests[-1]["accuracy"] > tests[0]["accuracy"]
    assert summary_of(distillation)["distilled-version"] == 2
