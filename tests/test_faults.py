"""Faults in simulation: errors, timeouts, poisoned replies, partial participation, resume."""

import json

import pytest

from fedapps.methods.fedme.strategy import FedMe
from fedapps.protocol.results import read_rounds
from fedapps.simulation import simulate
from tests.helpers import comparable_rounds

pytestmark = pytest.mark.slow

BASE = {"num-clients": 4, "num-rounds": 3, "local-epochs": 1}
SMALL = {**BASE, "fedme.init-arch": "cnn1,cnn2,cnn1,cnn2", "fedme.cluster-schedule": "1:1,2:2"}


def test_fedme_survives_errors_timeouts_and_poison():
    # healthy rounds take 1-10 s (more on a machine busy with other tests); the slow client
    # stalls past the timeout whatever it is
    folder = simulate({**SMALL, "round-timeout": 30.0,
                       "fault-injection": "error:1:1,nan:2:2,slow:3:3"})
    rows = read_rounds(folder)
    assert [r["replies"] for r in rows] == [3, 3, 3]
    assert "fault-injection: client 1 fails in round 1" in rows[0]["rejected"]["1"]
    assert "NaN" in rows[1]["rejected"]["2"]
    assert rows[2]["rejected"] == {}  # the slow client is missing, named by its partition
    assert rows[2]["no-reply"] == [3] and "no-reply" not in rows[1]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["after-finetune"]["mean"] > 0.3


def test_fedavg_rejects_poison_and_skips_thin_rounds():
    folder = simulate({**BASE, "method": "fedavg", "model": "cnn1", "min-replies": 4,
                       "fault-injection": "nan:0:2"})
    rows = read_rounds(folder)
    assert "skipped" not in rows[0] and rows[0]["replies"] == 4
    assert "NaN" in next(iter(rows[1]["rejected"].values()))
    assert "3 usable replies < min-replies=4" in rows[1]["skipped"]
    # the skipped round kept the previous global model: the same model tests the same
    assert rows[1]["client-accuracy"] == rows[0]["client-accuracy"]
    assert rows[2]["client-accuracy"] != rows[1]["client-accuracy"]


def test_partial_participation():
    folder = simulate({**SMALL, "fraction-train": 0.5})
    for row in read_rounds(folder):
        assert len(row["exchange"]) == 2 and row["replies"] == 2
        assert set(row["client-accuracy"]) == {"0", "1", "2", "3"}  # everyone is evaluated


def test_resume_equals_uninterrupted(monkeypatch):
    settings = {**SMALL, "checkpoint-every": 1}
    whole = simulate({**settings, "run-name": "whole"})

    original = FedMe.aggregate_evaluate

    def crash_in_round_3(self, server_round, replies):
        if server_round == 3:
            raise RuntimeError("server killed")
        return original(self, server_round, replies)

    monkeypatch.setattr(FedMe, "aggregate_evaluate", crash_in_round_3)
    with pytest.raises(RuntimeError):
        simulate({**settings, "run-name": "resumed"})
    assert [r["round"] for r in read_rounds("results/resumed")] == [1, 2]
    monkeypatch.setattr(FedMe, "aggregate_evaluate", original)
    resumed = simulate({**settings, "run-name": "resumed"})

    assert comparable_rounds(resumed) == comparable_rounds(whole)
    assert (json.loads((resumed / "summary.json").read_text())["clients"]
            == json.loads((whole / "summary.json").read_text())["clients"])
