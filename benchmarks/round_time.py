"""Where a round's time goes, against the compute limit of the machine (issues 7 and 14).

    .venv/bin/python benchmarks/round_time.py --quick         # 1x28x28, 20 clients, U=500
    .venv/bin/python benchmarks/round_time.py                 # 28x28 and 3x32x32 VGG-11 grids
    .venv/bin/python benchmarks/round_time.py --suite digits  # issue 7: Flower vs no Flower

**images** (default, issue 14): generated image tensors (timing only: class prototypes plus
noise, written as the bring-your-own ``npz`` data set) at 1x28x28 (cnn2; FedMe's candidates
cnn1-cnn4) and 3x32x32 (VGG-11; candidates VGG-11/13/16/19), 20 and 100 clients of about 170
training images, unlabeled pools U = 500 and 1,000, FedMe and FedAvg. Every model starts as the
workload's model, so the FLOP count of a round is known exactly. Per run it prints:

- the round breakdown (rounds.jsonl): client training (wall = summed / clients at once), pool
  inference, k-means, packing, aggregation, the rest (Flower, evaluation; the evaluate phase
  alone in its own column), separately for K = 1 and K >= 2 rounds, and the run average under
  the paper's schedule (K = 1 for half the rounds);
- the **compute lower bound**: the round's FLOPs (DML training of both models, validation,
  evaluation, the server's pool inference in K >= 2 rounds; counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the project's own training functions) divided
  by the FLOP rate this machine reaches on the same calls (a microbenchmark: one torch thread
  per client times the clients that fit on the cores, the pool pass one model per core or all
  cores on each model, whichever is faster; on a GPU, the GPU alone), and round time / bound;
- FedMe/FedAvg, the server's clustering share of the round, peak memory (process tree; growth
  of the machine's used memory, which holds a loopback Ray cluster's nodes; GPU).

``--cluster-pool-size N`` clusters on N pool samples (``fedme.cluster-pool-size``, the app's
default unless given; 0: the whole pool);
``--fraction-train F`` lets F of the clients train each round (every client is evaluated); with
``RAY_ADDRESS`` set, the runs join that Ray cluster (docs/ray-cluster.md).

Each run goes the launcher's whole Flower path (``--engine flower``, the default: ``flwr run``
on a local SuperLink, as ``python -m fedapps.launch`` and ``make run`` do); the process-tree
memory then misses the detached SuperLink and its simulation, which the machine's growth holds.
``--engine in-process`` runs the same server and client handlers without Flower, one client at
a time (the GPU check: Ray is not available there). Results go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedapps import training
from fedapps.config import CommandLine, RunConfig, method_uses, resolve, run_command
from fedapps.inprocess import run_in_process
from fedapps.launch import run_experiment
from fedapps.methods.fedme.strategy import clustered_count
from fedapps.models import build_model
from fedapps.protocol.results import read_rounds

OUT = Path(__file__).parent / "results"
EPOCHS, BATCH = 2, 20
SAMPLES_PER_CLIENT = 284  # 60 % train = about 170 images (the clients), 20 % val, 20 % test
# Rounds 1-2 have K = 1, later ones K = 2; round 1 is warm-up and left out of every mean.
SCHEDULE = "1:1,3:2"


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A generated image set and the architectures FedMe trains on it."""

    key: str
    shape: tuple[int, int, int]
    classes: int
    model: str
    candidates: str


WORKLOADS = {
    "28": Workload("28", (1, 28, 28), 62, "cnn2", "cnn1,cnn2,cnn3,cnn4"),  # FEMNIST's size
    "32": Workload("32", (3, 32, 32), 10, "vgg11", "vgg11,vgg13,vgg16,vgg19"),  # CIFAR-10's
}


def generate_images(
    shape: tuple[int, ...], classes: int, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class prototypes plus noise: learnable, so adoption and clustering behave as on data."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((classes, *shape), dtype=np.float32)
    y = rng.integers(0, classes, size=count)
    x = prototypes[y] + rng.standard_normal((count, *shape), dtype=np.float32)
    return x, y.astype(np.int64)


def write_images(folder: Path, workload: Workload, clients: int, pool: int) -> Path:
    """The ``npz`` file of one run: every client gets SAMPLES_PER_CLIENT after the pool."""
    path = folder / f"images-{workload.key}-{clients}-{pool}.npz"
    x, y = generate_images(workload.shape, workload.classes, clients * SAMPLES_PER_CLIENT + pool,
                           seed=0)
    np.savez(path, x=x, y=y)
    return path


def image_settings(workload: Workload, method: str, clients: int, pool: int, data: Path,
                   rounds: int, device: str, cluster_pool: int = 0,
                   fraction_train: float = 1.0) -> dict[str, Any]:
    return {"method": method, "dataset": "npz", "data-path": str(data), "partitioner": "iid",
            "num-clients": clients, "unlabeled-size": pool, "model": workload.model,
            "fedme.candidate-models": workload.candidates, "fedme.init-arch": workload.model,
            "num-rounds": rounds, "local-epochs": EPOCHS, "batch-size": BATCH,
            "fedme.cluster-schedule": SCHEDULE, "finetune-epochs": 0, "eval-every": 1, "seed": 0,
            "min-client-samples": 5, "device": device, "results-dir": str(OUT / "runs"),
            "fedme.cluster-pool-size": cluster_pool, "fraction-train": fraction_train}


# ------------------------------------------------------------------------ FLOPs and rates


@dataclass(frozen=True)
class Costs:
    """FLOPs per sample of the project's own training calls, one model of the workload."""

    train: float  # training.train: forward + backward (FedAvg)
    mutual: float  # training.train_mutual: both models' forward + backward (FedMe)
    forward: float  # training.predict: inference


@dataclass(frozen=True)
class Rates:
    """FLOP/s of the same calls, per worker (one torch thread on a CPU)."""

    train: float
    mutual: float
    forward: float  # a client's validation / test split
    pool: float  # the server's pool inference (batches of up to 1,024)
    pool_all_cores: float  # the same with every core in one process

    def pool_machine(self, workers: int) -> float:
        """The pool pass's best rate: one model per core, or all cores on each model."""
        return max(self.pool * workers, self.pool_all_cores)


def count_flops(call: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def best_seconds(call: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call (GPU work included)."""
    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def workload_calls(workload: Workload, pool: int, device: torch.device
                   ) -> dict[str, tuple[Callable[[], object], int]]:
    """The calls a round makes, each on one batch, with the samples each call processes."""
    torch.manual_seed(0)
    models = [build_model(workload.model, workload.shape, workload.classes) for _ in range(2)]
    x, y = (torch.from_numpy(a) for a in generate_images(workload.shape, workload.classes,
                                                        max(BATCH, pool), seed=1))
    optim = training.Optim(batch_size=BATCH)
    gen = torch.Generator().manual_seed(0)
    split = SAMPLES_PER_CLIENT // 5  # a client's validation or test split

    def pool_pass() -> torch.Tensor:
        return training.predict(models[0], x[:pool], device)

    return {
        "train": (lambda: training.train(models[0], x[:BATCH], y[:BATCH], 1, optim, gen,
                                         device), BATCH),
        "mutual": (lambda: training.train_mutual(models[0], models[1], x[:BATCH], y[:BATCH], 1,
                                                 optim, gen, device), BATCH),
        "forward": (lambda: training.predict(models[0], x[:split], device), split),
        "pool": (pool_pass, pool),
        "pool_all_cores": (pool_pass, pool),
    }


def measure(workload: Workload, pool: int, device: torch.device) -> tuple[Costs, Rates]:
    """FLOPs per sample (counted) and FLOP/s (timed) of each call.

    On a CPU clients run one torch thread each (fedapps.client), so every call is timed on
    one thread; the server's pool pass also on every core (a loaded machine can make that
    slower than one thread per core, which the bound then uses instead).
    """
    calls = workload_calls(workload, pool, device)
    flops = {name: count_flops(call) for name, (call, _) in calls.items()}
    rates = {}
    for name, (call, _) in calls.items():
        threads = training.available_cores() if name == "pool_all_cores" else 1
        with training.torch_threads(threads):
            rates[name] = flops[name] / best_seconds(call, device)
    per_sample = {name: flops[name] / samples for name, (_, samples) in calls.items()}
    costs = Costs(per_sample["train"], per_sample["mutual"], per_sample["forward"])
    return costs, Rates(**rates)


@dataclass(frozen=True)
class Counts:
    """Samples of one run's partition, summed over clients."""

    clients: int
    train: int
    val: int
    test: int
    pool: int


def partition_counts(folder: Path) -> Counts:
    partition = json.loads((folder / "partition.json").read_text())
    clients = partition["clients"]
    return Counts(len(clients), *(sum(len(c[key]) for c in clients)
                                  for key in ("train", "val", "test")),
                  len(partition["unlabeled"]))


def participating(counts: Counts, fraction_train: float) -> Counts:
    """The counts of a round in which ``fraction-train`` of the clients take part: they train,
    validate and have their models clustered (``clients``); every client is still tested."""
    if fraction_train >= 1:
        return counts
    return replace(counts, clients=max(2, round(fraction_train * counts.clients)),
                   train=round(fraction_train * counts.train),
                   val=round(fraction_train * counts.val))


def clustered(counts: Counts, cluster_pool_size: int) -> Counts:
    """The counts with the pool the server runs each model on (fedme.cluster-pool-size)."""
    return replace(counts, pool=clustered_count(counts.pool, cluster_pool_size))


def round_bound(method: str, counts: Counts, costs: Costs, rates: Rates, workers: int,
                pool_inference: bool) -> dict[str, float]:
    """Seconds of pure compute per round, by part, at this machine's measured FLOP rates.

    ``workers`` clients compute at once (cores on a CPU, 1 on a GPU), and as many models on
    the pool. Validation: FedMe's clients test both models on their val split.
    """
    fedme = method == "fedme"
    step, step_rate = (costs.mutual, rates.mutual) if fedme else (costs.train, rates.train)
    pool_models = counts.clients if fedme and pool_inference else 0
    work = {  # part: (FLOPs, FLOP/s)
        "train": (counts.train * EPOCHS * step, step_rate * workers),
        "validation": ((2 * counts.val if fedme else 0) * costs.forward, rates.forward * workers),
        "evaluation": (counts.test * costs.forward, rates.forward * workers),
        "pool": (pool_models * counts.pool * costs.forward, rates.pool_machine(workers)),
    }
    seconds = {part: flops / rate for part, (flops, rate) in work.items()}
    return {**seconds, "total": sum(seconds.values()),
            "gflop": sum(flops for flops, _ in work.values()) / 1e9}


# ------------------------------------------------------------------------------ runs


class PeakMemory:
    """Samples the RSS of this process tree every 0.2 s, and the machine's used memory: on a
    Ray cluster (``RAY_ADDRESS``) the client actors are not this process's children, so on a
    loopback cluster the growth of the machine's used memory is the figure that holds them."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
        self.machine_start = self.machine_peak = psutil.virtual_memory().used
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.machine_peak = max(self.machine_peak, psutil.virtual_memory().used)

    @property
    def machine_growth(self) -> int:
        return self.machine_peak - self.machine_start

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


PARTS = ("round-s", "client-train-s", "server-outputs-s", "server-kmeans-s",
         "server-messages-s", "server-aggregate-s")


def breakdown(rows: Iterable[Mapping[str, Any]], parallel: int) -> dict[str, float]:
    """Mean seconds per round of each part; the rest is Flower's own work and evaluation."""
    rows = list(rows)
    if not rows:
        return {}
    mean = {key: statistics.fmean(r.get(key, 0.0) for r in rows) for key in PARTS}
    mean["client-train-wall-s"] = mean["client-train-s"] / parallel
    known = sum(mean[k] for k in PARTS[2:]) + mean["client-train-wall-s"]
    mean["flower-and-evaluation-s"] = max(0.0, mean["round-s"] - known)
    # of which the evaluate phase (its messages and the clients' testing): engine's evaluate-s
    mean["evaluate-s"] = statistics.fmean(r.get("evaluate-s", 0.0) for r in rows)
    return mean


def by_phase(rows: list[dict[str, Any]], parallel: int) -> dict[str, dict[str, float]]:
    """Breakdowns of K = 1 and K >= 2 rounds (round 1, the warm-up, left out)."""
    later = rows[1:] or rows
    return {"k1": breakdown((r for r in later if r.get("k", 1) == 1), parallel),
            "k2": breakdown((r for r in later if r.get("k", 1) > 1), parallel)}


def run_average(phases: Mapping[str, Mapping[str, float]], key: str) -> float:
    """Mean over a run on the paper's schedule: K = 1 for the first half of the rounds."""
    values = [phases[p][key] for p in ("k1", "k2") if phases.get(p)]
    return statistics.fmean(values) if values else float("nan")


def own_keys(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings without another method's keys (FedMe's, in a FedAvg run): a run rejects
    a key its method does not use, and the suites share one settings dict per workload."""
    return {key: value for key, value in settings.items()
            if method_uses(str(settings["method"]), key)}


def launched(settings: Mapping[str, Any]) -> Path:
    """One run as ``python -m fedapps.launch`` runs it (``flwr run``, a local SuperLink)."""
    outcome = run_experiment(resolve(None, settings))
    if outcome.code:
        raise RuntimeError(outcome.reason)
    return outcome.folders[-1]


def execute(settings: Mapping[str, Any], engine: str) -> tuple[Path, float, PeakMemory]:
    """One run: results folder, wall seconds, its memory."""
    settings = own_keys(settings)
    started = time.perf_counter()
    with PeakMemory() as memory:
        folder = launched(settings) if engine == "flower" else run_in_process(settings)
    return folder, time.perf_counter() - started, memory


def machine_workers(device: torch.device, clients: int) -> int:
    """Clients this machine can compute at once: one per core, or the one GPU."""
    return 1 if device.type == "cuda" else min(training.available_cores(), clients)


def workers_of(device: torch.device, engine: str, clients: int) -> int:
    """Clients a run computes at once: Flower gives each one core; in-process, one by one."""
    return 1 if engine == "in-process" else machine_workers(device, clients)


def image_run(workload: Workload, method: str, clients: int, pool: int, data: Path,
              args: argparse.Namespace, measured: tuple[Costs, Rates]) -> dict[str, Any]:
    device = training.resolve_device(args.device)
    settings = image_settings(workload, method, clients, pool, data, args.rounds, args.device,
                              args.cluster_pool_size, args.fraction_train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    folder, wall, memory = execute(settings, args.engine)
    rows = read_rounds(folder)
    counts = participating(clustered(partition_counts(folder), args.cluster_pool_size),
                           args.fraction_train)
    # a round runs at most its participants at once (counts.clients)
    phases = by_phase(rows, workers_of(device, args.engine, counts.clients))
    costs, rates = measured
    bound_workers = machine_workers(device, counts.clients)
    bounds = {"k1": round_bound(method, counts, costs, rates, bound_workers, False),
              "k2": round_bound(method, counts, costs, rates, bound_workers, True)}
    return {
        "workload": workload.key, "method": method, "clients": clients, "pool": pool,
        "clustered-on": counts.pool if method == "fedme" else 0,
        "engine": args.engine, "device": str(device), "folder": str(folder),
        "wall-s": wall, "fixed-s": wall - sum(r["round-s"] for r in rows),
        "peak-memory-gb": memory.peak / 1e9,
        "machine-memory-growth-gb": memory.machine_growth / 1e9,
        "gpu-peak-memory-gb": (torch.cuda.max_memory_allocated() / 1e9
                               if device.type == "cuda" else None),
        "counts": asdict(counts), "phases": phases, "bound": bounds,
        "load-average-after": os.getloadavg()[0],
    }


def summarize(run: dict[str, Any]) -> dict[str, float]:
    """Run averages (paper's schedule) of the round, its bound and the clustering share."""
    phases, method = run["phases"], run["method"]
    if method == "fedavg":  # no K: every round is alike
        phases = {"k1": phases["k1"] or phases["k2"]}
    bounds = {p: {"total": run["bound"][p]["total"]} for p in phases}
    round_s = run_average(phases, "round-s")
    bound_s = run_average(bounds, "total")
    clustering = (run_average(phases, "server-outputs-s")
                  + run_average(phases, "server-kmeans-s"))
    return {"round-s": round_s, "bound-s": bound_s, "ratio": round_s / bound_s,
            "clustering-share": clustering / round_s}


def images_suite(args: argparse.Namespace) -> dict[str, Any]:
    device = training.resolve_device(args.device)
    report: dict[str, Any] = {**machine(device), "suite": "images", "rounds": args.rounds,
                              "engine": args.engine, "rates": {}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="fedapps-images-") as scratch:
        for key in args.shapes:
            workload = WORKLOADS[key]
            for pool in args.pools:
                measured = measure(workload, clustered_count(pool, args.cluster_pool_size),
                                   device)
                report["rates"][f"{key}-U{pool}"] = {"costs": asdict(measured[0]),
                                                     "rates": asdict(measured[1])}
                for clients in args.clients:
                    data = write_images(Path(scratch), workload, clients, pool)
                    for method in args.methods:
                        if method == "fedavg" and pool != args.pools[0]:
                            continue  # FedAvg never touches the pool: one run per size
                        run = image_run(workload, method, clients, pool, data, args, measured)
                        run["summary"] = summarize(run)
                        report["runs"].append(run)
                        print(f"done: {key} {method} {clients} clients U={pool}: "
                              f"{run['summary']['round-s']:.2f} s/round", flush=True)
    return report


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were taken on, load included (README: say the machine load)."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "cores-available": training.available_cores(),
        "machine": platform.processor() or platform.machine(),
        "load-average": os.getloadavg(), "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


# ---------------------------------------------------------------------------- printing


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_images(report: dict[str, Any]) -> None:
    print(f"\n{report['device']} {report.get('gpu') or report['machine']}, "
          f"{report['cores-available']} cores, load average at start "
          f"{', '.join(f'{v:.2f}' for v in report['load-average'])}, engine {report['engine']}")
    rows = []
    for run in report["runs"]:
        for phase in ("k1", "k2"):
            b = run["phases"][phase]
            if not b:
                continue
            bound = run["bound"][phase]
            rows.append((f"{run['workload']} {run['method']}", run["clients"], pool_label(run),
                         k_label(run["method"], phase), f"{b['round-s']:.2f}",
                         f"{b['client-train-wall-s']:.2f}", f"{b['server-outputs-s']:.3f}",
                         f"{b['server-kmeans-s']:.3f}", f"{b['server-messages-s']:.3f}",
                         f"{b['server-aggregate-s']:.3f}", f"{b['flower-and-evaluation-s']:.2f}",
                         f"{b.get('evaluate-s', 0.0):.2f}",
                         f"{bound['gflop']:.0f}", f"{bound['total']:.2f}",
                         f"{b['round-s'] / bound['total']:.2f}"))
    print(table(rows, ("run", "clients", "U", "K", "round s", "client train s",
                       "U inference s", "k-means s", "packing s", "aggregation s", "rest s",
                       "of which evaluate s",
                       "GFLOP", "bound s", "round / bound")))
    print_summary(report)


def pool_label(run: Mapping[str, Any]) -> str:
    """U, and in brackets the samples FedMe clustered on when fedme.cluster-pool-size took fewer."""
    clustered_on = run.get("clustered-on") or run["pool"]
    return str(run["pool"]) if clustered_on == run["pool"] else f"{run['pool']} ({clustered_on})"


def k_label(method: str, phase: str) -> str:
    if method != "fedme":
        return "–"
    return "1" if phase == "k1" else ">=2"


def print_summary(report: dict[str, Any]) -> None:
    """Run averages on the paper's schedule, FedMe/FedAvg, clustering share, memory."""
    fedavg = {(r["workload"], r["clients"]): r["summary"]["round-s"]
              for r in report["runs"] if r["method"] == "fedavg"}
    rows = []
    for run in report["runs"]:
        s = run["summary"]
        baseline = fedavg.get((run["workload"], run["clients"]))
        versus = f"{s['round-s'] / baseline:.2f}" if baseline and run["method"] == "fedme" else "–"
        gpu = run["gpu-peak-memory-gb"]
        rows.append((f"{run['workload']} {run['method']}", run["clients"], pool_label(run),
                     f"{s['round-s']:.2f}", f"{s['bound-s']:.2f}", f"{s['ratio']:.2f}", versus,
                     f"{100 * s['clustering-share']:.1f} %", f"{run['peak-memory-gb']:.2f}",
                     f"{run['machine-memory-growth-gb']:.2f}",
                     f"{gpu:.2f}" if gpu is not None else "–", f"{run['fixed-s']:.1f}",
                     f"{run['load-average-after']:.1f}"))
    print("\nrun averages (paper's schedule: K = 1 in half the rounds; peak GB: this process "
          "tree; machine GB +: growth of the machine's used memory, Ray cluster nodes included):")
    print(table(rows, ("run", "clients", "U", "round s", "bound s", "round / bound",
                       "FedMe / FedAvg", "clustering share", "peak GB", "machine GB +",
                       "GPU peak GB",
                       "fixed s", "load after")))
    print("goals (28x28, 20 clients, idle machine): FedMe round <= 5.0 s and <= 1.25x the "
          "bound, FedMe/FedAvg <= 2.2, clustering <= 10 % of the round, 100 clients < 8 GB")


# ------------------------------------------------------------------- digits (issue 7)

DIGITS = {"num-rounds": 5, "local-epochs": 2, "fedme.init-arch": "random",
          "fedme.cluster-schedule": SCHEDULE,
          "finetune-epochs": 0, "seed": 0, "partitioner": "iid", "min-client-samples": 5,
          "results-dir": str(OUT / "runs")}


def digits_run(settings: Mapping[str, Any], engine: str = "flower") -> dict[str, Any]:
    folder, wall, memory = execute(settings, engine)
    rows = read_rounds(folder)
    parallel = workers_of(torch.device("cpu"), engine, int(settings["num-clients"]))
    return {"settings": dict(settings), "wall-s": wall,
            "fixed-s": wall - sum(r["round-s"] for r in rows), "peak-memory-gb": memory.peak / 1e9,
            "breakdown": breakdown(rows[1:] or rows, parallel)}


def digits_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 7: FedMe vs FedAvg at 20 and 100 clients, Flower vs in-process, scaling."""
    report: dict[str, Any] = {**machine(torch.device("cpu")), "suite": "digits",
                              "breakdown": {}, "in-process": {}, "scaling": {}}
    for clients in args.clients:
        for method in args.methods:
            settings = {**DIGITS, "method": method, "num-clients": clients}
            report["breakdown"][f"{method}-{clients}"] = digits_run(settings)
    fedme = {**DIGITS, "method": "fedme", "num-clients": 20}
    report["in-process"]["fedme-20"] = digits_run(fedme, "in-process")
    if not args.quick:
        for clients in (10, 50):
            run = digits_run({**fedme, "num-clients": clients})
            report["scaling"][f"clients-{clients}"] = run["breakdown"]["round-s"]
        for pool in (100, 400, 800):
            report["scaling"][f"pool-{pool}"] = digits_run({**fedme, "unlabeled-size": pool})
    return report


def print_digits(report: dict[str, Any]) -> None:
    rows = []
    for name, run in report["breakdown"].items():
        b = run["breakdown"]
        rows.append((name, f"{b['round-s']:.2f}", f"{b['client-train-wall-s']:.2f}",
                     f"{b['server-outputs-s']:.3f}", f"{b['server-kmeans-s']:.3f}",
                     f"{b['server-messages-s']:.3f}", f"{b['server-aggregate-s']:.3f}",
                     f"{b['flower-and-evaluation-s']:.2f}", f"{run['fixed-s']:.1f}",
                     f"{run['peak-memory-gb']:.2f}"))
    print(table(rows, ("run", "round s", "client train s", "U inference s", "k-means s",
                       "packing s", "aggregation s", "Flower + eval s", "fixed s", "peak GB")))
    flower = report["breakdown"].get("fedme-20", {}).get("breakdown", {}).get("round-s")
    plain = report["in-process"]["fedme-20"]["breakdown"]["round-s"]
    if flower:
        print(f"\nFedMe, 20 clients: Flower {flower:.2f} s/round, in-process {plain:.2f} s/round,"
              f" ratio {flower / plain:.2f}")
    if report["scaling"]:
        print("\nscaling:", json.dumps(report["scaling"], indent=1))


# -------------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLine(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("images", "digits"), default="images")
    parser.add_argument("--quick", action="store_true",
                        help="images: 28x28, 20 clients, U=500, 3 rounds; digits: 20 clients")
    parser.add_argument("--shapes", nargs="+", choices=tuple(WORKLOADS), default=["28", "32"])
    parser.add_argument("--clients", nargs="+", type=int, default=[20, 100])
    parser.add_argument("--pools", nargs="+", type=int, default=[500, 1000])
    parser.add_argument("--methods", nargs="+", choices=("fedme", "fedavg"),
                        default=["fedme", "fedavg"])
    parser.add_argument("--rounds", type=int, default=5, help="K = 1 in rounds 1-2, then K = 2")
    parser.add_argument("--fraction-train", type=float, default=1.0,
                        help="share of the clients that train each round (all are evaluated)")
    parser.add_argument("--cluster-pool-size", type=int, default=RunConfig().cluster_pool_size,
                        help="fedme.cluster-pool-size: cluster on this many pool samples (0: all;"
                             " default: the app's)")
    parser.add_argument("--engine", choices=("flower", "in-process"), default="flower")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, help="JSON report (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.pools, args.rounds = ["28"], [500], 3
        args.clients = [20]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    images = args.suite == "images"
    report = images_suite(args) if images else digits_suite(args)
    out = args.out or OUT / ("round_time_images.json" if images else "round_time.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    if images:
        print_images(report)
    else:
        print_digits(report)
    print(f"\nreport: {out}", file=sys.stderr)


if __name__ == "__main__":
    run_command(main)
