"""Data sets by name, each loaded whole into memory as numpy arrays.

Every loader returns a :class:`Dataset` whose sample order is fixed, so a partition is just lists
of indices into it (see :mod:`fedapps.data.partition`). Data sets with separate train/test splits
are concatenated in a documented order (``index_space``) so one index space covers everything.

Hub data sets load through Hugging Face ``datasets`` (what flwr-datasets builds on) by their ids;
``data-path`` points at a local copy instead (a folder written by ``Dataset.save_to_disk`` or, for
CIFAR-10, torchvision's ``cifar-10-batches-py`` folder), so runs work offline once fetched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedapps.data.base import DataError, Dataset, hf_table, labelled_arrays
from fedapps.data.devices import load_device_file
from fedapps.data.shapes import NUM_SAMPLES, SEED, make_shapes

# LEAF's Shakespeare alphabet: the index of a character is its class.
SHAKESPEARE_LETTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)


def load_digits(data_path: str = "") -> Dataset:
    """scikit-learn's 8x8 handwritten digits: ships with the package, needs no network."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return Dataset("digits", x, bunch.target.astype(np.int64), 10)


def load_digits28(data_path: str = "") -> Dataset:
    """The same digits, bilinearly upsampled to 28x28: MNIST/FEMNIST's shape and compute cost.

    No new information (8x8 pixels underneath), so it tests code paths and round times at the
    size of real handwriting data, not a harder task.
    """
    import torch
    import torch.nn.functional as F

    small = load_digits()
    x = F.interpolate(torch.from_numpy(small.x), size=(28, 28), mode="bilinear",
                      align_corners=False)
    return Dataset("digits28", x.numpy(), small.y, small.num_classes)


def load_shapes(data_path: str = "") -> Dataset:
    """Procedurally generated 10-class 3x32x32 colour shapes (:mod:`fedapps.data.shapes`)."""
    x, y = make_shapes(NUM_SAMPLES, SEED)
    return Dataset("shapes", x, y, 10,
                   index_space=f"fedapps.data.shapes.make_shapes({NUM_SAMPLES}, seed={SEED})")


def load_npz(data_path: str) -> Dataset:
    """Bring your own: ``.npz`` with ``x`` (images or int sequences), ``y``, optional ``groups``."""
    if not data_path:
        raise DataError("dataset='npz' needs data-path pointing at an .npz file with x and y")
    try:
        arrays = np.load(data_path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"data-path='{data_path}': not a readable .npz file ({error})") from None
    missing = {"x", "y"} - set(arrays.files)
    if missing:
        raise DataError(
            f"data-path='{data_path}': missing array(s) {sorted(missing)}; found {arrays.files}"
        )
    features, labels, num_classes = labelled_arrays(arrays["x"], arrays["y"],
                                                    f"data-path='{data_path}'")
    groups = arrays["groups"] if "groups" in arrays.files else None
    return Dataset("npz", features, labels, num_classes, groups)


def load_cifar10(data_path: str = "") -> Dataset:
    """CIFAR-10 (``uoft-cs/cifar10``), train then test split; or torchvision's local folder."""
    folder = Path(data_path) if data_path else None
    if folder is not None and _is_torchvision_cifar(folder):
        from torchvision.datasets import CIFAR10

        root = folder.parent if folder.name == "cifar-10-batches-py" else folder
        parts = [CIFAR10(str(root), train=train, download=False) for train in (True, False)]
        images = np.concatenate([part.data for part in parts])
        labels = np.concatenate([np.asarray(part.targets) for part in parts])
    else:
        table = hf_table("uoft-cs/cifar10", data_path)
        images = np.stack([np.asarray(img.convert("RGB")) for img in table["img"]])
        labels = np.asarray(table["label"])
    x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
    return Dataset(
        "cifar10",
        x.transpose(0, 3, 1, 2).copy(),
        labels.astype(np.int64),
        10,
        index_space="CIFAR-10 train split (50,000) followed by its test split (10,000)",
    )


def load_femnist(data_path: str = "") -> Dataset:
    """FEMNIST (``flwrlabs/femnist``): 62 classes, natural clients = writers."""
    table = hf_table("flwrlabs/femnist", data_path)
    images = np.stack([np.asarray(img.convert("L")) for img in table["image"]])
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    _, writers = np.unique(np.asarray(table["writer_id"]), return_inverse=True)
    return Dataset(
        "femnist", x, np.asarray(table["character"], dtype=np.int64), 62, writers,
        index_space="flwrlabs/femnist splits concatenated, train first, then by name",
    )


def load_shakespeare(data_path: str = "") -> Dataset:
    """Shakespeare (``flwrlabs/shakespeare``): next character of an 80-character line."""
    table = hf_table("flwrlabs/shakespeare", data_path)
    lookup = {char: index for index, char in enumerate(SHAKESPEARE_LETTERS)}
    unknown = len(SHAKESPEARE_LETTERS) - 1  # rare characters map to the last symbol

    def encode(text: str) -> list[int]:
        return [lookup.get(char, unknown) for char in text]

    x = np.asarray([encode(text) for text in table["x"]], dtype=np.int64)
    y = np.asarray([encode(char)[0] for char in table["y"]], dtype=np.int64)
    _, characters = np.unique(np.asarray(table["character_id"]), return_inverse=True)
    return Dataset(
        "shakespeare", x, y, len(SHAKESPEARE_LETTERS), characters,
        index_space="flwrlabs/shakespeare splits concatenated, train first, then by name",
    )


# Shipped with a package or generated: they read no file, so a data-path given with them would
# be ignored while the run's config names it (the config refuses that pairing).
BUILT_IN = frozenset({"digits", "digits28", "shapes"})

DATASETS: dict[str, Callable[[str], Dataset]] = {
    "digits": load_digits,
    "digits28": load_digits28,
    "shapes": load_shapes,
    "cifar10": load_cifar10,
    "femnist": load_femnist,
    "shakespeare": load_shakespeare,
    "npz": load_npz,
    "devices": load_device_file,
}


def load_dataset(name: str, data_path: str = "") -> Dataset:
    """The data set ``name``; whatever stops it loading (a missing file, a malformed one, a Hub
    that cannot be reached) is a one-line DataError naming the data set and the path."""
    if name not in DATASETS:
        raise DataError(f"dataset='{name}' is not known; allowed: {', '.join(DATASETS)}")
    try:
        return DATASETS[name](data_path)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - a loader's failure is the data's problem here
        where = f" from data-path='{data_path}'" if data_path else ""
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise DataError(f"dataset='{name}' could not be loaded{where}: {reason}") from None


def _is_torchvision_cifar(folder: Path) -> bool:
    return (folder / "data_batch_1").exists() or (
        folder / "cifar-10-batches-py" / "data_batch_1"
    ).exists()
