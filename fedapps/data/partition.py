"""Federated splits as index lists: unlabeled server pool, then per-client train/val/test.

A partition is plain data (indices into a :class:`~fedapps.data.registry.Dataset`), so it can be
saved, published and loaded again (:func:`save_partition` / :func:`load_partition`). The steps
that decide which samples a client gets (:func:`draw_server_pool`, then
:func:`two_level_dirichlet`) are public functions on plain label arrays, shared with
:class:`fedapps.data.flwr_partitioner.TwoLevelDirichletPartitioner`, the same split as a
flwr-datasets ``Partitioner`` for Hugging Face data sets. What stays here is the bookkeeping
flwr-datasets does not model: per-client train/val/test splits and a portable file of the exact
indices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedapps.data.registry import DataError, Dataset

UNLABELED_CAP = 1000
UNLABELED_AUTO_FRACTION = 0.15


@dataclass(frozen=True, eq=False)
class ClientSplit:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


@dataclass(frozen=True, eq=False)
class Partition:
    unlabeled: np.ndarray
    clients: list[ClientSplit]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def to_json_dict(self, dataset: Dataset) -> dict:
        return {
            "dataset": dataset.name,
            "num-samples": len(dataset),
            "index-space": dataset.index_space,
            "unlabeled": self.unlabeled.tolist(),
            "clients": [
                {"train": c.train.tolist(), "val": c.val.tolist(), "test": c.test.tolist()}
                for c in self.clients
            ],
        }


def unlabeled_pool_size(requested: int, num_samples: int) -> int:
    """-1 means 'the paper's 1,000 or what the data allows' (15% of it)."""
    if requested == -1:
        return min(UNLABELED_CAP, int(UNLABELED_AUTO_FRACTION * num_samples))
    return requested


def make_partition(
    dataset: Dataset,
    *,
    num_clients: int,
    partitioner: str = "dirichlet",
    alpha_label: float = 0.5,
    alpha_size: float = 10.0,
    unlabeled_size: int = -1,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    min_client_samples: int = 10,
    seed: int = 0,
) -> Partition:
    """Deterministic in ``seed``: the same arguments always give the same indices."""
    rng = np.random.default_rng(seed)
    unlabeled, remaining = draw_server_pool(
        len(dataset), unlabeled_size, num_clients, rng, name=dataset.name
    )
    if partitioner == "iid":
        shards = np.array_split(remaining, num_clients)
    elif partitioner == "dirichlet":
        shards = two_level_dirichlet(
            dataset.y, remaining, num_clients, alpha_label, alpha_size, rng
        )
    elif partitioner == "natural":
        shards = _natural(dataset, remaining, num_clients, rng)
    else:
        raise DataError(
            f"partitioner='{partitioner}' is not known; allowed: iid, dirichlet, natural"
        )
    clients = [
        split_client(client, shard, val_fraction, test_fraction, min_client_samples, rng)
        for client, shard in enumerate(shards)
    ]
    return Partition(unlabeled, clients)


def draw_server_pool(
    num_samples: int,
    unlabeled_size: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    name: str = "the data set",
) -> tuple[np.ndarray, np.ndarray]:
    """Remove the server's unlabeled pool first: ``(pool, rest)`` as indices into the data set.

    ``pool`` is sorted; ``rest`` is in the random order the clients' partitioner then consumes.
    It draws one permutation of all samples from ``rng`` even for an empty pool, so what follows
    is the same whatever the pool size. ``unlabeled_size=-1`` is :func:`unlabeled_pool_size`'s
    automatic size.
    """
    num_unlabeled = unlabeled_pool_size(unlabeled_size, num_samples)
    if num_unlabeled < 0:
        raise DataError(f"unlabeled-size={unlabeled_size}: use -1 (automatic) or a size >= 0")
    if num_unlabeled >= num_samples:
        raise DataError(
            f"unlabeled-size={num_unlabeled} takes all {num_samples} samples of "
            f"'{name}'; leave data for the clients"
        )
    order = rng.permutation(num_samples)
    unlabeled, remaining = np.sort(order[:num_unlabeled]), order[num_unlabeled:]
    if num_clients > len(remaining):
        raise DataError(
            f"num-clients={num_clients} is more than the {len(remaining)} samples left for "
            f"clients in '{name}' after the unlabeled pool of {num_unlabeled}"
        )
    return unlabeled, remaining


def two_level_dirichlet(
    labels: np.ndarray,
    indices: np.ndarray,
    num_clients: int,
    alpha_label: float,
    alpha_size: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Client sizes ~ Dir(alpha_size); each client's label mix ~ Dir(alpha_label).

    ``labels`` are non-negative integer class ids for the whole data set and ``indices`` the
    samples to share out (their order matters: it is the order the per-class pools are drawn
    from). Returns one index array per client, in the order the samples were drawn.

    Clients are filled one after another by drawing labels from their own mix among the classes
    that still have samples (the quota masking: a class whose pool is used up gets weight 0, and
    a client whose classes all ran out falls back to whatever is left), so sizes are met exactly
    and no sample is used twice. This is the one implementation; ``make_partition`` and the
    flwr-datasets partitioner both call it.
    """
    num_classes = int(labels.max()) + 1
    pools = [list(rng.permutation(indices[labels[indices] == c])) for c in range(num_classes)]
    proportions = rng.dirichlet(np.full(num_clients, alpha_size))
    sizes = np.floor(proportions * len(indices)).astype(int)
    sizes[: len(indices) - sizes.sum()] += 1  # hand out the rounding remainder
    shards = []
    for size in sizes:
        mix = rng.dirichlet(np.full(num_classes, alpha_label))
        taken: list[int] = []
        while len(taken) < size:
            available = np.array([len(pool) > 0 for pool in pools], dtype=float)
            weights = mix * available
            if weights.sum() == 0:  # the client's classes ran out: fall back to what is left
                weights = available
            counts = rng.multinomial(size - len(taken), weights / weights.sum())
            for label, count in enumerate(counts):
                count = min(count, len(pools[label]))
                taken.extend(pools[label][:count])
                del pools[label][:count]
        shards.append(np.asarray(taken, dtype=np.int64))
    return shards


def _natural(
    dataset: Dataset, indices: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One client per natural id (writer, character), choosing ``num_clients`` of them."""
    if dataset.groups is None:
        raise DataError(
            f"partitioner='natural' needs natural ids, and '{dataset.name}' has none; "
            "use femnist, shakespeare, or an .npz with a 'groups' array"
        )
    groups = dataset.groups[indices]
    ids = np.unique(groups)
    if len(ids) < num_clients:
        raise DataError(
            f"num-clients={num_clients} but '{dataset.name}' has only {len(ids)} natural ids"
        )
    chosen = rng.choice(ids, size=num_clients, replace=False)
    return [np.sort(indices[groups == group]) for group in chosen]


def split_client(
    client: int,
    indices: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    min_samples: int,
    rng: np.random.Generator,
) -> ClientSplit:
    if len(indices) < max(min_samples, 1):
        raise DataError(
            f"client {client} got {len(indices)} samples, fewer than min-client-samples="
            f"{min_samples}; use fewer clients, a larger alpha-size, or a smaller unlabeled pool"
        )
    shuffled = rng.permutation(indices)
    num_test = int(round(test_fraction * len(shuffled)))
    num_val = int(round(val_fraction * len(shuffled)))
    test, val = shuffled[:num_test], shuffled[num_test : num_test + num_val]
    train = shuffled[num_test + num_val :]
    if len(train) == 0:
        raise DataError(f"client {client}: no training samples left after val/test splits")
    return ClientSplit(np.sort(train), np.sort(val), np.sort(test))


# ------------------------------------------------------------------ partition files


def save_partition(partition: Partition, dataset: Dataset, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(partition.to_json_dict(dataset)))
    return path


def load_partition(path: str | Path, dataset: Dataset) -> Partition:
    """Read a partition file and check it against ``dataset``; every error names the culprit."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"partition-file='{path}': cannot read JSON ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("clients"), list):
        raise DataError(f"partition-file='{path}': expected an object with a 'clients' list")
    size = content.get("num-samples")
    if size is not None and size != len(dataset):
        raise DataError(
            f"partition-file='{path}' was made for {size} samples but '{dataset.name}' has "
            f"{len(dataset)}"
        )
    owner: dict[int, str] = {}

    def take(values: object, where: str) -> np.ndarray:
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise DataError(f"partition-file='{path}': {where} must be a list of integers")
        for index in values:
            if not 0 <= index < len(dataset):
                raise DataError(
                    f"partition-file='{path}': {where} has index {index}, out of range for "
                    f"'{dataset.name}' with {len(dataset)} samples"
                )
            if index in owner:
                raise DataError(
                    f"partition-file='{path}': index {index} is used twice, in {owner[index]} "
                    f"and in {where}"
                )
            owner[index] = where
        return np.asarray(values, dtype=np.int64)

    unlabeled = take(content.get("unlabeled", []), "the unlabeled pool")
    clients = []
    for number, client in enumerate(content["clients"]):
        if not isinstance(client, dict):
            raise DataError(f"partition-file='{path}': client {number} is not an object")
        splits = {
            name: take(client.get(name, []), f"client {number} {name}")
            for name in ("train", "val", "test")
        }
        if len(splits["train"]) == 0:
            raise DataError(f"partition-file='{path}': client {number} has an empty train split")
        clients.append(ClientSplit(**splits))
    if not clients:
        raise DataError(f"partition-file='{path}': no clients")
    return Partition(unlabeled, clients)
