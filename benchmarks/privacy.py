"""What privacy costs (docs/privacy.md): accuracy against epsilon, and round time per option.

    .venv/bin/python benchmarks/privacy.py                      # all three parts, as documented
    .venv/bin/python benchmarks/privacy.py --parts accuracy --seeds 0 1 2 --rounds 40 --jobs 2
    .venv/bin/python benchmarks/privacy.py --parts timing deployment --timing-rounds 5

accuracy: digits, benchmarks/fedme_tuning.py's setting (20 clients, two-level Dirichlet, E=2)
for ``--rounds`` rounds; per epsilon in ``--epsilons`` the accountant calibrates the noise
multiplier for that many releases at delta 1e-5 (``privacy.target-epsilon``), and every variant
also runs without privacy (epsilon inf). Variants: FedAvg with central DP, FedAvg with local DP,
FedMe with local DP (FedMe has no average to noise centrally), all on cnn2 (FedMe's structure
tuning off: the privacy cost, not the architecture, is measured), and local training alone (the
floor: nothing is sent). Each run is the real server and client code in one process
(:func:`fedapps.inprocess.run_in_process`), ``--jobs`` at once. Reports the client-mean test
accuracy of the federated model before fine-tuning and after (the paper's figure; fine-tuning on
the client's own data recovers much of what the noise destroyed), mean and SD over seeds, with
the noise multiplier and the epsilon the run's own accountant reported.

timing: FedAvg on the same clients through Flower's simulation, as ``python -m fedapps.launch``
runs it (:func:`fedapps.launch.run_experiment`), with each option: none, central DP, local DP,
SecAgg+, SecAgg+ with central DP; and FedMe with and without local DP. Mean ``round-s`` (train
and evaluate phases) over rounds 2 to ``--timing-rounds`` (round 1 warms up),
``--timing-repeats`` runs each.

deployment: FedAvg on a real SuperLink with ``--deployment-clients`` SuperNodes on loopback
(``python -m fedapps.deploy``), without and with SecAgg+ (its four stages are four exchanges,
and the deployment runtime polls every 3 s).

Each finished run is appended to ``<out>/runs.jsonl`` at once; started again with the same
``--out`` the benchmark runs only what is missing. Prints Markdown tables; writes
``<out>/privacy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from fedme_tuning import SETTINGS  # the tuning benchmark's clients (benchmarks/ is on the path)

from fedapps.config import PROJECT, CommandLine, resolve, run_command
from fedapps.launch import run_experiment
from fedapps.protocol.results import read_rounds

OUT = Path(__file__).parent / "results" / "privacy"
RUNS_LOG = "runs.jsonl"
MODEL = {"model": "cnn2"}  # FedMe variants fix fedme.init-arch to it too
ACCURACY_VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg-central": {"method": "fedavg", "privacy.mode": "central"},
    "fedavg-local": {"method": "fedavg", "privacy.mode": "local"},
    "fedme-local": {"method": "fedme", "fedme.init-arch": "cnn2", "privacy.mode": "local"},
}
FLOOR = {"local": {"method": "local"}}  # no federation: the accuracy no DP run needs to beat
TIMING_VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg": {"method": "fedavg"},
    "fedavg-central": {"method": "fedavg", "privacy.mode": "central"},
    "fedavg-local": {"method": "fedavg", "privacy.mode": "local"},
    "fedavg-secagg": {"method": "fedavg", "privacy.secagg": 1},
    "fedavg-secagg-central": {"method": "fedavg", "privacy.secagg": 1,
                              "privacy.mode": "central"},
    "fedme": {"method": "fedme", "fedme.init-arch": "cnn2"},
    "fedme-local": {"method": "fedme", "fedme.init-arch": "cnn2", "privacy.mode": "local"},
}
DEPLOYMENT_VARIANTS = {"fedavg": {}, "fedavg-secagg": {"privacy.secagg": 1}}


# --------------------------------------------------------------------------- the runs


def accuracy_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One job per (variant, epsilon, seed); epsilon None: the variant without privacy."""
    jobs = []
    for seed in args.seeds:
        for variant, options in {**ACCURACY_VARIANTS, **FLOOR}.items():
            for epsilon in ([None] if variant in FLOOR else [*args.epsilons, None]):
                private = ({"privacy.target-epsilon": epsilon} if epsilon is not None
                           else {"privacy.mode": "none"})
                jobs.append({"part": "accuracy", "variant": variant, "epsilon": epsilon,
                             "seed": seed, "rounds": args.rounds,
                             "settings": {**base_settings(args), **options, **private,
                                          "num-rounds": args.rounds, "seed": seed}})
    return unique(jobs)


def base_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {**SETTINGS, **MODEL, "num-clients": args.clients}


def unique(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FedAvg without privacy is one run, whichever of its variants asked for it."""
    seen, kept = set(), []
    for job in jobs:
        key = json.dumps(job["settings"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(job)
    return kept


def accuracy_run(job: dict[str, Any]) -> dict[str, Any]:
    """One accuracy run in a fresh process with one torch thread."""
    import torch

    from fedapps.inprocess import run_in_process

    torch.set_num_threads(1)
    started = time.perf_counter()
    folder = run_in_process({**job["settings"], "results-dir": job["results-dir"]})
    summary = json.loads((folder / "summary.json").read_text())
    report = summary.get("privacy", {})
    return {**key_of(job), "folder": str(folder), "wall-s": time.perf_counter() - started,
            "accuracy": summary["after-finetune"]["mean"],
            "accuracy-before-finetune": summary["before-finetune"]["mean"],
            "client-sd": summary["after-finetune"]["sd"],
            "epsilon-spent": report.get("epsilon"),
            "noise-multiplier": report.get("noise-multiplier")}


def timing_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"part": "timing", "variant": variant, "seed": repeat, "rounds": args.timing_rounds,
             "settings": {**base_settings(args), **options, "num-rounds": args.timing_rounds,
                          "eval-every": 1, "finetune-epochs": 0, "seed": repeat}}
            for repeat in range(args.timing_repeats) for variant, options in
            TIMING_VARIANTS.items()]


def timing_run(job: dict[str, Any]) -> dict[str, Any]:
    """One run as ``python -m fedapps.launch`` runs it: ``flwr run`` on a local SuperLink."""
    started = time.perf_counter()
    outcome = run_experiment(resolve(None, {**job["settings"], "results-dir": job["results-dir"]}))
    if outcome.code:
        raise RuntimeError(outcome.reason)
    folder = outcome.folders[-1]
    return {**key_of(job), "folder": str(folder), "wall-s": time.perf_counter() - started,
            **round_times(folder)}


def deployment_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"part": "deployment", "variant": variant, "seed": 0, "rounds": args.timing_rounds,
             "settings": {"method": "fedavg", "model": "cnn2", "num-clients":
                          args.deployment_clients, "num-rounds": args.timing_rounds,
                          "local-epochs": 2, "finetune-epochs": 0, **options}}
            for variant, options in DEPLOYMENT_VARIANTS.items()]


def deployment_run(job: dict[str, Any]) -> dict[str, Any]:
    """One run on a SuperLink and real SuperNodes on loopback (``python -m fedapps.deploy``)."""
    results = Path(job["results-dir"])
    settings = {**job["settings"], "results-dir": str(results)}
    overrides = [part for key, value in settings.items()
                 for part in ("--set", f"{key}={json.dumps(value)}")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        done = subprocess.run([sys.executable, "-m", "fedapps.deploy", "--home", home,
                               *overrides], cwd=PROJECT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fedapps.deploy exited with {done.returncode}: "
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    [folder] = sorted(results.glob("fedavg-*"))[-1:]
    return {**key_of(job), "folder": str(folder), "wall-s": time.perf_counter() - started,
            **round_times(folder)}


def round_times(folder: Path) -> dict[str, Any]:
    """Seconds per round after the first (which includes warm-up)."""
    seconds = [row["round-s"] for row in read_rounds(folder)][1:]
    return {"round-s": statistics.fmean(seconds) if seconds else None, "round-s-all": seconds}


def key_of(job: dict[str, Any]) -> dict[str, Any]:
    return {key: job.get(key) for key in ("part", "variant", "epsilon", "seed", "rounds")}


# ---------------------------------------------------------------------- bookkeeping


def finished_runs(out: Path) -> list[dict[str, Any]]:
    path = out / RUNS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_all(jobs: list[dict[str, Any]], runner: Callable[[dict[str, Any]], dict[str, Any]],
            out: Path, runs: list[dict[str, Any]], workers: int, failed: list[str]) -> None:
    """The jobs not yet in ``runs``; each result is logged to ``RUNS_LOG`` as it finishes, each
    failure added to ``failed``."""
    done = {json.dumps(key_of(run), sort_keys=True) for run in runs}
    todo = [job for job in jobs if json.dumps(key_of(job), sort_keys=True) not in done]
    print(f"{len(jobs) - len(todo)} {jobs[0]['part'] if jobs else ''} runs already done, "
          f"{len(todo)} to go", flush=True)
    for job in todo:
        job["results-dir"] = str(out / "runs" / job["part"] / job["variant"])
    for run in run_each(todo, runner, workers, failed):
        with (out / RUNS_LOG).open("a") as stream:
            stream.write(json.dumps(run) + "\n")
        runs.append(run)
        print(f"{run['part']} {run['variant']} epsilon={run['epsilon']} seed={run['seed']}: "
              f"{run.get('accuracy', run.get('round-s'))} ({run['wall-s']:.0f}s)", flush=True)


def run_each(jobs: list[dict[str, Any]], runner: Callable[[dict[str, Any]], dict[str, Any]],
             workers: int, failed: list[str]) -> Iterable[dict[str, Any]]:
    """Results as they come; a failed run is reported (and added to ``failed``), the others go
    on."""
    if workers <= 1:
        for job in jobs:
            try:
                yield runner(job)
            except Exception as error:
                failed.append(f"{key_of(job)} FAILED: {error}")
                print(failed[-1], flush=True)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(runner, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as error:
                failed.append(f"{key_of(futures[future])} FAILED: {error}")
                print(failed[-1], flush=True)


# --------------------------------------------------------------------------- tables


def accuracy_table(runs: list[dict[str, Any]], epsilons: list[float], rounds: int,
                   key: str) -> str:
    """Accuracy % (``key``: after or before fine-tuning; mean ± SD over seeds) per variant and
    epsilon; epsilon inf is the variant's method without privacy."""
    done = [r for r in runs if r["part"] == "accuracy" and r["rounds"] == rounds]
    columns = [*epsilons, None]
    lines = ["| variant | " + " | ".join(f"epsilon {e:g}" if e else "epsilon inf (no DP)"
                                          for e in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for variant in [*ACCURACY_VARIANTS, *FLOOR]:
        method = {**ACCURACY_VARIANTS, **FLOOR}[variant]["method"]
        cells = []
        for epsilon in columns:
            chosen = [r for r in done if r["epsilon"] == epsilon and
                      (r["variant"] == variant or epsilon is None and
                       r["variant"].split("-")[0] == method)]
            cells.append(accuracy_cell(chosen, key))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_cell(runs: list[dict[str, Any]], key: str) -> str:
    if not runs:
        return "-"
    accuracies = [100 * r[key] for r in runs]
    spread = statistics.stdev(accuracies) if len(runs) > 1 else float("nan")
    spent = [r["epsilon-spent"] for r in runs if r["epsilon-spent"] is not None]
    noise = f", z {runs[0]['noise-multiplier']:.2f}, spent {max(spent):.2f}" if spent else ""
    return f"{statistics.fmean(accuracies):.1f} ± {spread:.1f} ({len(runs)} seeds{noise})"


def time_table(runs: list[dict[str, Any]], part: str) -> str:
    done = [r for r in runs if r["part"] == part and r.get("round-s") is not None]
    baseline = {method: statistics.fmean(r["round-s"] for r in done if r["variant"] == method)
                for method in ("fedavg", "fedme") if any(r["variant"] == method for r in done)}
    lines = ["| option | s/round (mean over runs) | runs | vs no privacy |", "|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in done):
        seconds = statistics.fmean(r["round-s"] for r in done if r["variant"] == variant)
        base = baseline.get(variant.split("-")[0])
        ratio = f"{seconds / base:.2f}x" if base else "-"
        count = sum(r["variant"] == variant for r in done)
        lines.append(f"| {variant} | {seconds:.2f} | {count} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = CommandLine(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["accuracy", "timing", "deployment"],
                        choices=["accuracy", "timing", "deployment"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clients", type=int, default=SETTINGS["num-clients"])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--deployment-clients", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started, runs = time.perf_counter(), finished_runs(args.out)
    parts = {"accuracy": (accuracy_jobs, accuracy_run, args.jobs),
             "timing": (timing_jobs, timing_run, 1),
             "deployment": (deployment_jobs, deployment_run, 1)}
    failed: list[str] = []
    for part in args.parts:
        make_jobs, runner, workers = parts[part]
        run_all(make_jobs(args), runner, args.out, runs, workers, failed)
    tables = {"accuracy after fine-tuning": accuracy_table(runs, args.epsilons, args.rounds,
                                                           "accuracy"),
              "accuracy before fine-tuning": accuracy_table(runs, args.epsilons, args.rounds,
                                                            "accuracy-before-finetune"),
              "timing": time_table(runs, "timing"),
              "deployment": time_table(runs, "deployment")}
    for title, table in tables.items():
        if title.split()[0] in args.parts:
            print(f"\n## {title}\n{table}")
    report = {"settings": {**base_settings(args), "num-rounds": args.rounds}, "args": {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "cpus": os.cpu_count(), "tables": tables, "runs": runs}
    (args.out / "privacy.json").write_text(json.dumps(report, indent=1))
    print(f"\ntotal {time.perf_counter() - started:.0f}s; {args.out / 'privacy.json'}")
    for line in failed:  # the tables leave these runs out: say so last, and fail
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_command(main)
