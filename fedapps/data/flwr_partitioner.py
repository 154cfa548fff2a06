"""The two-level Dirichlet split as a flwr-datasets ``Partitioner``, for any Flower project.

:class:`TwoLevelDirichletPartitioner` draws client sizes from Dir(``alpha_size``), then each
client's label mix from Dir(``alpha_label``), with the quota masking of the reference (a class
whose samples are used up drops out of every later mix). It calls the very functions
:func:`fedapps.data.partition.make_partition` uses (:func:`draw_server_pool`, then
:func:`two_level_dirichlet`), so for the same labels, alphas, pool size and seed, partition ``i``
holds exactly the samples of fedapps' client ``i`` (its train, val and test together).

Use it like any other partitioner (a hub id needs network access the first time)::

    from flwr_datasets import FederatedDataset
    from fedapps.data.flwr_partitioner import TwoLevelDirichletPartitioner

    partitioner = TwoLevelDirichletPartitioner(
        num_partitions=20, partition_by="label", alpha_label=0.5, alpha_size=10.0, seed=0
    )
    fds = FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": partitioner})
    partition = fds.load_partition(0)

Natural ids (writers, characters) need no class of ours: flwr-datasets'
``NaturalIdPartitioner(partition_by="writer_id")`` gives one partition per id. See
``docs/flwr-datasets.md``.
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
from flwr_datasets.partitioner import Partitioner

from fedapps.data.partition import draw_server_pool, two_level_dirichlet

__all__ = ["TwoLevelDirichletPartitioner"]


class TwoLevelDirichletPartitioner(Partitioner):
    """Sizes ~ Dir(``alpha_size``), then label mixes ~ Dir(``alpha_label``); no sample twice.

    Parameters
    ----------
    num_partitions : int
        Number of partitions (clients).
    partition_by : str
        Column with the labels: non-negative integers (a ``ClassLabel`` column is fine) or any
        other values, which are then numbered in sorted order.
    alpha_label : float
        Dirichlet concentration of each partition's label mix (small: few classes each).
    alpha_size : float
        Dirichlet concentration of the partition sizes (small: very unequal sizes).
    min_partition_size : int
        Fewest samples a partition may hold; an empty partition is never allowed, even for 0
        (fedapps' ``min-client-samples``, same rule). A smaller one is an error (a
        ``ValueError`` naming it), not a silent redraw, so that a seed always means one split:
        use fewer partitions, a larger ``alpha_size`` or another seed.
    server_pool_size : int
        Samples held out first, before partitioning, as a server-side pool (FedMe's unlabeled
        set U; :meth:`load_server_pool`). 0 (default): none; -1: fedapps' automatic size,
        min(1000, 15% of the data). fedapps' ``unlabeled-size``.
    seed : int
        Seed of the one ``numpy.random.default_rng`` every draw comes from.

    Partitions keep the data set's order (indices ascending); shuffle them for training. Through
    ``FederatedDataset`` the partitioner sees the split *after* its shuffle (``shuffle=True``,
    ``seed=42`` by default): pass ``shuffle=False`` to get fedapps' index space.
    """

    def __init__(
        self,
        num_partitions: int,
        partition_by: str = "label",
        *,
        alpha_label: float = 0.5,
        alpha_size: float = 10.0,
        min_partition_size: int = 10,
        server_pool_size: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions={num_partitions}: need at least 1")
        if not alpha_label > 0 or not alpha_size > 0:
            raise ValueError(
                f"alpha_label={alpha_label}, alpha_size={alpha_size}: both must be > 0"
            )
        if server_pool_size < -1:
            raise ValueError(
                f"server_pool_size={server_pool_size}: use -1 (automatic), 0 (none) or a size"
            )
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._alpha_label = alpha_label
        self._alpha_size = alpha_size
        self._min_partition_size = min_partition_size
        self._server_pool_size = server_pool_size
        self._seed = seed
        self._partition_id_to_indices: dict[int, np.ndarray] = {}
        self._server_pool_indices: np.ndarray | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    @property
    def partition_id_to_indices(self) -> dict[int, np.ndarray]:
        """Partition id -> sorted row indices into :attr:`dataset` (computed on first use)."""
        self._determine_partitions()
        return self._partition_id_to_indices

    @property
    def server_pool_indices(self) -> np.ndarray:
        """Sorted row indices of the held-out server pool (empty for ``server_pool_size=0``)."""
        self._determine_partitions()
        assert self._server_pool_indices is not None
        return self._server_pool_indices

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(
                f"partition_id={partition_id}: there are {self._num_partitions} partitions "
                f"(0 to {self._num_partitions - 1})"
            )
        return self.dataset.select(self.partition_id_to_indices[partition_id])

    def load_server_pool(self) -> datasets.Dataset:
        """The samples held out for the server (see ``server_pool_size``)."""
        return self.dataset.select(self.server_pool_indices)

    def _labels(self) -> np.ndarray:
        if self._partition_by not in self.dataset.column_names:
            raise ValueError(
                f"partition_by='{self._partition_by}' is not a column; the data set has "
                f"{self.dataset.column_names}"
            )
        # Arrow format: fast, and it respects a dataset's indices mapping (after select/shuffle).
        column = self.dataset.with_format("arrow")[self._partition_by]
        kind = column.type
        if column.null_count:
            raise ValueError(
                f"partition_by='{self._partition_by}' has {column.null_count} missing labels"
            )
        if pa.types.is_integer(kind):
            values = column.to_numpy()
            if len(values) and values.min() < 0:
                raise ValueError(
                    f"partition_by='{self._partition_by}' has negative labels "
                    f"(e.g. {values.min()}); class ids must be >= 0"
                )
            return values.astype(np.int64)
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_boolean(kind) or pa.types.is_floating(kind)):
            raise ValueError(
                f"partition_by='{self._partition_by}' holds {kind}; expected one label per row "
                "(integers, strings, booleans or floats)"
            )
        values = column.to_numpy(zero_copy_only=False)
        _, encoded = np.unique(values, return_inverse=True)
        return encoded.astype(np.int64)

    def _determine_partitions(self) -> None:
        if self._server_pool_indices is not None:
            return
        labels = self._labels()
        rng = np.random.default_rng(self._seed)
        try:
            pool, remaining = draw_server_pool(
                len(labels), self._server_pool_size, self._num_partitions, rng,
                name="the data set",
            )
        except ValueError as error:  # DataError speaks fedapps' config keys; say ours
            raise ValueError(
                f"TwoLevelDirichletPartitioner(num_partitions={self._num_partitions}, "
                f"server_pool_size={self._server_pool_size}) on {len(labels)} rows: {error}"
            ) from None
        shards = two_level_dirichlet(
            labels, remaining, self._num_partitions, self._alpha_label, self._alpha_size, rng
        )
        smallest = max(self._min_partition_size, 1)
        for partition_id, shard in enumerate(shards):
            if len(shard) < smallest:
                raise ValueError(
                    f"partition {partition_id} got {len(shard)} samples, fewer than "
                    f"min_partition_size={self._min_partition_size}; use fewer partitions, a "
                    "larger alpha_size, a smaller server pool or another seed"
                )
        self._partition_id_to_indices = {
            partition_id: np.sort(shard) for partition_id, shard in enumerate(shards)
        }
        self._server_pool_indices = pool
