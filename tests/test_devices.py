"""Devices that hold only their own data (``dataset = "devices"``), and the split tool.

The runs are in process (fedapps.inprocess): the same server, strategies and handlers as under
Flower, with one node per device file. The rehearsal on a real SuperLink is in
tests/test_deployment.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.common.config import parse_config_args

from fedapps import inprocess
from fedapps.config import PROJECT, ConfigError, RunConfig, app_defaults, exit_on_bad_input
from fedapps.data.devices import node_config_line, read_device_file
from fedapps.data.federated import client_data, dataset_for, partition_for
from fedapps.data.registry import DataError
from fedapps.data.split import split_for_devices
from fedapps.deploy import device_node_configs, device_run_config
from fedapps.deploy import main as deploy_main
from fedapps.inprocess import run_in_process
from tests.helpers import comparable_rounds
from tests.test_engine import SECTIONS, TINY

PYTHON = sys.executable


def test_node_config_line_survives_flowers_parser():
    node = {"data-path": "/data/my device/000.npz", "partition-id": 3, "fraction": 0.5,
            "gpu": False, "name": Path("/data/x")}
    assert parse_config_args([node_config_line(node)]) == {**node, "name": "/data/x"}
    with pytest.raises(DataError, match="double quote"):
        node_config_line({"device-name": 'a"b'})


def split(tmp_path: Path, **settings) -> tuple[RunConfig, Path]:
    config = RunConfig.from_mapping({**app_defaults(), **TINY, **settings})
    split_for_devices(config, tmp_path / "devices")
    return config, tmp_path / "devices"


def assert_same(got: object, expected: object, where: str = "") -> None:
    """Equal, floats to 1e-5 relative: a device's tensors are laid out in memory unlike the
    partition's views of one array (digits' channel axis is a view), and PyTorch's convolutions
    round differently for the two layouts, in the 7th digit. Everything else must be equal."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), where
    else:
        assert got == expected, where


def test_each_device_file_holds_exactly_its_client_and_the_server_file_only_the_pool(tmp_path):
    config, folder = split(tmp_path)
    dataset, partition = dataset_for(config.dataset, ""), partition_for(config)
    for pid, client in enumerate(partition.clients):
        own = read_device_file(str(folder / f"device-{pid:03d}.npz"))
        assert own.partition_id == pid and own.num_classes == 10 and own.role == "device"
        for name in ("train", "val", "test"):
            indices = getattr(client, name)
            np.testing.assert_array_equal(own.splits[name][0], dataset.x[indices])
            np.testing.assert_array_equal(own.splits[name][1], dataset.y[indices])
    server = read_device_file(str(folder / "server.npz"))
    assert server.role == "server" and server.splits is None
    np.testing.assert_array_equal(server.x, dataset.x[partition.unlabeled])
    manifest = json.loads((folder / "devices.json").read_text())
    assert [d["partition-id"] for d in manifest["devices"]] == [0, 1, 2, 3]
    # the line a person pastes after --node-config, as flower-supernode parses it
    assert parse_config_args([manifest["devices"][2]["node-config"]]) == {
        "data-path": str((folder / "device-002.npz").resolve()), "device-name": "device-002"}
    # the same seed gives the same files
    split_for_devices(config, tmp_path / "again")
    again = read_device_file(str(tmp_path / "again" / "device-001.npz"))
    np.testing.assert_array_equal(again.x, read_device_file(str(folder / "device-001.npz")).x)


@pytest.mark.parametrize("method", [m for m in SECTIONS if m != "async-distill"] + ["local"])
def test_a_run_on_device_files_equals_the_run_on_the_partition(method, tmp_path):
    """Every method: devices with only their own files (no partition-id in the node config)
    give the rounds and results of the simulated partition they were split from (to float
    rounding). async-distill's rounds depend on timing by design: it has its own test below."""
    values = {**TINY, "method": method, **SECTIONS.get(method, {})}
    _, folder = split(tmp_path, **values)
    partitioned = run_in_process({**values, "results-dir": str(tmp_path / "a")})
    on_devices = run_in_process(
        device_run_config({**values, "results-dir": str(tmp_path / "b")}, folder),
        node_configs=device_node_configs(folder),
    )
    assert_same(comparable_rounds(on_devices), comparable_rounds(partitioned))
    summary = json.loads((on_devices / "summary.json").read_text())
    expected = json.loads((partitioned / "summary.json").read_text())
    for key in ("after-finetune", "clients", "global-accuracy"):
        assert_same(summary.get(key), expected.get(key))
    assert not (on_devices / "partition.json").exists()
    roster = json.loads((on_devices / "clients.json").read_text())
    assert {pid: entry["device"] for pid, entry in roster.items()} == {
        str(p): f"device-{p:03d}" for p in range(4)}


def test_async_distill_runs_on_device_files(tmp_path):
    """Both halves on devices: the averaging server's clients train on their own files, the
    distillation server distils on server.npz's pool and tests on its held-out part."""
    values = {**TINY, "method": "async-distill", **SECTIONS["async-distill"]}
    _, folder = split(tmp_path, **values)
    results = run_in_process(device_run_config({**values, "results-dir": str(tmp_path / "r")},
                                               folder), node_configs=device_node_configs(folder))
    rows = comparable_rounds(results)
    assert [row["round"] for row in rows] == list(range(1, TINY["num-rounds"] + 1))
    assert all(row["replies"] == 4 for row in rows)
    summary = json.loads((results / "summary.json").read_text())
    assert 0.0 < summary["global-accuracy"] <= 1.0


def test_the_server_never_opens_a_device_file(tmp_path, monkeypatch):
    """Every open() of a device file happens inside a client handler (FedMe: the method whose
    server uses the most data, the unlabeled pool)."""
    values = {**TINY, "method": "fedme", **SECTIONS["fedme"]}
    _, folder = split(tmp_path, **values)
    inside_client = threading.local()
    opened: dict[str, list[str]] = {"server": [], "clients": []}

    def client_side(handler):
        def wrapped(msg, context):
            inside_client.active = True
            try:
                return handler(msg, context)
            finally:
                inside_client.active = False
        return wrapped

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(str(folder)):
            side = "clients" if getattr(inside_client, "active", False) else "server"
            opened[side].append(Path(args[0]).name)

    monkeypatch.setattr(inprocess, "ANSWERS",
                        {key: client_side(h) for key, h in inprocess.ANSWERS.items()})
    settings = device_run_config({**values, "results-dir": str(tmp_path / "r")}, folder)
    nodes = device_node_configs(folder)
    sys.addaudithook(audit)  # cannot be removed; it records nothing outside this test's folder
    run_in_process(settings, node_configs=nodes)
    assert set(opened["server"]) == {"server.npz"}
    assert {f"device-{p:03d}.npz" for p in range(4)} <= set(opened["clients"])


def test_a_bad_device_is_named_left_out_and_the_others_go_on(tmp_path, caplog):
    values = {**TINY, "method": "fedavg"}
    _, folder = split(tmp_path, **values)
    np.savez(folder / "device-002.npz", x=np.zeros((40, 6, 6), np.float32),
             y=np.arange(40) % 10, partition_id=2)  # another image size
    np.savez(folder / "device-003.npz", x=np.zeros((3, 8, 8), np.float32),
             y=np.arange(3), partition_id=3)  # too few samples
    np.savez(folder / "device-001.npz", x=np.zeros((40, 8, 8), np.float32),
             y=np.arange(40) % 10, num_classes=12, partition_id=1)  # another class count
    caplog.set_level(logging.WARNING)
    results = run_in_process(
        device_run_config({**values, "results-dir": str(tmp_path / "r")}, folder),
        node_configs=device_node_configs(folder))
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "client 2 (device 'device-002', node 3): its data has shape (1, 6, 6)" in warnings
    assert "device 'device-003'" in warnings and "min-client-samples" in warnings
    assert "client 1 (device 'device-001', node 2): its data has shape (1, 8, 8) and 12 classes"\
        in warnings
    assert "no usable device for partition(s) [1, 2, 3]" in warnings
    assert set(json.loads((results / "clients.json").read_text())) == {"0"}
    assert [row["replies"] for row in comparable_rounds(results)] == [1, 1, 1]


def test_too_few_usable_devices_stop_the_run_with_every_reason(tmp_path):
    values = {**TINY, "method": "fedavg", "min-replies": 4}
    _, folder = split(tmp_path, **values)
    np.savez(folder / "device-001.npz", x=np.zeros((40, 6, 6), np.float32), y=np.arange(40) % 10)
    with pytest.raises(RuntimeError, match="3 usable devices < min-replies=4.*device-001"):
        run_in_process(device_run_config({**values, "results-dir": str(tmp_path)}, folder),
                       node_configs=device_node_configs(folder))


def test_an_unsplit_device_file_is_split_with_the_run_seed(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.random((50, 8, 8), dtype=np.float32), y=np.arange(50) % 10)
    values = {**app_defaults(), "dataset": "devices", "data-path": str(path)}
    data = client_data(RunConfig.from_mapping(values), 5)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    client_data.cache_clear()
    again = client_data(RunConfig.from_mapping(values), 5)
    other = client_data(RunConfig.from_mapping({**values, "seed": 1}), 5)
    assert np.array_equal(data.val.y.numpy(), again.val.y.numpy())
    assert not np.array_equal(data.val.y.numpy(), other.val.y.numpy())


def test_a_save_to_disk_folder_is_a_device_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8), i, dtype=np.uint8)) for i in range(12)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    parts = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images[:8], "label": list(range(8))},
                                            features=features),
        "test": datasets.Dataset.from_dict({"image": images[8:], "label": [8, 9, 0, 1]},
                                           features=features),
    })  # pictures as Hugging Face stores them: PIL images of uint8 pixels
    parts.save_to_disk(str(tmp_path / "hf"))
    own = read_device_file(str(tmp_path / "hf"))
    assert own.splits["train"][0].shape == (8, 1, 8, 8) and len(own.splits["val"][1]) == 0
    assert own.num_classes == 10 and own.splits["test"][0].max() == pytest.approx(11 / 255)


@pytest.mark.parametrize("change, message", [
    ({"data-path": ""}, "dataset='devices' needs data-path"),
    ({"method": "centralized"}, "method='centralized' pools every client's data"),
    ({"method": "sync-distill", "distill.global-test": "clients"},
     "distill.global-test='clients' needs the clients' test sets"),
])
def test_settings_devices_cannot_honour_are_rejected(tmp_path, change, message):
    values = {**app_defaults(), "dataset": "devices", "data-path": str(tmp_path), **change}
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_server_and_device_files_cannot_be_swapped(tmp_path, caplog):
    _, folder = split(tmp_path)
    values = device_run_config({**TINY, "results-dir": str(tmp_path / "r")}, folder)
    with pytest.raises(DataError, match="is a device's file; the server needs server.npz"):
        run_in_process({**values, "data-path": str(folder / "device-000.npz")},
                       node_configs=device_node_configs(folder))
    caplog.set_level(logging.WARNING)
    results = run_in_process(values, node_configs=[
        {"data-path": str(folder / "server.npz"), "device-name": "pi", "partition-id": 0},
        *device_node_configs(folder)[1:]])
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "device 'pi' partition-id=0" in warnings and "is the server's file" in warnings
    assert set(json.loads((results / "clients.json").read_text())) == {"1", "2", "3"}


@pytest.mark.parametrize("content, message", [
    ({"x": np.zeros((5, 8, 8)), "y": np.zeros(4, int)}, "x has 5 samples but y has 4"),
    ({"x": np.full((5, 8, 8), np.nan), "y": np.zeros(5, int)}, "NaN"),
    ({"images": np.zeros((5, 8, 8))}, "expected arrays x, y"),
    ({"x": np.zeros((5, 8, 8)), "y": np.arange(5), "num_classes": 3}, "labels go up to 4"),
])
def test_malformed_device_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(DataError, match=f"data-path='{path}'.*{message}"):
        read_device_file(str(path))


def test_split_and_deploy_commands_report_bad_input_in_one_line(tmp_path, capsys):
    """The split command as a subprocess (its one wiring test); the deploy command's own
    subprocess test is test_exit_status::test_the_commands_refuse_bad_data_with_exit_2."""
    done = subprocess.run([PYTHON, "-m", "fedapps.data.split", "--out", str(tmp_path), "--set",
                           "dataset='devices'", "--set", f"data-path='{tmp_path}'"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    code = exit_on_bad_input(lambda: deploy_main(["--devices", str(tmp_path / "none")]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --devices "), err
