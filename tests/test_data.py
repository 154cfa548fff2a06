import json

import numpy as np
import pytest
from flwr.app import RecordDict

from fedapps.client import describe
from fedapps.config import RunConfig
from fedapps.data.federated import (
    DataError,
    client_data,
    load_dataset,
    load_partition,
    make_partition,
    save_partition,
)
from fedapps.data.shapes import SHAPES, make_shapes
from fedapps.inprocess import run_in_process
from fedapps.protocol.messages import config_record
from fedapps.protocol.results import read_rounds
from tests.helpers import context, message


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def all_indices(partition):
    parts = [partition.unlabeled]
    for client in partition.clients:
        parts += [client.train, client.val, client.test]
    return np.concatenate(parts)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_sizes_add_up_and_no_sample_is_used_twice(digits, partitioner):
    partition = make_partition(digits, num_clients=8, partitioner=partitioner, seed=1)
    used = all_indices(partition)
    assert len(used) == len(digits)  # everything is used exactly once
    assert len(np.unique(used)) == len(used)
    assert len(partition.unlabeled) == int(0.15 * len(digits))
    unlabeled = set(partition.unlabeled.tolist())
    assert all(not unlabeled & set(c.train.tolist() + c.val.tolist() + c.test.tolist())
               for c in partition.clients)


def test_same_seed_same_split_other_seed_other_split(digits):
    first = make_partition(digits, num_clients=5, seed=3)
    again = make_partition(digits, num_clients=5, seed=3)
    other = make_partition(digits, num_clients=5, seed=4)
    assert np.array_equal(all_indices(first), all_indices(again))
    assert not np.array_equal(all_indices(first), all_indices(other))


def label_entropy(dataset, partition) -> float:
    entropies = []
    for client in partition.clients:
        labels = dataset.y[np.concatenate([client.train, client.val, client.test])]
        p = np.bincount(labels, minlength=10) / len(labels)
        p = p[p > 0]
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


def test_smaller_alpha_label_gives_more_label_skew(digits):
    skewed = make_partition(digits, num_clients=10, alpha_label=0.1, seed=0)
    mixed = make_partition(digits, num_clients=10, alpha_label=100.0, seed=0)
    assert label_entropy(digits, skewed) < label_entropy(digits, mixed) - 0.5


def test_smaller_alpha_size_gives_more_unequal_sizes(digits):
    def spread(alpha):
        sizes = [c.size for c in make_partition(
            digits, num_clients=10, alpha_size=alpha, min_client_samples=0, seed=0).clients]
        return np.std(sizes)

    assert spread(0.5) > spread(100.0)


def test_too_few_samples_names_the_client(digits):
    message = r"client \d+ got \d+ samples, fewer than min-client-samples=50"
    with pytest.raises(DataError, match=message):
        make_partition(digits, num_clients=40, alpha_size=0.3, min_client_samples=50, seed=0)


def test_more_clients_than_samples(digits):
    with pytest.raises(DataError, match="num-clients=5000 is more than the"):
        make_partition(digits, num_clients=5000)


def test_natural_partition_uses_ids(npz_images):
    dataset = load_dataset("npz", str(npz_images))
    partition = make_partition(dataset, num_clients=4, partitioner="natural", unlabeled_size=12,
                               min_client_samples=1, seed=0)
    for client in partition.clients:
        members = np.concatenate([client.train, client.val, client.test])
        assert len(np.unique(dataset.groups[members])) == 1


def test_natural_partition_needs_ids(digits):
    with pytest.raises(DataError, match="'digits' has none"):
        make_partition(digits, num_clients=3, partitioner="natural")


def test_npz_loader_shapes(npz_images):
    dataset = load_dataset("npz", str(npz_images))
    assert dataset.input_shape == (1, 6, 6) and dataset.num_classes == 3


def test_npz_loader_rejects_malformed(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 3, 3)), labels=np.zeros(4))
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]"):
        load_dataset("npz", str(path))
    np.savez(path, x=np.zeros((4, 3, 3)), y=np.zeros(5, dtype=int))
    with pytest.raises(DataError, match="x has 4 samples but y has 5"):
        load_dataset("npz", str(path))


def test_client_data_tensors_follow_partition():
    config = RunConfig(num_clients=4)
    data = client_data(config, 2)
    assert data.train.x.shape[1:] == (1, 8, 8)
    assert len(data.train) > len(data.test) > 0
    with pytest.raises(DataError, match="partition-id=7 but the partition has 4 clients"):
        client_data(config, 7)


# ------------------------------------------------------------------ partition files


@pytest.mark.parametrize("name", ["digits", "npz"])
def test_partition_file_round_trip(name, npz_images, tmp_path):
    dataset = load_dataset(name, str(npz_images) if name == "npz" else "")
    partition = make_partition(dataset, num_clients=5, unlabeled_size=10, min_client_samples=5,
                               seed=2)
    path = save_partition(partition, dataset, tmp_path / "split.json")
    loaded = load_partition(path, dataset)
    assert np.array_equal(all_indices(partition), all_indices(loaded))
    content = json.loads(path.read_text())
    assert set(content["clients"][0]) == {"train", "val", "test"}
    assert content["index-space"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["clients"][1]["train"].append(99999), "index 99999, out of range"),
        (lambda c: c["clients"][1]["train"].append(c["clients"][0]["test"][0]),
         "is used twice, in client 0 test and in client 1 train"),
        (lambda c: c["clients"][0]["val"].append(c["unlabeled"][0]),
         "used twice, in the unlabeled pool and in client 0 val"),
        (lambda c: c["clients"][0]["train"].append(c["clients"][0]["train"][0]),
         "used twice, in client 0 train and in client 0 train"),
        (lambda c: c["clients"][2].update(train=[]), "client 2 has an empty train split"),
        (lambda c: c.update({"num-samples": 10}), "was made for 10 samples"),
    ],
)
def test_partition_file_errors_name_client_and_index(digits, tmp_path, edit, message):
    content = make_partition(digits, num_clients=3, seed=0).to_json_dict(digits)
    edit(content)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError) as error:
        load_partition(path, digits)
    assert message in str(error.value)


def test_a_device_reads_its_own_copy_of_the_data(npz_images, tmp_path):
    """A SuperNode's node config may say where its data lives, overriding the run's data-path."""
    server_copy = tmp_path / "server" / "toy.npz"
    server_copy.parent.mkdir()
    server_copy.write_bytes(npz_images.read_bytes())
    run = RunConfig(dataset="npz", data_path=str(server_copy), num_clients=3,
                    unlabeled_size=12, min_client_samples=5)
    query = message(RecordDict({"config": config_record(run)}), "query")
    server_copy.unlink()  # the device does not have the server's path
    with pytest.raises(DataError, match="^partition-id=1: data-path=.* no such file"):
        describe(query, context(1, 3))  # the error names the node
    device = context(1, 3)
    device.node_config["data-path"] = str(npz_images)
    reply = describe(query, device)
    expected = client_data(run.replace(data_path=str(npz_images)), 1)
    assert reply.content["metrics"]["num-examples"] == len(expected.train)


def test_shapes_are_deterministic_balanced_colour_images():
    x, y = make_shapes(200, seed=5)
    again, other = make_shapes(200, seed=5), make_shapes(200, seed=6)
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() >= -1 and x.max() <= 1
    assert np.bincount(y).tolist() == [20] * 10
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    assert not np.array_equal(x, other[0])


def test_every_shape_class_draws_its_own_shape():
    v, u = np.mgrid[-1:1:64j, -1:1:64j]
    masks = [inside(u, v) for _, inside in SHAPES]
    assert all(mask.any() for mask in masks)
    assert len({mask.tobytes() for mask in masks}) == len(SHAPES) == 10


def test_shapes_is_a_registered_data_set():
    shapes = load_dataset("shapes")
    assert len(shapes) == 12_000 and shapes.input_shape == (3, 32, 32)
    assert shapes.num_classes == 10


def test_shapes_needs_one_image_per_class():
    with pytest.raises(ValueError, match="num_samples=5: need at least one image per class"):
        make_shapes(5)


def test_exported_partition_reproduces_the_run():
    """A run's partition.json, given back as partition-file, gives the same clients and the
    same run, whatever the partitioner settings say (the real server and clients, in-process)."""
    settings = {"method": "fedavg", "num-clients": 3, "num-rounds": 1, "model": "cnn1", "seed": 5,
                "alpha-label": 0.3}
    first = run_in_process(settings)
    again = run_in_process({**settings, "partitioner": "iid", "alpha-label": 2.0,
                            "partition-file": str(first / "partition.json")})
    assert (again / "partition.json").read_text() == (first / "partition.json").read_text()
    assert read_rounds(again)[0]["client-accuracy"] == read_rounds(first)[0]["client-accuracy"]
