"""Data that lives on the devices: one file per SuperNode, one for the server.

A real device holds only its own samples, and a real server none of the clients'. With
``dataset = "devices"`` each SuperNode's node config names its own file (``data-path=...``) and
the run's ``data-path`` names the server's file: the unlabeled pool (FedMe clusters on it, the
distillation server distils on it and tests on its held-out part, hence its labels).
:func:`write_device_files` (``python -m fedapps.data.split``) makes both from any data set and
partition, so a deployment is rehearsed exactly as it will run.

A device's file is an ``.npz`` with ``x`` and ``y`` (split into train/val/test with the run's
``val-fraction``, ``test-fraction`` and seed), or already split: ``x_train``, ``y_train``,
``x_val``, ``y_val``, ``x_test``, ``y_test``; optional ``num_classes`` (else the largest label
+ 1) and ``partition_id`` (else the node config's). Or a ``save_to_disk`` folder: one split, or
``train`` / ``validation`` (or ``val``) / ``test``, with an image column (``x``, ``image``,
``img``) and a label column (``y``, ``label``, ``labels``). The server's file is an ``.npz`` with
``role = "server"``, ``x``, ``y`` and ``num_classes``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedapps.data.base import DataError, Dataset, labelled_arrays, load_from_disk

SPLITS = ("train", "val", "test")
SERVER_ROLE = "server"
FEATURE_COLUMNS = ("x", "image", "img")
LABEL_COLUMNS = ("y", "label", "labels")
HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}

Pair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class DeviceFile:
    """One file's samples, already split into train/val/test (``splits``) or not."""

    path: str
    x: np.ndarray  # every sample, the splits concatenated in SPLITS order
    y: np.ndarray
    num_classes: int
    splits: dict[str, Pair] | None
    partition_id: int | None
    role: str  # "device" or SERVER_ROLE

    def as_dataset(self) -> Dataset:
        return Dataset("devices", self.x, self.y, self.num_classes,
                       index_space=f"the samples of {self.path}")


def load_device_file(data_path: str) -> Dataset:
    """``dataset = "devices"``: the file this process was given (a device's or the server's)."""
    if not data_path:
        raise DataError("dataset='devices' needs data-path: the server's file on the server "
                        "(python -m fedapps.data.split), each device's own file in its node config")
    return read_device_file(data_path).as_dataset()


@functools.lru_cache(maxsize=8)
def read_device_file(path: str) -> DeviceFile:
    """Read and check a device's (or the server's) file, once per process (the data set and the
    client's splits both come from it); every error names the file."""
    source = f"data-path='{path}'"
    if Path(path).is_dir():
        pairs, extras = _from_disk(path, source), {}
    else:
        pairs, extras = _from_npz(path, source)
    checked = {}
    implied = 0
    for name, (x, y) in pairs.items():
        features, labels, classes = labelled_arrays(x, y, f"{source} {name}")
        checked[name] = (features, labels)
        implied = max(implied, classes if len(labels) else 0)
    shapes = {features.shape[1:] for features, _ in checked.values()}
    if len(shapes) > 1:
        raise DataError(f"{source}: the splits hold samples of different shapes {sorted(shapes)}")
    num_classes = int(extras.get("num_classes", implied))
    if num_classes < implied:
        raise DataError(f"{source}: labels go up to {implied - 1} but num_classes={num_classes}")
    role = str(extras.get("role", "device"))
    x = np.concatenate([features for features, _ in checked.values()])
    y = np.concatenate([labels for _, labels in checked.values()])
    pid = extras.get("partition_id")
    return DeviceFile(path, x, y, num_classes, None if "all" in checked else checked,
                      None if pid is None else int(pid), role)


def _from_npz(path: str, source: str) -> tuple[dict[str, Pair], dict[str, object]]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{source}: not a readable .npz file ({error})") from None
    files = set(arrays.files)
    extras = {key: arrays[key].item() for key in ("num_classes", "partition_id", "role")
              if key in files}
    if {"x_train", "y_train"} <= files:
        train = (arrays["x_train"], arrays["y_train"])
        empty = (train[0][:0], train[1][:0])
        pairs = {name: (arrays[f"x_{name}"], arrays[f"y_{name}"])
                 if {f"x_{name}", f"y_{name}"} <= files else empty for name in SPLITS}
        return pairs, extras
    if {"x", "y"} <= files:
        return {"all": (arrays["x"], arrays["y"])}, extras
    raise DataError(f"{source}: expected arrays x, y (or x_train, y_train, ...); found "
                    f"{sorted(files)}")


def _from_disk(path: str, source: str) -> dict[str, Pair]:
    import datasets

    loaded = load_from_disk(path)
    if not isinstance(loaded, datasets.DatasetDict):
        return {"all": _columns(loaded, source)}
    found = {name: next((loaded[s] for s in names if s in loaded), None)
             for name, names in HF_SPLIT_NAMES.items()}
    if found["train"] is None:
        raise DataError(f"{source}: a folder with several splits needs a 'train' split; found "
                        f"{sorted(loaded)}")
    train = _columns(found["train"], f"{source} train")
    empty = (train[0][:0], train[1][:0])
    return {name: _columns(split, f"{source} {name}") if split is not None else empty
            for name, split in found.items()}


def _columns(table, source: str) -> Pair:
    """The image and label columns of a Hugging Face table as arrays (images scaled to 0..1)."""
    feature = next((c for c in FEATURE_COLUMNS if c in table.column_names), None)
    label = next((c for c in LABEL_COLUMNS if c in table.column_names), None)
    if feature is None or label is None:
        raise DataError(f"{source}: expected an image column ({', '.join(FEATURE_COLUMNS)}) and a "
                        f"label column ({', '.join(LABEL_COLUMNS)}); found {table.column_names}")
    arrays = table.with_format("numpy")
    x = np.asarray(arrays[feature])
    if x.dtype == np.uint8:  # pictures: the 0..255 pixels every image loader gives
        x = x.astype(np.float32) / 255.0
    return x, np.asarray(arrays[label], dtype=np.int64)


def node_config_line(node_config: Mapping[str, object]) -> str:
    """``--node-config`` for ``flower-supernode``: Flower parses each value as TOML, so anything
    but a number or a bool (paths, names) is quoted: ``data-path="/data/device-000.npz"``."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in node_config.items())


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if '"' in str(value):  # Flower's parser ends a quoted value at the next quote, escaped or not
        raise DataError(f"node config value {value!r}: Flower cannot pass a double quote")
    return json.dumps(str(value))


def write_device_file(path: Path, splits: dict[str, Pair], num_classes: int,
                      partition_id: int) -> None:
    """A device's file, already split (what :func:`read_device_file` reads back exactly)."""
    arrays = {f"{axis}_{name}": pair[index] for name, pair in splits.items()
              for index, axis in enumerate(("x", "y"))}
    np.savez(path, **arrays, num_classes=num_classes, partition_id=partition_id)


def write_server_file(path: Path, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """The server's file: the unlabeled pool (with labels, for the distillation server's test)."""
    np.savez(path, role=SERVER_ROLE, x=x, y=y, num_classes=num_classes)
