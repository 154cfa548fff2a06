"""FedMe's automatic structure tuning against every fixed architecture (the paper's Table 5).

    .venv/bin/python benchmarks/fedme_tuning.py                       # digits and digits28
    .venv/bin/python benchmarks/fedme_tuning.py --datasets digits --seeds 0 1 2 --jobs 2

20 clients, two-level Dirichlet (sizes 10, labels 0.5), 100 rounds (at 40 every FedMe run is
still rising), E=2, the app's defaults otherwise. Variants: FedMe with each fixed candidate,
FedMe auto-tuned with the paper's rules and with ours (pooled local-best, other adoption rules,
a spread start), and FedAvg + fine-tuning. Every run is the real
server and client code run in one process without Flower's runtime
(:func:`fedapps.inprocess.run_in_process`), ``--jobs`` runs at once, one core each.

Prints, per data set, the mean over seeds of the client-mean accuracy after fine-tuning with its
SD over seeds and the mean SD over clients, final architectures, adoptions by architecture pair,
and whether the goal holds: auto-tuned >= best fixed - 0.5 points and >= FedAvg+FT.
Writes ``<out>/fedme_tuning.json`` and ``<out>/architectures-<dataset>.png`` (Table 3 over rounds).
Each finished run is appended to ``<out>/runs.jsonl`` at once; started again with the same
``--out``, the benchmark runs only what is missing (delete the file to start afresh).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from fedapps.compare import Comparison, RunResult
from fedapps.config import CommandLine, run_command
from fedapps.protocol.results import read_rounds

OUT = Path(__file__).parent / "results"
CANDIDATES = ["cnn1", "cnn2", "cnn3", "cnn4"]  # FedMe's candidates, smallest first
RUNS_LOG = "runs.jsonl"  # one line per finished run: an interrupted benchmark resumes
SETTINGS = {"num-clients": 20, "partitioner": "dirichlet", "alpha-label": 0.5,
            "alpha-size": 10.0, "num-rounds": 100, "local-epochs": 2, "eval-every": 5}


def auto(pooling: float, rule: str, warmup: float, init: str = "local-best") -> dict[str, Any]:
    """Auto-tuned FedMe with every tuning key spelled out (app defaults may change); ``warmup``
    is a share of the rounds."""
    return {"method": "fedme", "fedme.init-arch": init,
            "fedme.candidate-models": ",".join(CANDIDATES), "fedme.local-best-pooling": pooling,
            "fedme.adoption-rule": rule, "fedme.adoption-warmup": warmup,
            "fedme.adoption-margin": 0.0}


VARIANTS: dict[str, dict[str, Any]] = {
    **{f"fedme-{name}": {"method": "fedme", "fedme.init-arch": name} for name in CANDIDATES},
    "fedme-auto-default": {"method": "fedme"},  # whatever pyproject.toml makes the default
    "fedme-auto-paper": auto(0, "loss", 0),
    "fedme-auto-accuracy": auto(0, "accuracy", 0),
    "fedme-auto-warmup": auto(0, "loss", 0.2),
    "fedme-auto-pooled": auto(50, "loss", 0),
    "fedme-auto-pooled-accuracy": auto(50, "accuracy", 0),
    "fedme-auto-pooled-warmup": auto(50, "loss", 0.2),
    "fedme-auto-population": auto(50, "population", 0),
    "fedme-auto-population-warmup": auto(50, "population", 0.1),
    "fedme-auto-spread": auto(0, "loss", 0.25, init="spread"),
    "fedme-auto-spread-population": auto(0, "population", 0.25, init="spread"),
    "fedme-auto-spread-w50": auto(0, "loss", 0.5, init="spread"),
    "fedavg-ft": {"method": "fedavg", "model": "cnn2"},
    # the paper's other baselines (Table 4), on the model every baseline uses
    **{name: {"method": name, "model": "cnn2"}
       for name in ("local", "centralized", "hypcluster", "mapper", "fml", "pfedme")},
}
TABLE_4 = ["local", "centralized", "fedavg-ft", "hypcluster", "mapper", "fml", "pfedme",
           "fedme-auto-default", *(f"fedme-{name}" for name in CANDIDATES)]


def one_run(job: tuple[str, str, int, dict[str, Any]]) -> dict[str, Any]:
    """One (variant, data set, seed) in a fresh process with one torch thread."""
    import torch

    from fedapps.inprocess import run_in_process

    torch.set_num_threads(1)
    variant, dataset, seed, settings = job
    started = time.perf_counter()
    folder = run_in_process(settings)
    summary = json.loads((folder / "summary.json").read_text())
    reported = summary.get("reported", "after-finetune")  # the paper's figure for the method
    rows = read_rounds(folder)
    pairs: Counter[str] = Counter()
    for row in rows:
        pairs.update(row.get("adoption-pairs", {}))
    return {
        "variant": variant, "dataset": dataset, "seed": seed, "folder": str(folder),
        "wall-s": time.perf_counter() - started,
        "accuracy": summary[reported]["mean"],
        "client-sd": summary[reported]["sd"],
        "summary": {key: summary[key] for key in ("reported", "rounds", "before-finetune",
                                                   "after-finetune", "architectures")
                    if key in summary},
        "initial": Counter(summary.get("initial-architectures", {}).values()),
        "final": Counter(summary.get("architectures", {}).values()),
        "adoption-pairs": {k: v for k, v in pairs.items() if k.split(">")[0] != k.split(">")[1]},
        "architectures-by-round": [(r["round"], r["architectures"]) for r in rows
                                   if r.get("architectures")],
        "accuracy-by-round": [(r["round"], r["accuracy"]) for r in rows if "accuracy" in r],
        **drift_evidence(rows),
    }


def drift_evidence(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Why the population drifts, from the round log (docs/fedme-tuning.md).

    home-advantage: mean exchange-minus-personal validation accuracy, all comparisons;
    fixation-round: first round after which one architecture holds every client;
    early-changes: structure changes in rounds 1-5, toward a smaller vs a larger model.
    """
    gains = [v["exchange-val-accuracy"] - v["val-accuracy"]
             for r in rows for v in r.get("validation", {}).values() if "val-accuracy" in v]
    fixation = next((r["round"] for r in rows if len(r.get("architectures", {})) == 1), None)
    smaller = larger = 0
    for row in rows[:5]:
        for pair, count in row.get("adoption-pairs", {}).items():
            before, after = pair.split(">")
            smaller += count * (CANDIDATES.index(after) < CANDIDATES.index(before))
            larger += count * (CANDIDATES.index(after) > CANDIDATES.index(before))
    return {"home-advantage": statistics.fmean(gains) if gains else float("nan"),
            "fixation-round": fixation, "early-changes": {"smaller": smaller, "larger": larger}}


def finished_runs(out: Path, rounds: int) -> list[dict[str, Any]]:
    """Runs an earlier, interrupted invocation finished (same number of rounds)."""
    path = out / RUNS_LOG
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("rounds") == rounds]


def summarize(runs: list[dict[str, Any]], dataset: str,
              variants: list[str]) -> tuple[str, dict[str, Any]]:
    """A Markdown table of the asked variants for one data set, and the goal check."""
    lines = ["| variant | accuracy % (mean over seeds) | SD over seeds | SD over clients "
             "| seeds | before FT at round 40 / last | initial architectures | final architectures "
             "| architecture changes | fixation round | early changes smaller/larger "
             "| home advantage (val acc) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    means: dict[str, float] = {}
    for variant in variants:
        done = [r for r in runs if r["variant"] == variant and r["dataset"] == dataset]
        if not done:
            continue
        accuracies = [100 * r["accuracy"] for r in done]
        means[variant] = statistics.fmean(accuracies)
        seed_sd = statistics.stdev(accuracies) if len(done) > 1 else float("nan")
        client_sd = statistics.fmean(100 * r["client-sd"] for r in done)
        lines.append(
            f"| {variant} | {means[variant]:.2f} | {seed_sd:.2f} | {client_sd:.2f} | {len(done)} "
            f"| {_curve_points(done)} "
            f"| {_counts([r['initial'] for r in done])} | {_counts([r['final'] for r in done])} "
            f"| {sum(sum(r['adoption-pairs'].values()) for r in done) / len(done):.0f} "
            f"| {', '.join(str(r['fixation-round'] or '-') for r in done)} "
            f"| {sum(r['early-changes']['smaller'] for r in done)}/"
            f"{sum(r['early-changes']['larger'] for r in done)} "
            f"| {statistics.fmean(r['home-advantage'] for r in done):+.3f} |"
        )
    fixed = {v: m for v, m in means.items() if v.startswith("fedme-cnn")}
    goal: dict[str, Any] = {}
    if fixed and "fedavg-ft" in means:
        best = max(fixed, key=fixed.get)
        for variant in (v for v in means if v.startswith("fedme-auto")):
            goal[variant] = {
                "vs-best-fixed": means[variant] - fixed[best],
                "vs-fedavg-ft": means[variant] - means["fedavg-ft"],
                "met": means[variant] >= fixed[best] - 0.5
                and means[variant] >= means["fedavg-ft"],
            }
            lines.append(
                f"\n{variant}: {goal[variant]['vs-best-fixed']:+.2f} vs best fixed ({best}), "
                f"{goal[variant]['vs-fedavg-ft']:+.2f} vs FedAvg+FT -> goal "
                f"{'MET' if goal[variant]['met'] else 'NOT met'}"
            )
    return "\n".join(lines), goal


def _curve_points(done: list[dict[str, Any]]) -> str:
    """Mean test accuracy before fine-tuning at round 40 and at the last round: still rising?"""
    curves = [dict(r.get("accuracy-by-round", [])) for r in done]
    if not all(curves):
        return "-"
    points = [np.mean([100 * c.get(rnd, np.nan) for c in curves]) for rnd in (40, max(curves[0]))]
    return " / ".join(f"{p:.1f}" for p in points)


def _counts(counters: list[Counter[str]]) -> str:
    """Mean clients per architecture over seeds, e.g. 'cnn1 3.0 / cnn2 17.0'."""
    names = sorted({name for c in counters for name in c})
    return " / ".join(f"{n} {np.mean([c.get(n, 0) for c in counters]):.1f}" for n in names)


def comparison_of(runs: list[dict[str, Any]], dataset: str, variants: list[str]) -> Comparison:
    """One data set's runs as a :class:`fedapps.compare.Comparison` (tables, curves, plots;
    the notebook loads it with ``Comparison.load``). Runs recorded before the records kept
    their summary carry the reported figure only."""
    results = []
    for run in (r for r in runs if r["dataset"] == dataset and r["variant"] in variants):
        figures = {"mean": run["accuracy"], "sd": run["client-sd"]}
        summary = run.get("summary") or {"after-finetune": figures}
        results.append(RunResult(run["variant"], run["seed"], run["wall-s"], Path(run["folder"]),
                                 summary, [{"round": r, "accuracy": a}
                                           for r, a in run["accuracy-by-round"]]))
    labels = [v for v in variants if any(r.label == v for r in results)]
    return Comparison(labels, results)


def plot_architectures(runs: list[dict[str, Any]], dataset: str, out: Path,
                       variants: list[str]) -> Path | None:
    """Clients per architecture over rounds, mean over seeds, one panel per auto variant that
    has runs (None when there is none)."""
    auto_variants = [v for v in variants if v.startswith("fedme-auto")
                     and any(r["variant"] == v and r["dataset"] == dataset for r in runs)]
    if not auto_variants:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(auto_variants), figsize=(4 * len(auto_variants), 3.2),
                             sharey=True, squeeze=False)
    names = CANDIDATES
    for axis, variant in zip(axes[0], auto_variants):
        done = [r for r in runs if r["variant"] == variant and r["dataset"] == dataset]
        rounds = [rnd for rnd, _ in done[0]["architectures-by-round"]]
        counts = [[np.mean([dict(r["architectures-by-round"])[rnd].get(n, 0) for r in done])
                   for rnd in rounds] for n in names]
        axis.stackplot(rounds, counts, labels=names, alpha=0.85)
        axis.set(title=variant, xlabel="round")
    axes[0][0].set_ylabel("clients (mean over seeds)")
    axes[0][-1].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path = out / f"architectures-{dataset}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    parser = CommandLine(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "digits28"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=SETTINGS["num-rounds"])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (variant, dataset, seed,
         {**SETTINGS, **VARIANTS[variant], "dataset": dataset, "seed": seed,
          "num-rounds": args.rounds, "results-dir": str(args.out / "runs" / variant)})
        for dataset in args.datasets for seed in args.seeds for variant in args.variants
    ]
    started, runs = time.perf_counter(), finished_runs(args.out, args.rounds)
    done = {(r["variant"], r["dataset"], r["seed"]) for r in runs}
    todo = [job for job in jobs if job[:3] not in done]
    print(f"{len(jobs) - len(todo)} runs already in {args.out / RUNS_LOG}, {len(todo)} to go",
          flush=True)
    failed = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(one_run, job): job for job in todo}
        for future in as_completed(futures):
            variant, dataset, seed, _ = futures[future]
            try:
                run = future.result()
            except Exception as error:  # one failed run must not lose the others
                failed.append(f"{dataset} {variant} seed {seed} FAILED: {error}")
                print(failed[-1], flush=True)
                continue
            run["rounds"] = args.rounds
            with (args.out / RUNS_LOG).open("a") as stream:
                stream.write(json.dumps(run, default=str) + "\n")
            runs.append(run)
            print(f"[{time.perf_counter() - started:6.0f}s] {run['dataset']} {run['variant']} "
                  f"seed {run['seed']}: {100 * run['accuracy']:.2f} ± "
                  f"{100 * run['client-sd']:.2f}, final {dict(run['final'])}", flush=True)
    report: dict[str, Any] = {"settings": SETTINGS, "rounds": args.rounds, "seeds": args.seeds,
                              "cpus": os.cpu_count(), "jobs": args.jobs, "runs": runs, "goal": {}}
    for dataset in args.datasets:
        table, report["goal"][dataset] = summarize(runs, dataset, args.variants)
        print(f"\n## {dataset}\n{table}")
        if plot := plot_architectures(runs, dataset, args.out, args.variants):
            print(f"plot: {plot}")
        saved = comparison_of(runs, dataset, args.variants).save(args.out / dataset)
        print(f"comparison (Comparison.load): {saved['runs.json'].parent}")
    (args.out / "fedme_tuning.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\ntotal {time.perf_counter() - started:.0f}s with {args.jobs} jobs")
    for line in failed:  # the tables above leave these runs out: say so last, and fail
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_command(main)
