"""The round engine, for every method that has rounds: reply acceptance, min-replies, resume.

Runs in process (fedapps.inprocess: the same strategies and handlers, no Flower processes), so
the whole matrix takes seconds per method. ``local`` and ``centralized`` have no rounds.
"""

import json
import time

import pytest

from fedapps.config import ConfigError
from fedapps.inprocess import run_in_process
from fedapps.protocol.results import RunRecorder, read_rounds
from tests.helpers import comparable_rounds

TINY = {"num-clients": 4, "num-rounds": 3, "local-epochs": 1, "model": "cnn1",
        "unlabeled-size": 100, "finetune-epochs": 0}
SECTIONS = {
    "fedme": {"fedme.init-arch": "cnn1,cnn2,cnn1,cnn2", "fedme.cluster-schedule": "1:1,2:2"},
    "fedavg": {},
    "hypcluster": {},
    "fml": {},
    "pfedme": {"pfedme.inner-steps": 1},
    "mapper": {},
    "sync-distill": {"distill.global-model": "cnn-small", "distill.snapshot-every-s": 0.0},
    "async-distill": {"distill.global-model": "cnn-small", "distill.snapshot-every-s": 0.0},
}
ENGINE_METHODS = ("fedme", "fedavg", "hypcluster", "fml", "pfedme", "mapper")


def settings(method: str, tmp_path, **extra) -> dict:
    return {**TINY, "method": method, **SECTIONS[method], "results-dir": str(tmp_path), **extra}


@pytest.mark.parametrize("method", list(SECTIONS))
def test_bad_replies_are_rejected_and_too_few_usable_replies_skip_the_round(method, tmp_path):
    """Round 1: a NaN reply is rejected; round 2: a client's error leaves the round to the rest;
    round 3: two NaN replies leave fewer usable replies than min-replies, so the round is
    skipped; round 4 has everyone again (one run per method for the three cases)."""
    rows = read_rounds(run_in_process(settings(method, tmp_path, **{
        "num-rounds": 4, "min-replies": 3,
        "fault-injection": "nan:1:1,error:2:2,nan:0:3,nan:3:3"})))
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert set(rows[0]["rejected"]) == {"1"} and "NaN" in rows[0]["rejected"]["1"]
    assert set(rows[1]["rejected"]) == {"2"}
    assert "fault-injection: client 2 fails in round 2" in rows[1]["rejected"]["2"]
    assert set(rows[2]["rejected"]) == {"0", "3"}
    assert rows[2]["skipped"] == "2 usable replies < min-replies=3"
    assert [row["replies"] for row in (rows[0], rows[1], rows[3])] == [3, 3, 4]
    assert not any("skipped" in row for row in (rows[0], rows[1], rows[3]))


def test_each_round_logs_its_evaluate_phase_as_part_of_the_round(tmp_path, monkeypatch):
    from fedapps.protocol import engine

    original = engine.log_errors

    def slow_evaluation_phase(*args, **kwargs):  # runs inside the evaluate phase only
        time.sleep(0.2)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "log_errors", slow_evaluation_phase)
    rows = read_rounds(run_in_process(settings("fedavg", tmp_path)))
    assert all(0.2 <= row["evaluate-s"] <= row["round-s"] for row in rows)


@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_resume_after_a_checkpoint_equals_the_uninterrupted_run(method, tmp_path, monkeypatch):
    values = settings(method, tmp_path, **{"checkpoint-every": 1})
    whole = run_in_process({**values, "run-name": "whole"})
    original = RunRecorder.log_round

    def killed_in_round_3(self, server_round, **fields):
        if server_round == 3:
            raise RuntimeError("server killed")
        return original(self, server_round, **fields)

    monkeypatch.setattr(RunRecorder, "log_round", killed_in_round_3)
    with pytest.raises(RuntimeError, match="server killed"):
        run_in_process({**values, "run-name": "resumed"})
    assert [row["round"] for row in read_rounds(tmp_path / "resumed")] == [1, 2]
    monkeypatch.setattr(RunRecorder, "log_round", original)
    # a restarted deployment's SuperNodes get new node ids: the checkpoint is by partition
    resumed = run_in_process({**values, "run-name": "resumed"}, first_node_id=101)

    assert comparable_rounds(resumed) == comparable_rounds(whole)
    assert (json.loads((resumed / "summary.json").read_text())["clients"]
            == json.loads((whole / "summary.json").read_text())["clients"])


@pytest.mark.parametrize("method", ["async-distill", "sync-distill", "local", "centralized"])
def test_a_method_rejects_a_key_it_cannot_honour(method, tmp_path):
    with pytest.raises(ConfigError, match=f"checkpoint-every=1: method '{method}' does not"):
        run_in_process({**TINY, "method": method, "checkpoint-every": 1})


@pytest.mark.parametrize("method", ["fedme", "fedavg"])
def test_with_partial_participation_half_the_clients_train_and_every_client_is_tested(
        method, tmp_path):
    rows = read_rounds(run_in_process(settings(method, tmp_path, **{"fraction-train": 0.5})))
    for row in rows:
        assert row["replies"] == 2
        assert set(row["client-accuracy"]) == {"0", "1", "2", "3"}
    if method == "fedme":  # only the round's trainers exchange models
        assert [len(row["exchange"]) for row in rows] == [2, 2, 2]
