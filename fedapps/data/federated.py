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
from fedapps.data.devices import read_device_file
from fedapps.data.partition import (
    ClientSplit,
    Partition,
    load_partition,
    make_partition,
    save_partition,
    split_client,
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
    "num_clients_of",
    "partition_for",
    "save_partition",
    "server_pool",
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


def num_clients_of(config: RunConfig) -> int:
    """Clients of the run: the partition's, or the devices the run expects (``num-clients``)."""
    return config.num_clients if config.dataset == "devices" else partition_for(config).num_clients


@functools.lru_cache(maxsize=8)
def partition_for(config: RunConfig) -> Partition:
    """How one data set is shared out; with ``dataset = "devices"`` the data is already out there,
    and there is no partition."""
    if config.dataset == "devices":
        raise DataError("dataset='devices': each device holds its own data; there is no partition")
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
    """This client's train/val/test: its partition's indices, or its own file on a device."""
    if config.dataset == "devices":
        return _device_data(config, partition_id)
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


def _device_data(config: RunConfig, partition_id: int) -> ClientData:
    """A device's own file, split with the run's fractions and seed when it is not split yet."""
    own = read_device_file(config.data_path)
    if own.role != "device":
        raise DataError(
            f"data-path='{config.data_path}' is the server's file; start the SuperNode with "
            "--node-config 'data-path=<its own device file>'"
        )
    if len(own.y) < max(config.min_client_samples, 1):
        raise DataError(f"data-path='{config.data_path}': {len(own.y)} samples, fewer than "
                        f"min-client-samples={config.min_client_samples}")
    splits = own.splits
    if splits is None:
        rng = np.random.default_rng([config.seed, partition_id])
        split = split_client(partition_id, np.arange(len(own.y)), config.val_fraction,
                             config.test_fraction, config.min_client_samples, rng)
        splits = {name: (own.x[getattr(split, name)], own.y[getattr(split, name)])
                  for name in ("train", "val", "test")}
    if not len(splits["train"][1]):
        raise DataError(f"data-path='{config.data_path}': no training samples")
    return ClientData(*(Split(torch.from_numpy(x), torch.from_numpy(y))
                        for x, y in (splits[name] for name in ("train", "val", "test"))))


def server_pool(config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """The server's own samples ``(x, y)``: the unlabeled pool U (labels only for the
    distillation server's test), from the partition or, with devices, the server's file."""
    if config.dataset == "devices":
        own = read_device_file(config.data_path)
        if own.role != "server":
            raise DataError(f"data-path='{config.data_path}' is a device's file; the server "
                            "needs server.npz from python -m fedapps.data.split")
        return own.x, own.y
    dataset = dataset_for(config.dataset, config.data_path)
    pool = partition_for(config).unlabeled
    return dataset.x[pool], dataset.y[pool]


def unlabeled_inputs(config: RunConfig) -> torch.Tensor:
    """The server's unlabeled pool U (inputs only): FedMe clusters on it, distillation uses it."""
    return torch.from_numpy(server_pool(config)[0])
