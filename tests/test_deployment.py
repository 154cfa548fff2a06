"""Real deployment on loopback: a flower-superlink and flower-supernode processes (fedapps.deploy).

Slow by nature: the deployment runtime polls every 3 s and starts a process per message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from fedapps.config import RunConfig, resolve
from fedapps.data.devices import read_device_file
from fedapps.data.federated import partition_for
from fedapps.data.split import split_for_devices
from fedapps.deploy import Deployment, deployment, device_node_configs, device_run_config
from fedapps.deploy import main as deploy_main
from fedapps.launch import write_run_config
from fedapps.methods.distill.channel import open_channel
from fedapps.methods.distill.distillation import GLOBAL_LOG, read_log
from fedapps.protocol.results import read_rounds

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 420.0
SMALL = {
    "method": "fedme", "num-clients": 3, "num-rounds": 2, "fedme.local-best-epochs": 1,
    "local-epochs": 1, "finetune-epochs": 1, "fedme.candidate-models": "cnn1,cnn2",
}
FEDAVG = {"method": "fedavg", "num-clients": 2, "num-rounds": 2, "local-epochs": 1,
          "finetune-epochs": 1, "model": "cnn1"}


def results_folder(tmp_path: Path) -> Path | None:
    folders = list((tmp_path / "results").glob("fedme-*"))
    return folders[0] if folders else None


def process_trees(deploy: Deployment) -> list[psutil.Process]:
    """Every live process the deployment started, with the helpers Flower started below them."""
    trees = []
    for process in deploy.processes:
        try:
            root = psutil.Process(process.pid)
            trees += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return trees


def assert_all_gone(processes: list[psutil.Process]) -> None:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"left running: {alive}"


def finish(deploy: Deployment, run, timeout_s: float) -> int:
    try:
        return run.wait(timeout=timeout_s)
    except Exception:
        print(deploy.log_tail("flwr-run"), deploy.log_tail("superlink"), sep="\n")
        raise


def test_fedme_on_devices_with_only_their_own_files_finishes_when_one_dies(tmp_path):
    """The deployment of issue 15 rehearsed, and a device lost mid-run (one deployment for both:
    each costs a SuperLink, SuperNodes and a ClientApp process per message).

    ``fedapps.data.split`` writes one file per device and the server's; each real SuperNode gets
    only its file (no partition-id in its node config) and the ServerApp only ``server.npz``,
    which holds the unlabeled pool and nothing of the clients'. FedMe runs (it is the method that
    needs the pool; every other method on device files is tests/test_devices.py, in process: the
    same handlers read the same files): 2 rounds, round 1 with all three devices. Device 2's
    SuperNode is then killed: later phases go on without it (after ``round-timeout`` or once the
    SuperLink marks it offline), fine-tuning has the two others.

    The timeout leaves healthy replies a wide margin: a phase can take 20-30 s on a busy CPU.
    Clients are tested in the last round only (``eval-every``): each phase costs every SuperNode
    a ClientApp process.
    """
    config = RunConfig.from_mapping(resolve(None, SMALL))
    split_for_devices(config, tmp_path / "devices")
    server = read_device_file(str(tmp_path / "devices" / "server.npz"))
    assert len(server.y) == len(partition_for(config).unlabeled)  # the pool and nothing else
    devices = device_node_configs(tmp_path / "devices")
    assert all("partition-id" not in node for node in devices)
    values = device_run_config(
        resolve(None, {**SMALL, "results-dir": str(tmp_path / "results"), "round-timeout": 60.0,
                       "eval-every": 2}),
        tmp_path / "devices")
    with deployment(len(devices), tmp_path / "flwr", devices=devices) as deploy:
        run = deploy.start_run(write_run_config(values, tmp_path / "fedme.toml"), name="fedme")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not ((folder := results_folder(tmp_path)) and read_rounds(folder)):
            assert run.poll() is None, deploy.log_tail("fedme")
            assert time.monotonic() < deadline, deploy.log_tail("fedme")
            time.sleep(1)
        deploy.kill_supernode(2)
        code = finish(deploy, run, deadline - time.monotonic())
        started = process_trees(deploy)
        assert code == 0, deploy.log_tail("fedme")
    assert_all_gone(started)
    roster = json.loads((folder / "clients.json").read_text())
    assert {entry["device"] for entry in roster.values()} == {
        "device-000", "device-001", "device-002"}
    assert not (folder / "partition.json").exists()
    rows = read_rounds(folder)
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[0]["replies"] == 3 and rows[1]["replies"] == 2
    # the dead SuperNode is named by its partition: silent, or an error reply from the SuperLink
    assert 2 in rows[1].get("no-reply", []) or "2" in rows[1]["rejected"]
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["clients"]) == {"0", "1"}
    assert summary["after-finetune"]["mean"] > 0.1


def test_every_process_is_stopped_when_the_caller_fails(tmp_path):
    with pytest.raises(RuntimeError, match="caller failed"), \
            deployment(2, tmp_path / "flwr") as deploy:
        deadline = time.monotonic() + 60
        while len(started := process_trees(deploy)) < 5 and time.monotonic() < deadline:
            time.sleep(0.5)  # the SuperLink and SuperNodes each start a SuperExec
        raise RuntimeError("caller failed")
    assert_all_gone(started)


def test_async_distill_as_two_runs_on_one_real_superlink(tmp_path):
    """The distillation server and the averaging server as two `flwr run`s on one SuperLink
    with real SuperNodes; the distillation run trains no client and needs none to answer.
    Per-round distillation: the same wiring as continuous mode's (tested in process), without
    a core spent distilling for the whole run."""
    settings = {"method": "async-averaging", "num-clients": 2, "num-rounds": 2,
                "distill.mode": "per-round",
                "model": "cnn-small", "partitioner": "iid", "local-epochs": 2,
                "unlabeled-size": 400,
                "distill.global-model": "cnn2", "distill.epochs": 2, "distill.lr": 0.05,
                "distill.channel-dir": str(tmp_path / "channel"),
                "results-dir": str(tmp_path / "results")}
    averaging = write_run_config(resolve(None, settings), tmp_path / "averaging.toml")
    distillation = write_run_config(resolve(None, {**settings, "method": "async-distillation"}),
                                    tmp_path / "distillation.toml")
    with deployment(2, tmp_path / "flwr") as deploy:
        runs = [deploy.start_run(distillation, name="distillation"),
                deploy.start_run(averaging, name="averaging")]
        codes = [finish(deploy, run, RUN_TIMEOUT_S) for run in runs]
        assert codes == [0, 0], deploy.log_tail("distillation") + deploy.log_tail("averaging")
    [averaged] = (tmp_path / "results").glob("async-averaging-*")
    [distilled] = (tmp_path / "results").glob("async-distillation-*")
    assert [row["round"] for row in read_rounds(averaged)] == [1, 2]
    assert open_channel("directory", tmp_path / "channel").latest_version("distilled") == 2
    tests = read_log(distilled / GLOBAL_LOG)
    assert [t["version"] for t in tests] == sorted(t["version"] for t in tests)
    assert tests[-1]["version"] == 2 and tests[-1]["accuracy"] > tests[0]["accuracy"]


def test_a_supernode_that_dies_at_start_is_reported_with_its_log(tmp_path):
    """A SuperNode that exits at once (here: its CA file is missing) fails the rehearsal when it
    starts, naming its log, instead of leaving the ServerApp waiting for it."""
    with deployment(1, tmp_path / "flwr") as deploy:
        deploy.add_supernode(1, 2, insecure=False, root_certificates=tmp_path / "missing.crt")
        with pytest.raises(RuntimeError, match=r"exited .*/supernode-1\.log"):
            deploy.wait_for_supernodes()


def test_the_rehearsal_exits_non_zero_when_the_serverapp_fails(tmp_path, capsys):
    """Flower's CLI exits 0 for a failed run; `python -m fedapps.deploy` reads the run's own
    summary and exits 1 with the reason as its last line."""
    code = deploy_main([*(part for key, value in {
        **FEDAVG, "fault-injection": "error:server:1",
        "results-dir": str(tmp_path / "results")}.items()
        for part in ("--set", f"{key}={json.dumps(value)}")), "--home", str(tmp_path / "flwr")])
    [folder] = (tmp_path / "results").iterdir()
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: RuntimeError: fault-injection: the server fails in round 1 "
        f"(traceback: {folder / 'error.log'})")
