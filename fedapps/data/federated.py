"""Data sets, partitions and the per-client tensors the training code consumes.

Everything is cached per process: a Flower ClientApp process loads the data set and computes the
partition once, then serves every message of the run from memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedapps.config import RunConfig
from fedapps.data.partition import (
    ClientSplit,
    Partition,
    load_partition,
    make_partition,
    save_partition,
)
from fedapps.data.registry import DATASETS, DataError, Dataset, load_dataset

__all__ = [
    "DATASETS",
    "ClientData",
    "ClientSplit",
    "DataError",
    "Dataset",
    "Partition",
    "client_data",
    "dataset_for",
    "load_dataset",
    "load_partition",
    "make_partition",
    "partition_for",
    "save_partition",
    "unlabeled_inputs",
]


@dataclass(frozen=True, eq=False)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class ClientData:
    train: Split
    val: Split
    test: Split


@functools.lru_cache(maxsize=4)
def dataset_for(name: str, data_path: str = "") -> Dataset:
    return load_dataset(name, data_path)


@functools.lru_cache(maxsize=8)
def partition_for(config: RunConfig) -> Partition:
    dataset = dataset_for(config.dataset, config.data_path)
    if config.partition_file:
        return load_partition(config.partition_file, dataset)
    return make_partition(
        dataset,
        num_clients=config.num_clients,
        partitioner=config.partitioner,
        alpha_label=config.alpha_label,
        alpha_size=config.alpha_size,
        unlabeled_size=config.unlabeled_size,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        min_client_samples=config.min_client_samples,
        seed=config.seed,
    )


def _tensors(dataset: Dataset, indices: np.ndarray) -> Split:
    return Split(torch.from_numpy(dataset.x[indices]), torch.from_numpy(dataset.y[indices]))


@functools.lru_cache(maxsize=256)
def client_data(config: RunConfig, partition_id: int) -> ClientData:
    partition = partition_for(config)
    if not 0 <= partition_id < partition.num_clients:
        raise DataError(
            f"partition-id={partition_id} but the partition has {partition.num_clients} "
            "clients (check num-clients / the SuperNode's node config)"
        )
    dataset = dataset_for(config.dataset, config.data_path)
    split = partition.clients[partition_id]
    return ClientData(
        _tensors(dataset, split.train), _tensors(dataset, split.val), _tensors(dataset, split.test)
    )


def unlabeled_inputs(config: RunConfig) -> torch.Tensor:
    """The server's unlabeled pool U (inputs only): FedMe clusters on it, distillation uses it."""
    dataset = dataset_for(config.dataset, config.data_path)
    return torch.from_numpy(dataset.x[partition_for(config).unlabeled])
