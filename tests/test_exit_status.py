"""A run never reports success when it failed: bad inputs are refused in seconds, before Flower
starts; a run that fails exits non-zero with its reason last; launches side by side never mix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedapps.config import PROJECT, RunConfig
from fedapps.data.split import split_for_devices
from fedapps.inprocess import run_in_process
from fedapps.launch import outcome_of
from fedapps.privacy import NOISE_SD_KEY
from fedapps.protocol.results import ERROR_LOG, FAILED, read_rounds
from tests.helpers import SECAGG_TOLERANCE, largest_difference, launch_in_process, library_epsilon

FEDAVG = {"method": "fedavg", "num-clients": 3, "model": "cnn1", "local-epochs": 1,
          "finetune-epochs": 1}


def npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def images(count: int = 60) -> np.ndarray:
    return np.random.default_rng(0).random((count, 8, 8), dtype=np.float32)


def labels(count: int = 60) -> np.ndarray:
    return np.arange(count) % 3


def nan_images(tmp_path: Path) -> str:
    x = images()
    x[5, 2, 2] = np.nan
    return npz(tmp_path, "nan.npz", x=x, y=labels())


def not_a_zip(tmp_path: Path) -> str:
    path = tmp_path / "text.npz"
    path.write_text("these are not arrays")
    return str(path)


def text_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def device_file(tmp_path: Path) -> str:
    """A device's own file (what python -m fedapps.data.split writes), given where the
    server's belongs."""
    out = tmp_path / "devices"
    split_for_devices(RunConfig(num_clients=2), out)
    return str(next(out.glob("device-*.npz")))


def other_run(tmp_path: Path) -> str:
    """A named run already in place, made with other settings."""
    folder = tmp_path / "results" / "mine"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num-rounds": 99}))
    return str(tmp_path / "results")


def sets(*items: str) -> list[str]:
    return [part for item in items for part in ("--set", item)]


# (argv given the test's folder, what the one line must say): configuration errors, then data
# errors, then other kinds of each (a new user will try more than these).
BAD_INPUTS = {
    "negative lr": (lambda t: sets("lr=-1.0"), "lr=-1.0: must be > 0"),
    "unknown method": (lambda t: sets("method=fedprox"), "method='fedprox' is not known"),
    "unknown key": (lambda t: sets("num-rouds=3"), "unknown config key 'num-rouds'"),
    "wrong type": (lambda t: sets("num-clients=many"), "num-clients='many': expected an integ"),
    "bad schedule": (lambda t: sets("fedme.cluster-schedule=1:1,x"), "bad item 'x'"),
    "missing partition file": (lambda t: sets("partition-file=/no/such.json"),
                               "partition-file='/no/such.json': no such file"),
    "unknown architecture": (lambda t: sets("model=resnet"), "model='resnet' is not known"),
    "alpha 0": (lambda t: sets("alpha-label=0.0"), "alpha-label=0.0: must be > 0"),
    "zero rounds": (lambda t: sets("num-rounds=0"), "num-rounds=0: must be >= 1"),
    "batch 0": (lambda t: sets("batch-size=0"), "batch-size=0: must be >= 1"),
    "toml syntax error": (lambda t: [text_file(t, "bad.toml", "num-rounds = = 3\n")],
                          "config file"),
    "missing conf file": (lambda t: ["conf/no-such.toml"], "config file 'conf/no-such.toml'"),
    "fedme key to fedavg": (lambda t: sets("method=fedavg", "fedme.init-arch=cnn1"),
                            "method 'fedavg' does not use this key"),
    "devices without a path": (lambda t: sets("dataset=devices"),
                               "dataset='devices' needs data-path"),
    "npz without a path": (lambda t: sets("dataset=npz"), "dataset='npz' needs data-path"),
    "npz not a zip": (lambda t: sets("dataset=npz", f"data-path='{not_a_zip(t)}'"),
                      "not a readable .npz file"),
    "npz without y": (lambda t: sets("dataset=npz", f"data-path='{npz(t, 'x.npz', x=images())}'"),
                      "missing array(s) ['y']"),
    "images with NaN": (lambda t: sets("dataset=npz", f"data-path='{nan_images(t)}'"),
                        "x contains NaN or infinite values"),
    "x and y lengths": (lambda t: sets("dataset=npz", "data-path='"
                                       + npz(t, "l.npz", x=images(60), y=labels(50)) + "'"),
                        "x has 60 samples but y has 50"),
    "fedme with one client": (lambda t: sets("num-clients=1"),
                              "method='fedme' needs at least 2 clients"),
    # -- other kinds
    "partition not json": (lambda t: sets(f"partition-file='{text_file(t, 'p.json', '{')}'"),
                           "cannot read JSON"),
    "partition index out of range": (
        lambda t: sets("partition-file='" + text_file(
            t, "p.json", json.dumps({"clients": [{"train": [99999], "val": [], "test": []}]}))
            + "'"), "index 99999, out of range"),
    "empty pool for fedme": (lambda t: sets("unlabeled-size=0"),
                             "unlabeled pool, which is empty"),
    "pool takes everything": (lambda t: sets("unlabeled-size=5000"), "unlabeled-size=5000"),
    "no samples left for clients": (lambda t: sets("num-clients=400", "min-client-samples=10"),
                                    "fewer than min-client-samples=10"),
    "natural ids missing": (lambda t: sets("partitioner=natural"), "needs natural ids"),
    "server given a device file": (lambda t: sets("dataset=devices",
                                                  f"data-path='{device_file(t)}'"),
                                   "is a device's file"),
    "1-D features": (lambda t: sets("dataset=npz", "data-path='"
                                    + npz(t, "f.npz", x=np.ones(60, np.float32), y=labels())
                                    + "'"), "expected images"),
    "negative labels": (lambda t: sets("dataset=npz", "data-path='"
                                       + npz(t, "n.npz", x=images(), y=-labels()) + "'"),
                        "labels >= 0"),
    "text features": (lambda t: sets("dataset=npz", "data-path='"
                                     + npz(t, "s.npz", x=np.array(["a"] * 60), y=labels())
                                     + "'"), "could not be loaded"),
    "data path is a folder": (lambda t: sets("dataset=npz", f"data-path='{t}'"),
                              "not a readable .npz file"),
    "override without a value": (lambda t: ["--set", "lr"], "--set expects key=value"),
    "unknown option": (lambda t: ["--rounds", "3"], "unrecognized arguments: --rounds"),
    "named run holds another": (lambda t: sets(f"results-dir='{other_run(t)}'", "run-name=mine"),
                                "holds a run with another config"),
    "no test split for distillation": (
        lambda t: sets("method=sync-distill", "distill.global-test-fraction=0.001"),
        "leaves no test sample"),
    "server fault for a distillation method": (
        lambda t: sets("method=sync-distill", "fault-injection=error:server:1"),
        "needs a round-engine method"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_is_one_line_and_exit_2_before_flower_starts(case, tmp_path, monkeypatch,
                                                                 capsys):
    argv_of, message = BAD_INPUTS[case]
    argv = argv_of(tmp_path)
    capsys.readouterr()  # what building the inputs printed
    code, started = launch_in_process(argv, monkeypatch)
    out, err = capsys.readouterr()
    assert (code, started) == (2, [])
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err
    assert not out


@pytest.mark.parametrize("command", [["-m", "fedapps.launch"], ["-m", "fedapps.deploy"]])
def test_the_commands_refuse_bad_data_with_exit_2(command, tmp_path):
    done = subprocess.run([sys.executable, *command, *sets("dataset=npz",
                                                           f"data-path='{nan_images(tmp_path)}'")],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: data-path='{tmp_path / 'nan.npz'}': x contains NaN or infinite values"]


def test_a_failed_run_says_so_in_its_folder():
    with pytest.raises(RuntimeError, match="the server fails in round 2"):
        run_in_process({**FEDAVG, "num-rounds": 3, "fault-injection": "error:server:2",
                        "run-name": "broken"})
    folder = Path("results/broken")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == FAILED and summary["rounds-logged"] == 1
    assert summary["reason"] == "RuntimeError: fault-injection: the server fails in round 2"
    assert "after-finetune" not in summary
    assert "Traceback" in (folder / ERROR_LOG).read_text()
    assert outcome_of([folder], [0], Path(".")).code == 1


def test_the_outcome_is_completed_only_when_every_summary_says_so(tmp_path):
    done, failed, empty = (tmp_path / name for name in ("done", "failed", "empty"))
    for folder in (done, failed, empty):
        folder.mkdir()
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "reason": "boom"}))
    assert outcome_of([done], [0], tmp_path).code == 0
    assert outcome_of([done], [1], tmp_path).reason.startswith("flwr run exited with 1")
    assert outcome_of([done, failed], [0, 0], tmp_path).reason.startswith("boom (traceback:")
    assert "wrote no results" in outcome_of([empty], [0], tmp_path).reason


@pytest.mark.slow
def test_two_launches_side_by_side_keep_their_own_settings_and_a_failure_exits_1(tmp_path):
    """Two conf files started together from one checkout, one results folder: each run holds
    its own settings and rounds (they once both ran the second one). The first one's ServerApp
    fails in round 3: that launch exits 1 with the reason as its last line and its folder says
    failed. The other completes with central DP and SecAgg+, which are thereby tested through
    ``flwr run`` (Flower's strategy wrapper, clipping mod and SecAgg+ workflow): the epsilon is
    dp-accounting's, and the model equals the same run without SecAgg+ in process within
    SecAgg+'s quantization (the noise is seeded; tests/test_privacy.py has the rest in process).
    Two launches test all of it: each costs a Ray cluster."""
    processes = []
    private = {"privacy.mode": "central", "privacy.noise-multiplier": 0.7, "privacy.secagg": 1,
               "checkpoint-every": 1}
    for rounds, seed, own in ((4, 11, {"fault-injection": "error:server:3"}), (1, 12, private)):
        conf = tmp_path / f"conf-{rounds}.toml"
        conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {
            **FEDAVG, "num-rounds": rounds, "seed": seed, **own,
            "results-dir": str(tmp_path / "res"),
        }.items()))
        processes.append(subprocess.Popen([sys.executable, "-m", "fedapps.launch", str(conf)],
                                          cwd=PROJECT, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [1, 0], errors
    runs = {}
    for folder in (tmp_path / "res").iterdir():
        roster = json.loads((folder / "clients.json").read_text())
        assert {client["niceness"] for client in roster.values()} == {0}  # Ray's default: 15
        config = json.loads((folder / "config.json").read_text())
        runs[config["seed"]] = (config["num-rounds"], len(read_rounds(folder)),
                                json.loads((folder / "summary.json").read_text())["status"])
        if config["seed"] == 11:
            assert errors[0].strip().splitlines()[-1] == (
                "error: RuntimeError: fault-injection: the server fails in round 3 "
                f"(traceback: {folder / ERROR_LOG})")
            assert config["privacy.mode"] == "none" and config["privacy.secagg"] == 0
            continue
        report = json.loads((folder / "privacy.json").read_text())
        assert report["mode"] == "central" and report["releases"] == 1
        assert report["epsilon"] == pytest.approx(library_epsilon(0.7, 1, 1e-5), rel=1e-9)
        [row] = read_rounds(folder)
        assert row[NOISE_SD_KEY] == pytest.approx(0.7 * 1.0 / 3) and row["replies"] == 3
        plain = run_in_process({**config, "privacy.secagg": 0, "run-name": "plain",
                                "results-dir": str(tmp_path / "plain")})
        assert 0 < largest_difference(plain, folder) < SECAGG_TOLERANCE
    assert runs == {11: (4, 2, FAILED), 12: (1, 1, "completed")}
