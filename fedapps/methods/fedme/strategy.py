"""FedMe (federated learning by model exchange) as a Flower Strategy.

Per round (the paper's Algorithm 1): run the round's participants' personalized models on the
server's unlabeled pool U (or a seeded sample of it, ``fedme.cluster-pool-size``), cluster the
models by those outputs with k-means (K_t from a schedule), give each client a random other
model of its cluster, let clients train both by deep mutual learning and decide
whether to adopt the exchange model, then average every model with its trained copies (eq. 8).

Differences from the authors' reference code, on purpose: k-means never collapses to one
cluster (k-means++ with restarts, K capped by the number of distinct models, logged); softmax
outputs are clustered by default (raw logits are an option); outputs on U come from one batched
pass per model; clients run in parallel through Flower.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedapps import training, tuning
from fedapps.config import RunConfig
from fedapps.protocol import engine
from fedapps.protocol.engine import ResumableStrategy
from fedapps.protocol.evaluation import per_client
from fedapps.protocol.messages import check_state, config_record, new_model

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ clustering and exchange


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # cluster of each model, in the order given
    requested_k: int
    used_k: int
    note: str = ""
    inference_s: float = 0.0  # seconds spent running the models on U


def cluster_models(features: np.ndarray, k: int, seed: int, restarts: int = 10) -> Clustering:
    """k-means on one output vector per model; never silently returns fewer clusters.

    K is capped by the number of distinct vectors (identical models are common after adoption);
    the cap is reported in ``note``. Empty clusters cannot survive: labels are compacted.
    """
    requested = k
    distinct = len(np.unique(features.round(decimals=6), axis=0))
    k = max(1, min(k, distinct))
    note = "" if k == requested else f"K={requested} capped to {k} distinct model outputs"
    if k == 1:
        return Clustering(np.zeros(len(features), dtype=int), requested, 1, note)
    # imported here: scikit-learn takes ~2 s to import, and every ClientApp, Ray worker and
    # SuperNode process imports this module through the registry but never clusters
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=k, init="k-means++", n_init=restarts, random_state=seed)
    raw = kmeans.fit_predict(features)
    _, labels = np.unique(raw, return_inverse=True)  # compact ids: no empty clusters
    used = int(labels.max()) + 1
    if used < k:
        note = (note + "; " if note else "") + f"k-means left {k - used} cluster(s) empty"
    return Clustering(labels, requested, used, note)


def assign_exchange(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Partner index per model: a random OTHER member of its cluster, else any other model."""
    count = len(labels)
    if count < 2:
        raise ValueError("FedMe needs at least two clients to exchange models")
    partners = np.empty(count, dtype=int)
    for i in range(count):
        same = [j for j in range(count) if j != i and labels[j] == labels[i]]
        pool = same or [j for j in range(count) if labels[j] != labels[i]]
        partners[i] = rng.choice(pool)
    return partners


def clustered_count(pool_size: int, size: int) -> int:
    """How many pool samples the models are clustered on (``fedme.cluster-pool-size``; 0: all)."""
    return pool_size if size == 0 else min(size, pool_size)


def cluster_inputs(pool: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """The pool samples the models are clustered on: all of them (``size`` 0 or at least the
    pool), else ``size`` drawn once with the run's seed, so every round compares the models on
    the same inputs. Pool inference is most of the server's work in a K >= 2 round and grows
    with the samples; ``benchmarks/cluster_sample.py`` measures how much the clusters change."""
    count = clustered_count(len(pool), size)
    if count == len(pool):
        return pool
    chosen = np.random.default_rng([seed, 11]).choice(len(pool), count, replace=False)
    return pool[np.sort(chosen)]


def model_features(outputs: torch.Tensor, on: str) -> np.ndarray:
    """Flatten a model's outputs on U into one vector (softmax by default)."""
    values = outputs.softmax(dim=1) if on == "softmax" else outputs
    return values.reshape(-1).double().numpy()


# ------------------------------------------------------------------------------ eq. 8


@dataclass
class Contribution:
    """One trained copy of model ``owner`` sent back by client ``trainer``."""

    owner: int
    trainer: int
    state: dict[str, torch.Tensor]
    num_examples: int


def aggregate_models(
    contributions: Iterable[Contribution], weighting: str = "uniform"
) -> dict[int, dict[str, torch.Tensor]]:
    """Eq. 8: each model averaged with every trained copy of itself (never across models)."""
    by_owner: dict[int, list[Contribution]] = {}
    for item in contributions:
        by_owner.setdefault(item.owner, []).append(item)
    return {
        owner: training.average_states(
            [c.state for c in copies],
            [float(c.num_examples) for c in copies] if weighting == "samples" else None,
        )
        for owner, copies in by_owner.items()
    }


# ------------------------------------------------------------------------------ strategy


@dataclass
class Unpacked:
    """One usable reply: the trained copies, the adoption decision and its evidence."""

    contributions: list[Contribution]
    adopted: bool
    train_loss: float
    validation: dict[str, float | str]
    train_s: float


@dataclass
class ClientModel:
    arch: str
    model: nn.Module
    num_examples: int = 1


VALIDATION_KEYS = ("val-loss", "exchange-val-loss", "val-accuracy", "exchange-val-accuracy")


class FedMe(ResumableStrategy):
    """Keeps every client's personalized model and architecture; one message per node.

    ``clients`` maps partition id -> node id; ``archs`` the initial architecture of each client.
    The round engine (:func:`fedapps.protocol.engine.run_rounds`) writes :meth:`round_record`.
    """

    def __init__(
        self,
        config: RunConfig,
        clients: Mapping[int, int],
        archs: Mapping[int, str],
        unlabeled: torch.Tensor,
        num_examples: Mapping[int, int] | None = None,
    ) -> None:
        self.config = config
        self.node_of = dict(clients)
        self.cluster_pool = cluster_inputs(unlabeled, config.cluster_pool_size, config.seed)
        self.device = training.resolve_device(config.device)
        self.rng = np.random.default_rng(config.seed)
        self.models: dict[int, ClientModel] = {}
        for pid in sorted(self.node_of):
            torch.manual_seed(config.seed * 1000 + pid)
            self.models[pid] = ClientModel(
                archs[pid], new_model(archs[pid], config), (num_examples or {}).get(pid, 1)
            )
        self.partner: dict[int, int] = {}
        self.round_info: dict[str, object] = {}
        self.record: dict[str, object] = {}
        self.rule = tuning.AdoptionRule.of(config)
        self.evidence: dict[tuning.Pair, float] = {}  # architecture quality gains, smoothed

    # --------------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Cluster the round's participants' models, then pair them within their clusters.

        Only participants exchange models, so only their models are clustered: with
        ``fraction-train`` < 1 the pool inference shrinks with it (1,000 clients at 0.1: 100
        models instead of 1,000); with every client taking part nothing changes.
        """
        started = time.perf_counter()
        participants = engine.participants(sorted(self.models), self.config, self.rng,
                                           at_least=2)
        clustering = self._cluster(participants, server_round)
        cluster_s = time.perf_counter() - started
        if clustering.note:
            log.warning("round %d: %s", server_round, clustering.note)
        cluster_of = dict(zip(participants, clustering.labels))
        partners = assign_exchange(clustering.labels, self.rng)
        self.partner = {pid: participants[j] for pid, j in zip(participants, partners)}
        self.round_info = {
            "k": clustering.used_k,
            "k-requested": clustering.requested_k,
            "clusters": {str(p): int(c) for p, c in cluster_of.items()},
            "exchange": {str(p): q for p, q in self.partner.items()},
            "clustering-note": clustering.note,
            "server-outputs-s": round(clustering.inference_s, 4),
            "server-kmeans-s": round(cluster_s - clustering.inference_s, 4),
            "server-cluster-s": round(cluster_s, 4),
        }
        packed = time.perf_counter()
        messages = [self._train_message(pid, server_round, config) for pid in participants]
        self.round_info["server-messages-s"] = round(time.perf_counter() - packed, 4)
        return messages

    def _cluster(self, pids: list[int], server_round: int) -> Clustering:
        """k-means on the models' outputs on U; K = 1 needs neither outputs nor k-means."""
        k = self.config.clusters_at(server_round)
        if k == 1:
            return Clustering(np.zeros(len(pids), dtype=int), 1, 1)
        started = time.perf_counter()
        outputs = training.predict_all([self.models[p].model for p in pids], self.cluster_pool,
                                       self.device)
        features = np.stack([model_features(o, self.config.cluster_on) for o in outputs])
        inference_s = time.perf_counter() - started
        clustering = cluster_models(features, k, self.config.seed + server_round,
                                    self.config.kmeans_restarts)
        return dataclasses.replace(clustering, inference_s=inference_s)

    def _train_message(self, pid: int, server_round: int, config: ConfigRecord) -> Message:
        own, other = self.models[pid], self.models[self.partner[pid]]
        content = RecordDict({
            "config": config_record(self.config, **{"server-round": server_round}),
            "fedme": ConfigRecord({
                "server-round": server_round,
                "personal-arch": own.arch,
                "exchange-arch": other.arch,  # not its owner: the client needs no name
            }),
            "personal": ArrayRecord(own.model.state_dict()),
            "exchange": ArrayRecord(other.model.state_dict()),
        })
        return Message(content=content, message_type=MessageType.TRAIN + ".mutual",
                       dst_node_id=self.node_of[pid])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        screened = engine.screen(server_round, replies, self.node_of, self._unpack,
                                 self.config.min_replies)
        self.round_info.update(screened.record)
        if screened.skipped:
            self.round_info.update(adoptions={})
            return None, None
        accepted = screened.accepted
        replied = set(accepted)
        contributions = [c for pieces in accepted.values() for c in pieces.contributions]
        adopted = {pid: pieces.adopted for pid, pieces in accepted.items()}
        losses = {pid: pieces.train_loss for pid, pieces in accepted.items()}
        validation = {pid: pieces.validation for pid, pieces in accepted.items()}
        train_times = {pid: pieces.train_s for pid, pieces in accepted.items()}
        # A client that did not reply keeps its model: its copies held by others are dropped too.
        usable = [c for c in contributions if c.owner in replied]
        merged = aggregate_models(usable, self.config.aggregation_weighting)
        for owner, state in merged.items():
            self.models[owner].model.load_state_dict(state)
        aggregated = dict(self.models)  # adoptions copy these, not models replaced meanwhile
        self.evidence = tuning.smooth_evidence(self.evidence, tuning.pair_gains(
            (v["arch"], v["exchange-arch"], v["exchange-val-accuracy"] - v["val-accuracy"])
            for v in validation.values() if "val-accuracy" in v
        ))
        adoptions = {
            p: self.partner[p] for p, a in adopted.items()
            if a and self.partner[p] in merged and self.rule.allows_structure_change(
                self.evidence, self.models[p].arch, self.models[self.partner[p]].arch)
        }
        pairs = Counter(f"{self.models[p].arch}>{aggregated[q].arch}" for p, q in adoptions.items())
        for pid, source in adoptions.items():
            chosen = aggregated[source]
            model = new_model(chosen.arch, self.config)
            model.load_state_dict(chosen.model.state_dict())
            self.models[pid] = ClientModel(chosen.arch, model, self.models[pid].num_examples)
        train_loss = float(np.mean(list(losses.values())))
        self.round_info.update({
            "adoptions": {str(p): q for p, q in adoptions.items()},
            "adoption-pairs": dict(sorted(pairs.items())),
            "validation": {str(p): v for p, v in validation.items()},
            "structure-evidence": {f"{a}<{b}": round(g, 4) for (a, b), g in self.evidence.items()},
            "train-loss": train_loss,
            "client-train-s": round(sum(train_times.values()), 4),
            "server-aggregate-s": round(time.perf_counter() - started, 4),
        })
        return None, MetricRecord({"train-loss": train_loss})

    def _unpack(self, pid: int, reply: Message) -> Unpacked:
        content = reply.content
        metrics = content["metrics"]
        num = int(metrics["num-examples"])
        pieces = []
        for key, owner in (("personal", pid), ("exchange", self.partner[pid])):
            state = content[key].to_torch_state_dict()
            check_state(self.models[owner].arch, state, self.models[owner].model.state_dict())
            pieces.append(Contribution(owner, pid, state, num))
        # The evidence behind the adoption decision (docs/fedme-tuning.md).
        validation = {
            "arch": self.models[pid].arch, "exchange-arch": self.models[self.partner[pid]].arch,
            **{key: float(metrics[key]) for key in VALIDATION_KEYS if key in metrics},
        }
        return Unpacked(pieces, bool(metrics["adopted"]), float(metrics["train-loss"]),
                        validation, float(metrics.get("train-s", 0.0)))

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round % self.config.eval_every and server_round != self.config.num_rounds:
            return []
        return [
            Message(
                content=RecordDict({
                    "config": config_record(self.config),
                    "model": ConfigRecord({"arch": model.arch}),
                    "arrays": ArrayRecord(model.model.state_dict()),
                }),
                message_type=MessageType.EVALUATE,
                dst_node_id=self.node_of[pid],
            )
            for pid, model in sorted(self.models.items())
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        accuracies = per_client(replies, "test-accuracy")
        architectures = Counter(m.arch for m in self.models.values())
        fields = {**self.round_info, "architectures": dict(sorted(architectures.items()))}
        if accuracies:
            values = list(accuracies.values())
            fields.update(accuracy=float(np.mean(values)), **{"accuracy-sd": float(np.std(values))},
                          **{"client-accuracy": {str(p): a for p, a in accuracies.items()}},
                          **{"accuracy-by-arch": self._accuracy_by_arch(accuracies)})
        self.record = fields
        if not accuracies:
            return None
        return MetricRecord({"accuracy": fields["accuracy"]})

    def _accuracy_by_arch(self, accuracies: Mapping[int, float]) -> dict[str, float]:
        """Mean test accuracy of the clients that hold each architecture now."""
        grouped: dict[str, list[float]] = {}
        for pid, accuracy in accuracies.items():
            grouped.setdefault(self.models[pid].arch, []).append(accuracy)
        return {arch: float(np.mean(values)) for arch, values in sorted(grouped.items())}

    def round_record(self) -> dict[str, object]:
        return self.record

    def summary(self) -> None:
        log.info("FedMe: %d clients, K schedule %s, clustering on %s",
                 len(self.models), self.config.cluster_schedule_pairs(), self.config.cluster_on)

    def state_dict(self) -> dict[str, object]:
        """Everything a restarted server needs to continue this run exactly."""
        return {
            "models": {p: (m.arch, m.model.state_dict(), m.num_examples)
                       for p, m in self.models.items()},
            "rng": self.rng.bit_generator.state,
            "evidence": dict(self.evidence),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        for pid, (arch, weights, num_examples) in state["models"].items():
            model = new_model(arch, self.config)
            model.load_state_dict(weights)
            self.models[pid] = ClientModel(arch, model, num_examples)
        self.rng.bit_generator.state = state["rng"]
        self.evidence = dict(state["evidence"])

    def final_models(self) -> dict[int, tuple[str, ArrayRecord]]:
        return {p: (m.arch, ArrayRecord(m.model.state_dict())) for p, m in self.models.items()}
