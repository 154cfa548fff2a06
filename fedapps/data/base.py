"""What every data module shares: the in-memory data set and the error for unusable data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Data that cannot be used: missing files, malformed arrays, impossible partitions."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Features, labels and optional natural client ids (writer, character) of one data set."""

    name: str
    x: np.ndarray  # float32 images (N, C, H, W) or int64 token sequences (N, L)
    y: np.ndarray  # int64 labels (N,)
    num_classes: int
    groups: np.ndarray | None = None  # natural id per sample, for the 'natural' partitioner
    index_space: str = "sample order of the data set"

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_sequence(self) -> bool:
        return self.x.ndim == 2


def labelled_arrays(
    x: np.ndarray, y: np.ndarray, source: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(features, labels, classes the labels imply)`` from raw arrays, checked: images become
    float32 channels-first and finite, integer ``(N, L)`` arrays stay token sequences."""
    if len(x) != len(y):
        raise DataError(f"{source}: x has {len(x)} samples but y has {len(y)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{source}: y must be a 1-D array of labels >= 0")
    if np.issubdtype(x.dtype, np.integer) and x.ndim == 2:
        features = x.astype(np.int64)  # token sequences
        num_classes = int(max(y.max(initial=0), x.max(initial=0))) + 1
    else:
        features = as_channels_first(x.astype(np.float32), source)
        if not np.isfinite(features).all():
            raise DataError(f"{source}: x contains NaN or infinite values")
        num_classes = int(y.max(initial=0)) + 1
    return features, y.astype(np.int64), num_classes


def as_channels_first(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        return x if x.shape[1] in (1, 3) else x.transpose(0, 3, 1, 2).copy()
    raise DataError(
        f"{source}: x has shape {x.shape}; expected images (N,H,W), (N,C,H,W), (N,H,W,C) "
        "or integer sequences (N,L)"
    )


def load_from_disk(data_path: str):
    """A folder written by Hugging Face ``datasets``' ``save_to_disk``, or a one-line error."""
    import datasets

    try:
        return datasets.load_from_disk(data_path)
    except FileNotFoundError as error:
        raise DataError(
            f"data-path='{data_path}': not a folder written by datasets' save_to_disk ({error})"
        ) from None


def hf_table(hub_id: str, data_path: str):
    """All splits of a Hub data set (or a save_to_disk copy): train first, then by name."""
    import datasets

    loaded = load_from_disk(data_path) if data_path else datasets.load_dataset(hub_id)
    if isinstance(loaded, datasets.DatasetDict):
        order = sorted(loaded, key=lambda split: (split != "train", split))
        loaded = datasets.concatenate_datasets([loaded[split] for split in order])
    return loaded
