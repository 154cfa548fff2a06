"""Benchmark: synchronous vs asynchronous distillation FL, global accuracy against time.

    .venv/bin/python benchmarks/async_distill.py [--config conf/async-shapes-3iid.toml]
        [--seeds 0,1,2] [--targets 0.4,0.5,0.6 | auto] [--set key=value ...]
        [--only NAME ...] [--out results/benchmarks]

Runs the paper's four variants and ours on the same data, clients, models and seed (the config
file, with only the scheme keys changed per variant), each in Flower's simulation, for every
seed, then writes ``table.md``, ``accuracy-vs-time.png`` and ``benchmark.json`` into one folder.

Time axis: seconds since the global model's first snapshot (version 0), i.e. after the
simulation has started, the clients answered and the initial forward distillation is done; that
start-up is the same for every variant and part of neither scheme. The global model is
snapshotted on the fixed grid ``distill.snapshot-every-s`` (and when a pass ends before the server
waits), in every variant alike, and the snapshots are tested after the run on the server's
held-out test set. "Time to target" is the first snapshot whose accuracy reaches the target; the
true first crossing lies after the snapshot before it (or the start of the pass it falls in,
when later: the model does not change between passes), so that gap is printed as the time's
resolution, relative to the time.

Breakdown (seconds, same definitions for every variant): client training (the clients' own
training time, summed; clients take turns on one core), distillation (reverse + forward passes),
clients waiting (the averaging rounds' wall time minus client training: distillation in the
synchronous scheme, messaging and aggregation in both), distillation server idle (run time minus
distillation).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from fedapps.config import (  # noqa: E402
    exit_on_bad_input,  # noqa: E402
    parse_override,
    resolve,
)
from fedapps.methods.distill.distillation import GLOBAL_LOG, PASSES_LOG, read_log  # noqa: E402
from fedapps.protocol.results import read_rounds, write_json  # noqa: E402
from fedapps.simulation import simulate  # noqa: E402

FORWARD_EVERY_OURS = 4
CLIENT_CPUS = 2.0
AUTO_TARGETS = (0.6, 0.8, 0.95)  # --targets auto: shares of sync+forward's lowest best accuracy
RESOLUTION_LIMIT = 0.05  # the bound on a time-to-target's uncertainty
VARIANTS: dict[str, dict[str, Any]] = {
    "sync + forward": {"method": "sync-distill", "distill.forward-distill-every": 1},
    "sync": {"method": "sync-distill", "distill.forward-distill-every": 0},
    "async per-round": {"method": "async-distill", "distill.mode": "per-round",
                        "distill.forward-distill-every": 0},
    "async continuous": {"method": "async-distill", "distill.mode": "continuous",
                         "distill.forward-distill-every": 0},
    "async continuous + recovery (ours)": {"method": "async-distill",
                                           "distill.mode": "continuous",
                                           "distill.forward-distill-every": FORWARD_EVERY_OURS},
}
BASELINE, FAST, OURS = "sync + forward", "async continuous", "async continuous + recovery (ours)"


def run_variant(values: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """One run; returns its snapshots, passes and rounds on the benchmark's time axis."""
    # Ray gets 2 CPUs and each client asks for 2: clients take turns on one core, leaving the
    # other to the distillation server (the paper's separate machines), in every variant.
    folder = simulate({**values, **changes}, num_cpus=CLIENT_CPUS)
    tests = read_log(folder / GLOBAL_LOG)
    if not tests or tests[0]["version"] != 0:
        raise RuntimeError(f"{folder}: no initial global snapshot in {GLOBAL_LOG}")
    start = tests[0]["time"]
    shift = lambda t: round(t - start, 3)  # noqa: E731 - one-line change of time axis
    return {
        "folder": str(folder),
        "points": [(shift(r["time"]), r["accuracy"]) for r in tests],
        "passes": [{**p, "start": shift(p["start"]), "end": shift(p["end"])}
                   for p in read_log(folder / PASSES_LOG)],
        "rounds": [{"time": shift(r["time"]), "client-train-s": r.get("client-train-s", 0.0)}
                   for r in read_rounds(folder)],
        "load-average": round(os.getloadavg()[0], 1),
    }


def time_to(run: Mapping[str, Any], target: float) -> tuple[float | None, float | None]:
    """First snapshot time at or above ``target`` and its resolution (None, None: never)."""
    points = run["points"]
    for index, (time, accuracy) in enumerate(points):
        if accuracy >= target:
            before = points[index - 1][0] if index else 0.0
            pass_starts = [p["start"] for p in run["passes"]
                           if p["kind"] == "reverse" and p["start"] <= time <= p["end"]]
            since = max([before, *pass_starts])
            return time, time - since
    return None, None


def breakdown(run: Mapping[str, Any]) -> dict[str, float]:
    """Where the time went (the definitions are in the module docstring)."""
    distill = sum(p["end"] - p["start"] for p in run["passes"])
    client = sum(r["client-train-s"] for r in run["rounds"])
    rounds_end = run["rounds"][-1]["time"] if run["rounds"] else 0.0
    end = run["points"][-1][0]
    return {"end-s": end, "rounds-end-s": rounds_end,
            "s-per-round": rounds_end / max(len(run["rounds"]), 1),
            "client-train-s": client, "distill-s": distill,
            "clients-wait-s": rounds_end - client, "server-idle-s": end - distill}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 1, of: int | None = None) -> str:
    """'mean ± SD', with 'k/n' when only k of n seeds gave a value."""
    if not values:
        return "not reached"
    mean, sd = mean_sd(values)
    text = f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return text if of is None or len(values) == of else f"{text} ({len(values)}/{of})"


def choose_targets(spec: str, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[float]:
    if spec != "auto":
        return sorted(float(t) for t in spec.split(","))
    if BASELINE not in runs:
        raise SystemExit(f"--targets auto needs the '{BASELINE}' variant; give --targets")
    best = min(max(a for _, a in run["points"]) for run in runs[BASELINE])
    return [int(share * best * 100) / 100 for share in AUTO_TARGETS]


def table(runs: Mapping[str, Sequence[Mapping[str, Any]]], targets: Sequence[float]) -> str:
    """Mean ± SD over seeds per variant: times to targets, accuracy, breakdown; then ratios."""
    seeds = len(next(iter(runs.values())))
    head = " | ".join(f"to {t:.0%} (s)" for t in targets)
    lines = [f"| variant | {head} | final accuracy | best accuracy | run ends (s) "
             "| s / averaging round | client training (s) | distillation (s) "
             "| clients waiting (s) | distillation server idle (s) | worst resolution |",
             "|---" * (len(targets) + 10) + "|"]
    for name, variant_runs in runs.items():
        times = [[time_to(run, t) for run in variant_runs] for t in targets]
        cells = [fmt([v for v, _ in column if v is not None], of=seeds) for column in times]
        resolution = [gap / v for column in times for v, gap in column if v]
        parts = {key: [breakdown(run)[key] for run in variant_runs] for key in breakdown(
            variant_runs[0])}
        lines.append(
            f"| {name} | {' | '.join(cells)} "
            f"| {fmt([r['points'][-1][1] for r in variant_runs], 4)} "
            f"| {fmt([max(a for _, a in r['points']) for r in variant_runs], 4)} "
            f"| {fmt(parts['end-s'])} | {fmt(parts['s-per-round'], 2)} "
            f"| {fmt(parts['client-train-s'])} | {fmt(parts['distill-s'])} "
            f"| {fmt(parts['clients-wait-s'])} | {fmt(parts['server-idle-s'])} "
            f"| {max(resolution, default=0):.1%} |")
    return "\n".join(lines) + "\n\n" + ratios(runs, targets)


def ratios(runs: Mapping[str, Sequence[Mapping[str, Any]]], targets: Sequence[float]) -> str:
    """Speed-up of async continuous over sync+forward, paired by seed, and the design's bound."""
    if BASELINE not in runs or FAST not in runs:
        return ""
    lines = []
    for target in targets:
        pairs = [(time_to(base, target)[0], time_to(fast, target)[0])
                 for base, fast in zip(runs[BASELINE], runs[FAST])]
        values = [b / f for b, f in pairs if b and f]  # a 0 s time (at start) has no ratio
        ratio = f"{fmt(values, 2, of=len(pairs))}x" if values else "no seed reached it in both"
        lines.append(f"- speed-up {FAST} vs {BASELINE} to {target:.0%}: {ratio}")
    bound = [breakdown(b)["s-per-round"] / breakdown(f)["s-per-round"]
             for b, f in zip(runs[BASELINE], runs[FAST])]
    lines.append(f"- seconds per averaging round, {BASELINE} / {FAST}: {fmt(bound, 2)}x (the "
                 "speed-up if the global model needed as many rounds in both schemes)")
    if OURS in runs:
        base = [r["points"][-1][1] for r in runs[BASELINE]]
        ours = [r["points"][-1][1] for r in runs[OURS]]
        (mean_base, sd_base), (mean_ours, _) = mean_sd(base), mean_sd(ours)
        verdict = "within" if mean_ours >= mean_base - sd_base else "below"
        lines.append(f"- final accuracy of ours {mean_ours:.4f} vs {BASELINE} {mean_base:.4f} "
                     f"± {sd_base:.4f}: {verdict} one SD")
    return "\n".join(lines) + "\n"


def resolution_warnings(runs: Mapping[str, Sequence[Mapping[str, Any]]],
                        targets: Sequence[float]) -> list[str]:
    warnings = []
    for name, variant_runs in runs.items():
        for target in targets:
            for seed, run in enumerate(variant_runs):
                time, gap = time_to(run, target)
                if time and gap / time > RESOLUTION_LIMIT:
                    warnings.append(f"{name}, run {seed}, {target:.0%}: time {time:.1f}s known "
                                    f"to {gap:.1f}s (> {RESOLUTION_LIMIT:.0%}); lower "
                                    "distill.snapshot-every-s")
    return warnings


def plot(runs: Mapping[str, Sequence[Mapping[str, Any]]], targets: Sequence[float],
         title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(9, 5.5))
    for index, (name, variant_runs) in enumerate(runs.items()):
        for seed, run in enumerate(variant_runs):
            times, accuracies = zip(*run["points"])
            axis.step(times, accuracies, where="post", color=f"C{index}", linewidth=1,
                      alpha=0.8, label=name if seed == 0 else None)
    for target in targets:
        axis.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    axis.set(xlabel="wall-clock seconds since the first global snapshot",
             ylabel="global model test accuracy (server's held-out set)", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT / "conf" / "async-shapes-3iid.toml"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument("--targets", default="auto",
                        help="comma-separated accuracies, or 'auto': "
                             f"{', '.join(f'{100 * s:.0f}%%' for s in AUTO_TARGETS)} of "
                             f"{BASELINE}'s lowest best accuracy over the seeds")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--only", action="append", choices=list(VARIANTS),
                        help="run only these variants (default: all five)")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    values = resolve(args.config, dict(args.overrides))
    folder = Path(args.out) / f"async-distill-{datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.only or VARIANTS}
    for seed in seeds:  # seeds outermost: a stopped benchmark still covers every variant
        for name in runs:
            print(f"=== {name}, seed {seed}", flush=True)
            runs[name].append(run_variant({**values, "seed": seed}, VARIANTS[name]))
            write_json(folder / "benchmark.json", {"config": values, "seeds": seeds,
                                                   "runs": runs})
    targets = choose_targets(args.targets, runs)
    text = table(runs, targets)
    warnings = resolution_warnings(runs, targets)
    (folder / "table.md").write_text(
        f"{Path(args.config).name}, seeds {args.seeds}, targets "
        f"{', '.join(f'{t:.0%}' for t in targets)}; mean ± SD over seeds\n\n{text}\n"
        + "".join(f"- resolution: {w}\n" for w in warnings)
        + f"\nHardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores; load average during the runs "
        f"{min(r['load-average'] for rs in runs.values() for r in rs)}-"
        f"{max(r['load-average'] for rs in runs.values() for r in rs)}; "
        f"{datetime.now():%Y-%m-%d}\n")
    write_json(folder / "benchmark.json",
               {"config": values, "seeds": seeds, "targets": targets, "runs": runs})
    plot(runs, targets, f"Sync vs async distillation FL ({Path(args.config).stem}, "
         f"{len(seeds)} seeds)", folder / "accuracy-vs-time.png")
    print(text + "".join(f"resolution: {w}\n" for w in warnings), flush=True)
    print(f"written to {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main))
