"""Do FedMe's clusters change when the server clusters on a sample of its pool? (issue 14)

    .venv/bin/python benchmarks/cluster_sample.py                  # digits28, 3 seeds, ~6 min
    .venv/bin/python benchmarks/cluster_sample.py --sizes 50 100 --seeds 0

Runs FedMe (the real strategy and client handlers, in-process, ``--jobs`` runs at once) on the
whole pool U. The inference seconds it prints are with those runs sharing the cores (each pool
pass takes every core), so they compare sample sizes with each other, not with a real round.

In every round with K >= 2 the same models are also clustered on seeded samples of U
(``fedme.cluster-pool-size``, :func:`cluster_inputs`) and, as the noise floor, on the whole pool
with another k-means seed. Each clustering is compared with the one the run used by the adjusted
Rand index (1: the same partition of the models; 0: chance). The run itself is unchanged: the
comparisons only read its models. Prints, per sample size, the ARI over all K >= 2 rounds and
seeds, the share of rounds with an identical partition, and the seconds of pool inference.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from fedapps.config import CommandLine, run_command

OUT = Path(__file__).parent / "results" / "cluster-sample"
SETTINGS = {"method": "fedme", "dataset": "digits28", "num-clients": 20,
            "partitioner": "dirichlet", "alpha-label": 0.5, "alpha-size": 10.0,
            "unlabeled-size": 500, "num-rounds": 40, "local-epochs": 2, "eval-every": 5,
            "fedme.init-arch": "random", "fedme.cluster-schedule": "paper",
            "fedme.cluster-pool-size": 0}
NOISE_FLOOR = "whole pool, other k-means seed"


def compare_run(job: tuple[int, list[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """One FedMe run on the whole pool; one row per (K >= 2 round, comparison)."""
    import torch
    from sklearn.metrics import adjusted_rand_score

    from fedapps import training
    from fedapps.inprocess import run_in_process
    from fedapps.methods.fedme import server, strategy

    torch.set_num_threads(1)
    seed, sizes, settings = job
    rows: list[dict[str, Any]] = []

    class Comparing(strategy.FedMe):
        """FedMe that also clusters its models on samples of U and reports the agreement."""

        def _cluster(self, pids: list[int], server_round: int) -> strategy.Clustering:
            used = super()._cluster(pids, server_round)
            k = self.config.clusters_at(server_round)
            if k == 1:
                return used
            models = [self.models[p].model for p in pids]
            inputs = {size: strategy.cluster_inputs(self.cluster_pool, size, self.config.seed)
                      for size in sizes}
            inputs[NOISE_FLOOR] = self.cluster_pool  # the whole pool: the run sets size 0
            for label, pool in inputs.items():
                started = time.perf_counter()
                outputs = training.predict_all(models, pool, self.device)
                seconds = time.perf_counter() - started
                features = np.stack([strategy.model_features(o, self.config.cluster_on)
                                     for o in outputs])
                kmeans_seed = self.config.seed + server_round + (1000 if label == NOISE_FLOOR
                                                                 else 0)
                other = strategy.cluster_models(features, k, kmeans_seed,
                                                self.config.kmeans_restarts)
                rows.append({"seed": seed, "round": server_round, "k": k, "sample": label,
                             "ari": adjusted_rand_score(used.labels, other.labels),
                             "inference-s": seconds, "whole-pool-s": used.inference_s})
            return used

    server.FedMe = Comparing  # run_fedme builds its strategy from this name
    run_in_process({**settings, "seed": seed})
    return rows


def summarize(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    lines = ["| clustered on | ARI mean ± SD | min ARI | identical partitions | "
             "pool inference s (whole pool) |", "|---|---|---|---|---|"]
    for label in [*sizes, NOISE_FLOOR]:
        mine = [r for r in rows if r["sample"] == label]
        if not mine:
            continue
        ari = [r["ari"] for r in mine]
        same = sum(a > 1 - 1e-9 for a in ari)
        seconds = statistics.fmean(r["inference-s"] for r in mine)
        whole = statistics.fmean(r["whole-pool-s"] for r in mine)
        name = f"{label} samples" if isinstance(label, int) else label
        lines.append(f"| {name} | {statistics.fmean(ari):.3f} ± "
                     f"{statistics.pstdev(ari):.3f} | {min(ari):.3f} | {same} of {len(ari)} | "
                     f"{seconds:.3f} ({whole:.3f}) |")
    return "\n".join(lines)


def main() -> int:
    parser = CommandLine(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=SETTINGS["num-rounds"])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    settings = {**SETTINGS, "num-rounds": args.rounds, "results-dir": str(args.out / "runs")}
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        rows = [row for run in pool.map(compare_run, [(seed, args.sizes, settings)
                                                      for seed in args.seeds]) for row in run]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparisons.json").write_text(json.dumps(rows, indent=1, default=str))
    table = summarize(rows, args.sizes)
    header = (f"{settings['dataset']}, {settings['num-clients']} clients, U = "
              f"{settings['unlabeled-size']}, {args.rounds} rounds, seeds "
              f"{','.join(map(str, args.seeds))}; every K >= 2 round; "
              f"{time.perf_counter() - started:.0f} s")
    (args.out / "table.md").write_text(header + "\n\n" + table + "\n")
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    run_command(main)
