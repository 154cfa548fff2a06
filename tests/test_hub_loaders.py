"""The hub loaders, run on tiny local copies in the formats users save (no network)."""

import pickle

import numpy as np
import pytest
from PIL import Image

from fedapps.data.federated import DataError, load_dataset, make_partition
from fedapps.data.registry import SHAKESPEARE_LETTERS

datasets = pytest.importorskip("datasets")


def images(count, size, mode):
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    arrays = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(count)]
    return [Image.fromarray(array, mode) for array in arrays]


def test_cifar10_from_save_to_disk(tmp_path):
    table = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"img": images(6, 32, "RGB"), "label": [0, 1, 2] * 2}),
        "test": datasets.Dataset.from_dict({"img": images(2, 32, "RGB"), "label": [9, 9]}),
    })
    table.save_to_disk(tmp_path / "cifar")
    dataset = load_dataset("cifar10", str(tmp_path / "cifar"))
    assert dataset.x.shape == (8, 3, 32, 32) and dataset.num_classes == 10
    assert dataset.y.tolist() == [0, 1, 2, 0, 1, 2, 9, 9]  # train first, then test
    assert dataset.x.min() >= -1.0 and dataset.x.max() <= 1.0


def test_cifar10_from_torchvision_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(name, count):
        data = rng.integers(0, 255, (count, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as stream:
            pickle.dump({"data": data, "labels": list(range(count))}, stream)

    for number in range(1, 6):
        batch(f"data_batch_{number}", 2)
    batch("test_batch", 3)
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, stream)
    import torchvision.datasets.cifar as tv_cifar

    cls = tv_cifar.CIFAR10  # a synthetic copy has other checksums: skip the md5 checks
    monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    dataset = load_dataset("cifar10", str(folder))
    assert dataset.x.shape == (13, 3, 32, 32)


def test_femnist_writers_are_natural_clients(tmp_path):
    table = datasets.Dataset.from_dict({
        "image": images(12, 28, "L"),
        "character": list(range(12)),
        "writer_id": ["w1", "w2", "w3"] * 4,
        "hsf_id": [0] * 12,
    })
    table.save_to_disk(tmp_path / "femnist")
    dataset = load_dataset("femnist", str(tmp_path / "femnist"))
    assert dataset.x.shape == (12, 1, 28, 28) and dataset.num_classes == 62
    partition = make_partition(dataset, num_clients=3, partitioner="natural", unlabeled_size=0,
                               min_client_samples=1)
    assert sorted(c.size for c in partition.clients) == [4, 4, 4]


def test_shakespeare_encodes_characters(tmp_path):
    lines = ["To be, or not to be" + " " * 61, "that is the question" + "." * 60]
    table = datasets.Dataset.from_dict({
        "x": lines, "y": ["!", "T"], "character_id": ["HAMLET", "OPHELIA"],
    })
    table.save_to_disk(tmp_path / "shakespeare")
    dataset = load_dataset("shakespeare", str(tmp_path / "shakespeare"))
    assert dataset.x.shape == (2, 80) and dataset.is_sequence
    assert dataset.y.tolist() == [SHAKESPEARE_LETTERS.index("!"), SHAKESPEARE_LETTERS.index("T")]
    assert dataset.x[0, 0] == SHAKESPEARE_LETTERS.index("T")


def test_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="not a folder written by datasets' save_to_disk"):
        load_dataset("femnist", str(tmp_path))
