"""flwr-datasets: the two-level Dirichlet as a ``Partitioner``, natural ids, the stored split.

Everything here runs offline: data sets are built in memory (``datasets.Dataset.from_dict``) or
read from a local parquet file, never from the Hugging Face hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import NaturalIdPartitioner
from scipy import stats

from fedapps.config import RunConfig
from fedapps.data.federated import partition_for
from fedapps.data.flwr_partitioner import TwoLevelDirichletPartitioner
from fedapps.data.partition import (
    _natural,
    draw_server_pool,
    load_partition,
    make_partition,
    save_partition,
    two_level_dirichlet,
)
from fedapps.data.registry import Dataset, load_digits

# Written by the code *before* the two-level Dirichlet was shared with the Partitioner:
#   RunConfig.from_mapping({"dataset": "digits", "partitioner": "dirichlet",
#                           "num-clients": 10, "seed": 3})  ->  partition_for  ->  save_partition
# with the defaults of that time, spelled out in STORED_SETTINGS.
STORED_FILE = Path(__file__).parent / "data" / "partition-digits-dirichlet-seed3.json"
STORED_SETTINGS = {
    "num_clients": 10,
    "partitioner": "dirichlet",
    "alpha_label": 0.5,
    "alpha_size": 10.0,
    "unlabeled_size": -1,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "min_client_samples": 10,
    "seed": 3,
}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


@pytest.fixture(scope="module")
def hf_digits(digits) -> datasets.Dataset:
    """The digits as a Hugging Face data set, with each row's fedapps index in 'idx'."""
    return datasets.Dataset.from_dict({
        "pixels": digits.x.reshape(len(digits), -1),
        "label": digits.y,
        "idx": np.arange(len(digits)),
    })


@pytest.fixture(scope="module")
def stored() -> dict:
    return json.loads(STORED_FILE.read_text())


def client_members(client) -> list[int]:
    """A client's samples before its train/val/test split, sorted."""
    return sorted(client["train"] + client["val"] + client["test"])


def partitioner_for(dataset: datasets.Dataset, **settings) -> TwoLevelDirichletPartitioner:
    partitioner = TwoLevelDirichletPartitioner(**settings)
    partitioner.dataset = dataset
    return partitioner


# ------------------------------------------------------------------ the stored partition file


def test_todays_code_writes_the_stored_file_bit_for_bit(digits, stored, tmp_path):
    partition = make_partition(digits, **STORED_SETTINGS)
    path = save_partition(partition, digits, tmp_path / "again.json")
    assert path.read_bytes() == STORED_FILE.read_bytes()
    # ... and list by list, so a failure says where it differs
    again = json.loads(path.read_text())
    assert again["unlabeled"] == stored["unlabeled"]
    assert len(again["clients"]) == len(stored["clients"]) == 10
    for number, (ours, theirs) in enumerate(zip(again["clients"], stored["clients"], strict=True)):
        for split in ("train", "val", "test"):
            assert ours[split] == theirs[split], f"client {number} {split}"


def test_run_config_path_gives_the_stored_file(digits, stored):
    config = RunConfig.from_mapping({
        "dataset": "digits", "partitioner": "dirichlet", "num-clients": 10, "seed": 3,
        "alpha-label": 0.5, "alpha-size": 10.0, "unlabeled-size": -1, "val-fraction": 0.2,
        "test-fraction": 0.2, "min-client-samples": 10,
    })
    assert partition_for(config).to_json_dict(digits) == stored


def test_stored_file_loads_back(digits, stored):
    partition = load_partition(STORED_FILE, digits)
    assert partition.unlabeled.tolist() == stored["unlabeled"]
    for client, theirs in zip(partition.clients, stored["clients"], strict=True):
        assert client.train.tolist() == theirs["train"]
        assert client.val.tolist() == theirs["val"]
        assert client.test.tolist() == theirs["test"]


# ------------------------------------------------------------ the Partitioner = fedapps' split


def test_partitioner_reproduces_the_stored_clients(hf_digits, stored):
    """With fedapps' server pool (-1) and the file's seed, partition i = stored client i."""
    partitioner = partitioner_for(
        hf_digits, num_partitions=10, alpha_label=0.5, alpha_size=10.0, min_partition_size=10,
        server_pool_size=-1, seed=3,
    )
    assert partitioner.server_pool_indices.tolist() == stored["unlabeled"]
    assert partitioner.load_server_pool()["idx"] == stored["unlabeled"]
    for partition_id, client in enumerate(stored["clients"]):
        rows = partitioner.load_partition(partition_id)
        assert rows["idx"] == client_members(client), f"partition {partition_id}"
        assert np.array_equal(rows["label"], np.asarray(hf_digits["label"])[rows["idx"]])


@pytest.mark.parametrize(
    ("seed", "alpha_label", "alpha_size", "pool"),
    [(0, 0.5, 10.0, 0), (1, 0.1, 1.0, 0), (7, 100.0, 10.0, 200), (11, 0.5, 10.0, -1)],
)
def test_partitioner_equals_make_partition_and_the_shared_function(
    digits, hf_digits, seed, alpha_label, alpha_size, pool
):
    settings = {"alpha_label": alpha_label, "alpha_size": alpha_size}
    partitioner = partitioner_for(
        hf_digits, num_partitions=8, min_partition_size=1, server_pool_size=pool, seed=seed,
        **settings,
    )
    # 1. the shared functions, called directly on the same labels and seed
    rng = np.random.default_rng(seed)
    unlabeled, remaining = draw_server_pool(len(digits), pool, 8, rng)
    shards = two_level_dirichlet(digits.y, remaining, 8, alpha_label, alpha_size, rng)
    # 2. fedapps' clients, before their train/val/test split
    partition = make_partition(
        digits, num_clients=8, partitioner="dirichlet", unlabeled_size=pool,
        min_client_samples=1, seed=seed, **settings,
    )
    assert np.array_equal(partitioner.server_pool_indices, unlabeled)
    assert np.array_equal(partition.unlabeled, unlabeled)
    for partition_id in range(8):
        ours = partitioner.partition_id_to_indices[partition_id]
        client = partition.clients[partition_id]
        assert np.array_equal(ours, np.sort(shards[partition_id]))
        assert np.array_equal(ours, np.sort(np.concatenate([client.train, client.val,
                                                              client.test])))


@pytest.mark.parametrize("pool", [0, 300])
def test_every_sample_in_at_most_one_partition(hf_digits, pool):
    partitioner = partitioner_for(hf_digits, num_partitions=12, alpha_label=0.2,
                                  min_partition_size=1, server_pool_size=pool, seed=5)
    parts = [partitioner.load_partition(i)["idx"] for i in range(12)]
    used = np.concatenate([*parts, partitioner.load_server_pool()["idx"]])
    assert len(np.unique(used)) == len(used)  # no sample twice
    assert len(used) == len(hf_digits)  # and none lost
    assert len(partitioner.server_pool_indices) == pool
    assert partitioner.num_partitions == 12


def test_sizes_follow_the_size_dirichlet():
    """Each partition's share of the data ~ Beta(a, (K-1) a), the marginal of Dir(a, ..., a)."""
    num_partitions, num_rows = 10, 2000
    labels = datasets.Dataset.from_dict({"label": np.arange(num_rows) % 10})
    for alpha_size in (2.0, 10.0):
        shares = []
        for seed in range(150):
            partitioner = partitioner_for(labels, num_partitions=num_partitions,
                                          alpha_size=alpha_size, min_partition_size=1, seed=seed)
            sizes = [len(partitioner.partition_id_to_indices[i]) for i in range(num_partitions)]
            assert sum(sizes) == num_rows
            shares += [size / num_rows for size in sizes]
        marginal = stats.beta(alpha_size, (num_partitions - 1) * alpha_size)
        assert np.mean(shares) == pytest.approx(1 / num_partitions)
        assert np.var(shares) == pytest.approx(marginal.var(), rel=0.2)
        assert stats.kstest(shares, marginal.cdf).pvalue > 0.01


def test_smaller_alpha_label_gives_fewer_classes_per_partition(hf_digits):
    def classes_per_partition(alpha_label):
        partitioner = partitioner_for(hf_digits, num_partitions=10, alpha_label=alpha_label,
                                      min_partition_size=1, seed=0)
        return np.mean([len(np.unique(partitioner.load_partition(i)["label"]))
                        for i in range(10)])

    assert classes_per_partition(0.05) < classes_per_partition(100.0) - 3


def test_string_labels_are_numbered_in_sorted_order(digits, hf_digits):
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    named = datasets.Dataset.from_dict({"name": names[digits.y], "idx": np.arange(len(digits))})
    by_name = partitioner_for(named, num_partitions=6, partition_by="name", seed=2)
    # the same split as integer labels numbered by the names' sorted order
    rank = {name: rank for rank, name in enumerate(sorted(names))}
    ranked = datasets.Dataset.from_dict({"label": [rank[n] for n in names[digits.y]]})
    by_rank = partitioner_for(ranked, num_partitions=6, seed=2)
    for i in range(6):
        assert np.array_equal(by_name.partition_id_to_indices[i],
                              by_rank.partition_id_to_indices[i])


def test_rows_are_positions_in_the_data_set_it_is_given(digits, hf_digits):
    """After FederatedDataset's shuffle (or any select), indices are positions in that order."""
    shuffled = hf_digits.shuffle(seed=1)
    partitioner = partitioner_for(shuffled, num_partitions=5, seed=4)
    order = np.asarray(shuffled["idx"])
    rng = np.random.default_rng(4)
    _, remaining = draw_server_pool(len(order), 0, 5, rng)
    shards = two_level_dirichlet(digits.y[order], remaining, 5, 0.5, 10.0, rng)
    for i, shard in enumerate(shards):
        assert partitioner.load_partition(i)["idx"] == order[np.sort(shard)].tolist()


def test_labels_must_be_one_value_per_row():
    nested = datasets.Dataset.from_dict({"label": [[0, 1], [1, 0], [0, 0]]})
    with pytest.raises(ValueError, match="expected one label per row"):
        partitioner_for(nested, num_partitions=1).load_partition(0)
    missing = datasets.Dataset.from_dict({"label": [0, None, 1]})
    with pytest.raises(ValueError, match="1 missing labels"):
        partitioner_for(missing, num_partitions=1).load_partition(0)
    negative = datasets.Dataset.from_dict({"label": [0, -1, 1]})
    with pytest.raises(ValueError, match="negative labels"):
        partitioner_for(negative, num_partitions=1).load_partition(0)


def test_too_small_partition_is_an_error_not_a_redraw(hf_digits):
    partitioner = partitioner_for(hf_digits, num_partitions=40, alpha_size=0.3,
                                  min_partition_size=50, seed=0)
    with pytest.raises(ValueError, match=r"partition \d+ got \d+ samples, fewer than "
                                         r"min_partition_size=50"):
        partitioner.load_partition(0)


def test_bad_arguments_are_named(hf_digits):
    with pytest.raises(ValueError, match="num_partitions=0"):
        TwoLevelDirichletPartitioner(num_partitions=0)
    with pytest.raises(ValueError, match="alpha_label=0"):
        TwoLevelDirichletPartitioner(num_partitions=3, alpha_label=0)
    with pytest.raises(ValueError, match="server_pool_size=-2"):
        TwoLevelDirichletPartitioner(num_partitions=3, server_pool_size=-2)
    with pytest.raises(ValueError, match="partition_by='target' is not a column"):
        partitioner_for(hf_digits, num_partitions=3, partition_by="target").load_partition(0)
    with pytest.raises(ValueError, match="partition_id=3: there are 3 partitions"):
        partitioner_for(hf_digits, num_partitions=3).load_partition(3)
    with pytest.raises(ValueError, match="num_partitions=5000.*num-clients=5000 is more than"):
        partitioner_for(hf_digits, num_partitions=5000).load_partition(0)


def test_through_federated_dataset_from_a_local_file(hf_digits, stored, tmp_path):
    """FederatedDataset itself, offline: a local parquet file instead of a hub id."""
    path = tmp_path / "digits.parquet"
    hf_digits.to_parquet(str(path))
    partitioner = TwoLevelDirichletPartitioner(
        num_partitions=10, alpha_label=0.5, alpha_size=10.0, min_partition_size=10,
        server_pool_size=-1, seed=3,
    )
    fds = FederatedDataset(
        dataset="parquet", data_files={"train": str(path)}, partitioners={"train": partitioner},
        shuffle=False, cache_dir=str(tmp_path / "cache"),
    )
    for partition_id in (0, 9):
        rows = fds.load_partition(partition_id)
        assert rows["idx"] == client_members(stored["clients"][partition_id])
    assert fds.partitioners["train"].load_server_pool()["idx"] == stored["unlabeled"]


def test_merged_splits_give_fedapps_index_space(hf_digits, stored, tmp_path):
    """fedapps concatenates a hub set's splits (train first); Merger + shuffle=False does too."""
    files = {}
    for split, rows in (("train", range(0, 1500)), ("test", range(1500, len(hf_digits)))):
        files[split] = str(tmp_path / f"{split}.parquet")
        hf_digits.select(rows).to_parquet(files[split])
    fds = FederatedDataset(
        dataset="parquet", data_files=files, preprocessor={"all": ("train", "test")},
        partitioners={"all": TwoLevelDirichletPartitioner(
            num_partitions=10, min_partition_size=10, server_pool_size=-1, seed=3)},
        shuffle=False, cache_dir=str(tmp_path / "cache"),
    )
    assert fds.load_partition(4, "all")["idx"] == client_members(stored["clients"][4])


# ------------------------------------------------------------------------------- natural ids


@pytest.fixture(scope="module")
def writers():
    """120 handwriting-like rows from 7 writers of unequal output, as fedapps and as HF data."""
    rng = np.random.default_rng(4)
    names = np.array([f"w{number:02d}" for number in (3, 8, 11, 20, 21, 35, 40)])
    writer = names[rng.choice(len(names), size=120, p=[.3, .2, .15, .1, .1, .1, .05])]
    y = rng.integers(0, 5, size=120)
    x = rng.normal(size=(120, 1, 4, 4)).astype(np.float32)
    ids, groups = np.unique(writer, return_inverse=True)  # as the femnist loader numbers them
    ours = Dataset("writers", x, y.astype(np.int64), 5, groups)
    theirs = datasets.Dataset.from_dict(
        {"pixels": x.reshape(120, -1), "label": y, "writer": writer, "idx": np.arange(120)}
    )
    return ids, ours, theirs


def test_natural_ids_through_natural_id_partitioner(writers):
    ids, ours, theirs = writers
    partitioner = NaturalIdPartitioner(partition_by="writer")
    partitioner.dataset = theirs
    assert partitioner.num_partitions == len(ids)
    flower = {
        partitioner.partition_id_to_natural_id[pid]: partitioner.load_partition(pid)["idx"]
        for pid in range(partitioner.num_partitions)
    }
    # fedapps' natural partitioner, all ids and no server pool: the same groups, but clients
    # in a random order (a seeded choice of ids) instead of sorted by id
    shards = _natural(ours, np.arange(len(ours)), len(ids), np.random.default_rng(0))
    fedapps = {str(ids[ours.groups[shard[0]]]): shard.tolist() for shard in shards}
    assert fedapps == flower
    assert sorted(flower) == ids.tolist()  # partition id = rank of the writer id


def test_natural_ids_match_make_partition_clients(writers):
    ids, ours, theirs = writers
    partitioner = NaturalIdPartitioner(partition_by="writer")
    partitioner.dataset = theirs
    flower = {frozenset(partitioner.load_partition(pid)["idx"])
              for pid in range(partitioner.num_partitions)}
    partition = make_partition(ours, num_clients=len(ids), partitioner="natural",
                               unlabeled_size=0, min_client_samples=1, seed=9)
    fedapps = {frozenset(np.concatenate([c.train, c.val, c.test]).tolist())
               for c in partition.clients}
    assert fedapps == flower
