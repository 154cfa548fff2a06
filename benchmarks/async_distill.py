"""Benchmark: synchronous vs asynchronous distillation FL, global accuracy against time.

    .venv/bin/python benchmarks/async_distill.py [--config conf/async-digits.toml]
        [--set key=value ...] [--only NAME ...] [--out results/benchmarks]

Runs the paper's four variants and ours on the same data, clients, models and seed (the config
file, with only the scheme keys changed per variant), each in Flower's simulation, then writes
``accuracy-vs-time.png``, ``table.md`` and ``benchmark.json`` into one folder.

Time axis: seconds since the global model's first test (version 0), i.e. after the simulation
has started and the clients answered; that start-up cost is the same for every variant and not
part of either scheme. "Time to target" is the first time the global model's accuracy on the
clients' held-out test splits reaches ``target-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from fedapps.distill.distillation import GLOBAL_LOG, read_log  # noqa: E402
from fedapps.launch import parse_override, resolve  # noqa: E402
from fedapps.results import read_rounds, write_json  # noqa: E402
from fedapps.simulation import simulate  # noqa: E402

FORWARD_EVERY_OURS = 4
CLIENT_CPUS = 2.0
VARIANTS: dict[str, dict[str, Any]] = {
    "sync + forward": {"method": "sync-distill", "forward-distill-every": 1},
    "sync": {"method": "sync-distill", "forward-distill-every": 0},
    "async per-round": {"method": "async-distill", "distill-mode": "per-round",
                        "forward-distill-every": 0},
    "async continuous": {"method": "async-distill", "distill-mode": "continuous",
                         "forward-distill-every": 0},
    "async continuous + recovery (ours)": {"method": "async-distill",
                                           "distill-mode": "continuous",
                                           "forward-distill-every": FORWARD_EVERY_OURS},
}
BASELINE, FAST = "sync + forward", "async continuous"


def run_variant(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    # Ray gets 2 CPUs and each client asks for 2: clients take turns on one core, leaving the
    # other to the distillation server (the paper's separate machines), in every variant.
    folder = simulate({**values, **changes}, num_cpus=CLIENT_CPUS)
    rows = read_log(folder / GLOBAL_LOG)
    if not rows or rows[0]["version"] != 0:
        raise RuntimeError(f"{folder}: no initial global test in {GLOBAL_LOG}")
    start = rows[0]["time"]
    points = [(round(r["time"] - start, 3), r["accuracy"]) for r in rows]
    target = values["target-accuracy"]
    reached = [t for t, accuracy in points if accuracy >= target]
    summary = json.loads((folder / "summary.json").read_text())
    round_times = [r["time"] for r in read_rounds(folder)]
    return {"folder": str(folder), "points": points,
            "s-per-round": (round_times[-1] - round_times[0]) / max(len(round_times) - 1, 1),
            "load-average": round(os.getloadavg()[0], 1),
            "time-to-target-s": reached[0] if reached else None,
            "final-accuracy": points[-1][1], "best-accuracy": max(a for _, a in points),
            "end-s": points[-1][0], "passes": len(points) - 1,
            "rounds": summary.get("averaging-rounds"), "adoptions": summary.get("adoptions", 0)}


def table(results: dict[str, dict[str, Any]], target: float) -> str:
    base = results.get(BASELINE, {}).get("time-to-target-s")
    lines = [f"| variant | time to {target:.0%} (s) | speed-up vs {BASELINE} | final accuracy "
             "| best accuracy | global tests | end (s) | s / averaging round | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ttt = r["time-to-target-s"]
        speedup = f"{base / ttt:.2f}x" if base and ttt else "–"
        lines.append(f"| {name} | {'not reached' if ttt is None else f'{ttt:.1f}'} | {speedup} "
                     f"| {r['final-accuracy']:.4f} | {r['best-accuracy']:.4f} | {r['passes']} "
                     f"| {r['end-s']:.1f} | {r['s-per-round']:.2f} | {r['load-average']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        times, accuracies = zip(*r["points"])
        axis.plot(times, accuracies, marker=".", label=name)
    axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    axis.set(xlabel="wall-clock seconds since the first global test",
             ylabel="global model test accuracy", title="Sync vs async distillation FL (digits)")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT / "conf" / "async-digits.toml"))
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--only", action="append", choices=list(VARIANTS),
                        help="run only these variants (default: all five)")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    values = resolve(args.config, dict(args.overrides))
    folder = Path(args.out) / f"async-distill-{datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True)
    results = {}
    for name in args.only or list(VARIANTS):
        print(f"=== {name}", flush=True)
        results[name] = run_variant(values, VARIANTS[name])
        write_json(folder / "benchmark.json", {"config": values, "results": results})
    target = values["target-accuracy"]
    text = table(results, target)
    (folder / "table.md").write_text(
        f"{text}\nHardware: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, no GPU; {datetime.now():%Y-%m-%d}\n")
    plot(results, target, folder / "accuracy-vs-time.png")
    print(text, flush=True)
    print(f"written to {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
