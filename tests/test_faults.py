"""Faults through Flower's simulation: client errors as Ray reports them, a stalled client and
the round timeout, poisoned replies (the round engine's in-process tests, tests/test_engine.py,
cover the rest for every method, and a resume in which every node id changes)."""

import json

import pytest

from fedapps.protocol.results import read_rounds
from fedapps.simulation import simulate

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
