"""Where a round's time goes, what Flower costs, and how runs scale (issue 7).

    .venv/bin/python benchmarks/round_time.py            # everything, ~15 min on 2 cores
    .venv/bin/python benchmarks/round_time.py --quick    # 20 clients only

Prints tables and writes ``benchmarks/results/round_time.json``:

1. Round-time breakdown, FedMe vs FedAvg, 20 and 100 clients: client training (summed over
   clients, and divided by the clients running at once), server inference on the unlabeled pool,
   k-means, message packing (serialization), aggregation, and the rest (Flower's own overhead plus
   evaluation), from the per-round timings in ``rounds.jsonl``; plus the run's fixed start-up cost.
2. The same FedMe rounds without Flower's runtime: the same strategy object and the same client
   handlers called directly in this process (:class:`fedapps.inprocess.InProcessGrid`), same data, seeds, epochs.
   Ratio = Flower round time / in-process round time.
3. Peak memory (this process and all its children, e.g. Ray workers) at 20 and 100 clients.
4. Scaling: FedMe round time at 10, 20, 50, 100 clients and with unlabeled pools of 100-800.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any

import psutil

from fedapps.inprocess import run_in_process
from fedapps.results import read_rounds
from fedapps.simulation import simulate

OUT = Path(__file__).parent / "results"
# IID with small clients: digits has too few images for 100 Dirichlet-sized clients.
BASE = {"num-rounds": 5, "local-epochs": 2, "init-arch": "random", "cluster-schedule": "1:1,3:2",
        "finetune-epochs": 0, "seed": 0, "partitioner": "iid", "min-client-samples": 5}
PARALLEL_CLIENTS = 2  # Ray actors on this 2-core machine (client-resources-num-cpus=1)


class PeakMemory:
    """Samples the RSS of this process tree every 0.2 s."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
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

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def breakdown(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per round of each part, skipping round 1 (warm-up)."""
    rows = rows[1:] or rows
    parts = ("round-s", "client-train-s", "server-outputs-s", "server-kmeans-s",
             "server-messages-s", "server-aggregate-s")
    mean = {key: statistics.fmean(r.get(key, 0.0) for r in rows) for key in parts}
    mean["client-train-wall-s"] = mean["client-train-s"] / PARALLEL_CLIENTS
    known = sum(mean[k] for k in parts[2:]) + mean["client-train-wall-s"]
    mean["flower-and-evaluation-s"] = max(0.0, mean["round-s"] - known)
    return mean


def flower_run(settings: Mapping[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    with PeakMemory() as memory:
        folder = simulate(settings)
    wall = time.perf_counter() - started
    rows = read_rounds(folder)
    summary = json.loads((folder / "summary.json").read_text())
    rounds_s = sum(r["round-s"] for r in rows)
    return {
        "settings": dict(settings),
        "wall-s": wall,
        "fixed-s": wall - rounds_s,  # start-up (Ray, SuperNodes, discovery) and final evaluation
        "peak-memory-gb": memory.peak / 1e9,
        "breakdown": breakdown(rows),
        "accuracy": summary["after-finetune"]["mean"],
    }


def in_process_run(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The same server run, its messages answered in this process: no Flower runtime."""
    folder = run_in_process(settings)
    return {"settings": dict(settings), "breakdown": breakdown(read_rounds(folder))}


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 clients only")
    args = parser.parse_args()
    sizes = [20] if args.quick else [20, 100]
    report: dict[str, Any] = {"date": date.today().isoformat(), "cpus": os.cpu_count(),
                              "machine": platform.processor() or platform.machine(),
                              "breakdown": {}, "in-process": {}, "scaling": {}}
    for clients in sizes:
        for method in ("fedme", "fedavg"):
            settings = {**BASE, "method": method, "num-clients": clients,
                        "results-dir": str(OUT / "runs")}
            report["breakdown"][f"{method}-{clients}"] = flower_run(settings)
            print(f"done: {method} with {clients} clients", flush=True)
    settings = {**BASE, "method": "fedme", "num-clients": 20, "results-dir": str(OUT / "runs")}
    report["in-process"]["fedme-20"] = in_process_run(settings)
    if not args.quick:
        for clients in (10, 50):
            run = flower_run({**settings, "num-clients": clients})
            report["scaling"][f"clients-{clients}"] = run["breakdown"]["round-s"]
        for pool in (100, 400, 800):
            run = flower_run({**settings, "unlabeled-size": pool})
            report["scaling"][f"pool-{pool}"] = run["breakdown"]
    OUT.mkdir(exist_ok=True)
    (OUT / "round_time.json").write_text(json.dumps(report, indent=2))
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for name, run in report["breakdown"].items():
        b = run["breakdown"]
        rows.append((name, f"{b['round-s']:.2f}", f"{b['client-train-wall-s']:.2f}",
                     f"{b['server-outputs-s']:.3f}", f"{b['server-kmeans-s']:.3f}",
                     f"{b['server-messages-s']:.3f}", f"{b['server-aggregate-s']:.3f}",
                     f"{b['flower-and-evaluation-s']:.2f}", f"{run['fixed-s']:.1f}",
                     f"{run['peak-memory-gb']:.2f}"))
    print(table(rows, ("run", "round s", "client train s", "U inference s", "k-means s",
                       "packing s", "aggregation s", "Flower + eval s", "fixed s",
                       "peak GB")))
    flower = report["breakdown"].get("fedme-20", {}).get("breakdown", {}).get("round-s")
    plain = report["in-process"]["fedme-20"]["breakdown"]["round-s"]
    if flower:
        print(f"\nFedMe, 20 clients: Flower {flower:.2f} s/round, in-process {plain:.2f} s/round,"
              f" ratio {flower / plain:.2f}")
    if report["scaling"]:
        print("\nscaling:", json.dumps(report["scaling"], indent=1))


if __name__ == "__main__":
    main()
