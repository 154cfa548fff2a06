"""The FedMe paper's Tables 4 and 5 on digits: every baseline, FedMe auto-tuned and fixed.

    python benchmarks/compare_digits.py [--rounds 20] [--seeds 0 1 2] [--out results/compare-digits]

20 clients, two-level Dirichlet (alpha-label 0.5, alpha-size 10), as in the paper's CIFAR-10
setting. The table, curves and plots are saved after every seed, so an interrupted benchmark
still leaves the seeds that finished.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fedapps.compare import Comparison, compare
from fedapps.config import CommandLine, run_command

METHODS = [
    "local", "centralized", "fedavg", "hypcluster", "mapper", "fml", "pfedme", "fedme",
    *[(f"fedme-cnn{depth}", {"method": "fedme", "fedme.init-arch": f"cnn{depth}"})
      for depth in range(1, 5)],
]


def main() -> int:
    parser = CommandLine(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="results/compare-digits")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    runs, labels = [], []
    for seed in args.seeds:
        result = compare(METHODS, "digits", [seed], results_dir=out / "runs",
                         num_clients=args.clients, num_rounds=args.rounds,
                         partitioner="dirichlet", alpha_label=0.5, alpha_size=10.0)
        labels, runs = result.labels, runs + result.runs
        merged = Comparison(labels, runs)
        merged.save(out)
        print(f"[benchmark] seeds done: {sorted({r.seed for r in runs})}; "
              f"{time.perf_counter() - started:.0f}s so far", flush=True)
        print(merged.to_markdown(), flush=True)
    architectures = Comparison(labels, runs).architectures()
    (out / "architectures.md").write_text(architectures.to_string(index=False) + "\n")
    print(architectures.to_string(index=False))
    print(f"[benchmark] total wall time {time.perf_counter() - started:.0f}s", flush=True)
    failed = [r for r in runs if r.error]
    for run in failed:
        print(f"error: {run.label} seed {run.seed} FAILED: {run.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_command(main)
