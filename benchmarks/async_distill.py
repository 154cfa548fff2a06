"""Benchmark: synchronous vs asynchronous distillation FL, global accuracy against time.

    .venv/bin/python benchmarks/async_distill.py [--config conf/async-shapes-3iid.toml]
        [--seeds 0,1,2] [--targets 0.4,0.5,0.6 | auto | top] [--set key=value ...]
        [--time-budget none | baseline | SECONDS] [--max-rounds 1000]
        [--only NAME ...] [--out results/benchmarks]

Runs the paper's four variants and ours on the same data, clients, models and seed (the config
file, with only the scheme keys changed per variant), each in Flower's simulation, for every
seed, then writes ``table.md``, ``accuracy-vs-time.png`` and ``benchmark.json`` into one folder.

Equal time (``--time-budget baseline``): per seed, sync+forward runs first, for the config's
``num-rounds``; every other variant then gets its duration as ``distill.time-budget-s`` (both
servers stop there) with ``num-rounds`` raised to ``--max-rounds``, an upper bound it should not
reach. So every run ends at the same time on the axis below and the "final accuracy" column is
the accuracy at equal time. ``--time-budget SECONDS`` gives every variant, sync+forward too, the
same fixed budget. ``--targets top`` sets the targets near the top: 90 and 95 % of sync+forward's
lowest final accuracy over the seeds.

Time axis: seconds since the global model's first snapshot (version 0), i.e. after the
simulation has started, the clients answered and the initial forward distillation is done; that
start-up is the same for every variant and part of neither scheme. The global model is
snapshotted on the fixed grid ``distill.snapshot-every-s`` (and when a pass ends before the server
waits), in every variant alike, and the snapshots are tested after the run on the server's
held-out test set. "Time to target" is the first snapshot whose accuracy reaches the target; the
true first crossing lies after the snapshot before it (or the start of the pass it falls in,
when later: the model does not change between passes), so that gap is printed as the time's
resolution, relative to the time. With ``distill.snapshot-growth`` the grid's steps grow with
the time, so the resolution stays within that share of each time while far fewer snapshots are
tested (their testing cost, and its share of the runs' time, is printed).

Breakdown (seconds, same definitions for every variant): client training (the clients' own
training time, summed; clients take turns on one core), distillation (reverse + forward passes),
clients waiting (the averaging rounds' wall time minus client training: distillation in the
synchronous scheme, messaging and aggregation in both), distillation server idle (run time minus
distillation).
"""

from __future__ import annotations

import argparse
import json
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
    CommandLine,
    parse_override,
    resolve,
    run_command,
)
from fedapps.launch import run_experiment  # noqa: E402
from fedapps.methods.distill.distillation import GLOBAL_LOG, PASSES_LOG, read_log  # noqa: E402
from fedapps.protocol.results import read_rounds, write_json  # noqa: E402

FORWARD_EVERY_OURS = 4
CLIENT_CPUS = 2.0
AUTO_TARGETS = (0.6, 0.8, 0.95)  # --targets auto: shares of sync+forward's lowest best accuracy
TOP_TARGETS = (0.9, 0.95)  # --targets top: shares of sync+forward's lowest final accuracy
RESOLUTION_LIMIT = 0.05  # the bound on a time-to-target's uncertainty
VARIANTS: dict[str, dict[str, Any]] = {
    "sync + forward": {"method": "sync-distill", "distill.forward-distill-every": 1},
    "sync": {"method": "sync-distill", "distill.forward-distill-every": 0},
    "async per-round": {"method": "async-distill", "distill.mode": "per-round",
                        "distill.forward-distill-every": 0},
    "async continuous": {"method": "async-distill", "distill.mode": "continuous",
                         "distill.forward-distill-every": 0},
    # ours: a forward-distilled model replaces the clients' one only when it is more accurate
    # on the server's validation split (needs distill.validation-fraction in the config)
    "async continuous + recovery (ours)": {"method": "async-distill",
                                           "distill.mode": "continuous",
                                           "distill.forward-distill-every": FORWARD_EVERY_OURS,
                                           "distill.adoption-check": "validation"},
}
BASELINE, FAST, OURS = "sync + forward", "async continuous", "async continuous + recovery (ours)"


def start_run(values: Mapping[str, Any]) -> Path:
    """Run one variant as ``python -m fedapps.launch`` runs it (``flwr run`` on a local
    SuperLink; async-distill as one run whose ServerApp starts the distillation server, so both
    servers share one clock) and wait; returns its results folder. The one place the benchmark
    starts Flower."""
    # Each client asks for 2 CPUs of the 2: clients take turns on one core, leaving the other
    # to the distillation server (the paper's separate machines), in every variant.
    outcome = run_experiment(resolve(None, values), num_cpus=CLIENT_CPUS, split_async=False)
    if outcome.code:
        raise RuntimeError(outcome.reason)
    return outcome.folders[0]


def budget_changes(spec: str, name: str, baseline: Mapping[str, Any] | None,
                   max_rounds: int) -> dict[str, Any]:
    """The keys ``--time-budget spec`` adds to variant ``name``'s run: none; or the budget
    (sync+forward's duration on this seed, ``baseline``, or fixed seconds) with ``num-rounds``
    raised to ``max_rounds`` (an upper bound only)."""
    if spec == "none" or (spec == "baseline" and name == BASELINE):
        return {}
    seconds = baseline["points"][-1][0] if spec == "baseline" else float(spec)
    return {"distill.time-budget-s": seconds, "num-rounds": max_rounds}


def run_variant(values: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """One run; returns its snapshots, passes and rounds on the benchmark's time axis, why it
    stopped, what testing its snapshots cost, and the adoption decisions."""
    folder = start_run({**values, **changes})
    summary = json.loads((folder / "summary.json").read_text())
    rounds = read_rounds(folder)
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
                   for r in rounds],
        "offers": [{"round": r["round"], **r["offer"]} for r in rounds if "offer" in r],
        "budget-s": changes.get("distill.time-budget-s"),
        "stopped-by": [summary.get(key) for key in ("stopped-by", "distillation-stopped-by")
                       if key in summary],
        "snapshots-tested": summary["snapshots-tested"],
        "snapshot-test-s": summary["snapshot-test-s"],
        "load-average": round(os.getloadavg()[0], 1),
    }


def time_to(run: Mapping[str, Any], target: float) -> tuple[float | None, float | None]:
    """First snapshot time at or above ``target`` and its resolution (None, None: never).

    The global model only changes during reverse passes, so the true first crossing lies
    between the first change after the snapshot before (the later of that snapshot and the
    start of the first reverse pass still running or starting after it) and this snapshot."""
    points = run["points"]
    for index, (time, accuracy) in enumerate(points):
        if accuracy >= target:
            if not index:
                return time, 0.0
            before = points[index - 1][0]
            changes = [p["start"] for p in run["passes"]
                       if p["kind"] == "reverse" and p["end"] > before]
            return time, time - max(before, min(changes, default=before))
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
    """Explicit accuracies, or shares of sync+forward's lowest best (``auto``) or lowest final
    (``top``) accuracy over the seeds, so that it reaches every target on every seed."""
    if spec not in ("auto", "top"):
        return sorted(float(t) for t in spec.split(","))
    if BASELINE not in runs:
        raise SystemExit(f"--targets {spec} needs the '{BASELINE}' variant; give --targets")
    if spec == "auto":
        reference = min(max(a for _, a in run["points"]) for run in runs[BASELINE])
        shares = AUTO_TARGETS
    else:
        reference = min(run["points"][-1][1] for run in runs[BASELINE])
        shares = TOP_TARGETS
    return [int(share * reference * 100) / 100 for share in shares]


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
    return "\n".join(lines) + "\n\n" + ratios(runs, targets) + run_notes(runs)


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
        final = {name: [r["points"][-1][1] for r in runs[name]] for name in (BASELINE, FAST, OURS)}
        (mean_base, sd_base), (mean_fast, _), (mean_ours, _) = (
            mean_sd(final[name]) for name in (BASELINE, FAST, OURS))
        verdict = "within" if mean_ours >= mean_base - sd_base else "below"
        lines.append(f"- final accuracy of ours {mean_ours:.4f} vs {BASELINE} {mean_base:.4f} "
                     f"± {sd_base:.4f}: {verdict} one SD")
        verdict = "at least as accurate as" if mean_ours >= mean_fast else "below"
        lines.append(f"- final accuracy of ours {mean_ours:.4f} vs {FAST} {mean_fast:.4f}: "
                     f"{verdict} {FAST}")
    return "\n".join(lines) + "\n"


def run_notes(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """How the runs ended (budgets, stop reasons), what testing their snapshots cost, and the
    adoption check's decisions."""
    lines = []
    for name, variant_runs in runs.items():
        budgets = [r["budget-s"] for r in variant_runs if r["budget-s"]]
        if budgets:
            lines.append(f"- {name}: time budget {', '.join(f'{b:.1f}' for b in budgets)} s; "
                         "stopped by " + "; ".join(" + ".join(r["stopped-by"])
                                                   for r in variant_runs))
    tested = [r for variant_runs in runs.values() for r in variant_runs]
    seconds = sum(r["snapshot-test-s"] for r in tested)
    run_time = sum(r["points"][-1][0] for r in tested)
    lines.append(f"- snapshot testing after the runs: {sum(r['snapshots-tested'] for r in tested)}"
                 f" snapshots in {seconds:.0f} s, {seconds / max(run_time, 1e-9):.0%} of the runs'"
                 f" {run_time:.0f} s")
    for name, variant_runs in runs.items():
        offers = [offer for r in variant_runs for offer in r["offers"]]
        checked = [offer for offer in offers if "candidate-accuracy" in offer]
        if checked:
            adopted = sum(offer["adopted"] for offer in checked)
            lines.append(f"- {name}: adoption check adopted {adopted} of {len(checked)} "
                         "forward-distilled models (every decision with both validation scores: "
                         "benchmark.json, runs -> offers)")
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
    for budget in {r["budget-s"] for rs in runs.values() for r in rs if r["budget-s"]}:
        axis.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
    axis.set(xlabel="wall-clock seconds since the first global snapshot",
             ylabel="global model test accuracy (server's held-out set)", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_spec(text: str) -> str:
    """``--time-budget``: 'none', 'baseline' or a positive number of seconds."""
    if text in ("none", "baseline"):
        return text
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': expected none, baseline or seconds > 0")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT / "conf" / "async-shapes-3iid.toml"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument("--targets", default="auto",
                        help="comma-separated accuracies, or 'auto': "
                             f"{', '.join(f'{100 * s:.0f}%%' for s in AUTO_TARGETS)} of "
                             f"{BASELINE}'s lowest best accuracy over the seeds, or 'top': "
                             f"{', '.join(f'{100 * s:.0f}%%' for s in TOP_TARGETS)} of its "
                             "lowest final accuracy")
    parser.add_argument("--time-budget", default="none", type=budget_spec,
                        help="'none': every variant runs num-rounds; 'baseline': per seed, "
                             f"{BASELINE} runs num-rounds first and every other variant gets its "
                             "duration as distill.time-budget-s; SECONDS: that budget for all")
    parser.add_argument("--max-rounds", type=int, default=1000,
                        help="num-rounds of a run with a time budget (an upper bound)")
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
    names = args.only or list(VARIANTS)
    if args.time_budget == "baseline":
        if BASELINE not in names:
            parser.error(f"--time-budget baseline needs the '{BASELINE}' variant")
        names = [BASELINE, *(name for name in names if name != BASELINE)]  # it sets the budget
    values = resolve(args.config, dict(args.overrides))
    folder = Path(args.out) / f"async-distill-{datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for seed in seeds:  # seeds outermost: a stopped benchmark still covers every variant
        for name in runs:
            print(f"=== {name}, seed {seed}", flush=True)
            baseline = runs[BASELINE][-1] if runs.get(BASELINE) else None
            changes = {**VARIANTS[name],
                       **budget_changes(args.time_budget, name, baseline, args.max_rounds)}
            runs[name].append(run_variant({**values, "seed": seed}, changes))
            write_json(folder / "benchmark.json", {"config": values, "seeds": seeds,
                                                   "runs": runs})
    targets = choose_targets(args.targets, runs)
    text = table(runs, targets)
    warnings = resolution_warnings(runs, targets)
    timing = {"none": "every run has num-rounds",
              "baseline": f"equal time: every run ends at {BASELINE}'s duration on its seed, so "
                          "the final accuracy is the accuracy at equal time"}.get(
        args.time_budget, f"equal time: every run ends at {args.time_budget} s")
    (folder / "table.md").write_text(
        f"{Path(args.config).name}, seeds {args.seeds}, targets "
        f"{', '.join(f'{t:.0%}' for t in targets)} ({args.targets}); {timing}; "
        f"mean ± SD over seeds\n\n{text}\n"
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
    run_command(main)
