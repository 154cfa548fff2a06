"""Compare methods in one call: the FedMe paper's Tables 4 and 5 from Python or a notebook.

    result = compare(["fedavg", "fedme", ("fedme-cnn1", {"fedme.init-arch": "cnn1"})],
                     dataset="digits", seeds=[0, 1, 2], num_clients=20)
    result.table; result.curves; print(result.to_markdown()); result.save("results/cmp")

Every (method, seed) is a ``flwr run`` on a local SuperLink of its own, as
``python -m fedapps.launch`` runs it (:func:`fedapps.launch.run_experiment`; Flower's log goes to
``flwr.log`` next to the run's folder), with the same config except the method's own keys, so all
methods of one seed see the same partition. Every config and its data are checked before the
first run starts. A run that fails is shown as failed with its reason, never as a number, and
never averaged into its method's row; the others go on. One progress line per finished run.

``engine="in-process"`` runs the same strategies and client handlers in this process instead,
without Flower's runtime (:func:`fedapps.inprocess.run_in_process`): seconds instead of a minute
of start-ups per run, for a quick look; the results folders are the same.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from fedapps.config import method_uses, resolve
from fedapps.inprocess import run_in_process
from fedapps.launch import check, run_experiment
from fedapps.protocol.results import one_line_reason, read_rounds

if TYPE_CHECKING:  # pandas is imported on use: only the tables need it
    import pandas as pd

MethodSpec = str | tuple[str, Mapping[str, Any]]
Engine = Literal["flower", "in-process"]
FIELDS = ("before-finetune", "after-finetune")
CURVE_KEYS = ("round", "time", "accuracy")  # what a saved comparison keeps of each round


@dataclass
class RunResult:
    """One (method, seed) run: its summary and round log, or the error that stopped it."""

    label: str
    seed: int
    wall_s: float
    folder: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def reported(self) -> str:
        """The field the FedMe paper reports for this method (after fine-tuning unless said)."""
        return self.summary.get("reported", "after-finetune")

    def accuracy(self, which: str | None = None) -> tuple[float, float]:
        """(mean, SD) over clients, in percent."""
        figures = self.summary.get(which or self.reported, {})
        return 100 * figures.get("mean", math.nan), 100 * figures.get("sd", math.nan)


@dataclass
class Comparison:
    labels: list[str]
    runs: list[RunResult]

    @property
    def table(self) -> pd.DataFrame:
        """One row per method: client mean and SD (in %) averaged over the seeds whose runs
        completed, SD over seeds of the client mean, before/after fine-tuning, rounds, mean wall
        time per run, ``runs`` completed of planned, ``status`` (ok, or how many FAILED) and
        the failures' reasons. A method none of whose runs completed has no figures (NaN)."""
        import pandas as pd

        rows = []
        for label in self.labels:
            runs = [r for r in self.runs if r.label == label]
            done = [r for r in runs if not r.error]
            row: dict[str, Any] = {"method": label}
            for name, which in (("accuracy", None), ("before-ft", FIELDS[0]),
                                ("after-ft", FIELDS[1])):
                pairs = [r.accuracy(which) for r in done]
                row[name] = _mean([m for m, _ in pairs])
                row[f"{name}-sd"] = _mean([s for _, s in pairs])
            means = [r.accuracy()[0] for r in done]
            row["seed-sd"] = statistics.stdev(means) if len(means) > 1 else math.nan
            row["reported"] = done[0].reported if done else ""
            row["rounds"] = done[0].summary.get("rounds", math.nan) if done else math.nan
            row["wall-s"] = _mean([r.wall_s for r in done])
            row["runs"] = f"{len(done)}/{len(runs)}"
            failed = len(runs) - len(done)
            row["status"] = f"{failed} of {len(runs)} FAILED" if failed else "ok"
            row["error"] = "; ".join(f"seed {r.seed}: {r.error}" for r in runs if r.error)
            rows.append(row)
        return pd.DataFrame(rows)

    @property
    def curves(self) -> pd.DataFrame:
        """Per-round mean client accuracy (%) of every run: method, seed, round, time, accuracy."""
        import pandas as pd

        rows = [
            {"method": r.label, "seed": r.seed, "round": row["round"], "time": row.get("time"),
             "accuracy": 100 * row["accuracy"]}
            for r in self.runs for row in r.rounds if "accuracy" in row
        ]
        return pd.DataFrame(rows, columns=["method", "seed", "round", "time", "accuracy"])

    def architectures(self) -> pd.DataFrame:
        """The paper's Table 3: clients per final architecture, mean over seeds (FedMe runs)."""
        import pandas as pd

        finals = [r for r in self.runs if r.summary.get("architectures")]
        names = sorted({a for r in finals for a in r.summary["architectures"].values()})
        rows = []
        for label in self.labels:
            runs = [list(r.summary["architectures"].values()) for r in finals if r.label == label]
            if runs:
                row: dict[str, Any] = {"method": label}
                for name in names:
                    counts = [archs.count(name) for archs in runs]
                    row[name], row[f"{name}-sd"] = _mean(counts), statistics.pstdev(counts)
                rows.append(row)
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        """The table as Markdown, accuracy as 'mean ± SD over clients' (averaged over seeds)."""
        table = self.table
        head = ["method", "accuracy (%)", "reported", "before FT (%)", "after FT (%)",
                "SD over seeds", "rounds", "wall s/run", "runs", "status", "error"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in table.to_dict("records"):
            cells = [row["method"], _pm(row["accuracy"], row["accuracy-sd"]),
                     row["reported"].replace("-finetune", " FT"),
                     _pm(row["before-ft"], row["before-ft-sd"]),
                     _pm(row["after-ft"], row["after-ft-sd"]), _num(row["seed-sd"]),
                     _num(row["rounds"], 0), _num(row["wall-s"], 1), row["runs"],
                     row["status"], row["error"].replace("|", "/").replace("\n", " ")[:200]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self):
        """Accuracy by round (mean over seeds) per method; returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        fig, axis = plt.subplots(figsize=(8, 5))
        curves = self.curves
        for number, label in enumerate(self.labels):
            mean = curves[curves["method"] == label].groupby("round")["accuracy"].mean()
            if len(mean):  # the colour cycle has 10 colours: dashed lines after that
                axis.plot(mean.index, mean.values, marker="o", markersize=2, label=label,
                          linestyle="-" if number < 10 else "--")
        axis.set(xlabel="round", ylabel="mean client test accuracy (%)",
                 title="accuracy by round (mean over seeds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def only(self, labels: Sequence[str]) -> Comparison:
        """The same runs, the rows ``labels`` only (e.g. Table 5's variants of a larger run)."""
        missing = [label for label in labels if label not in self.labels]
        if missing:
            raise ValueError(f"no runs labelled {missing}; known: {self.labels}")
        return Comparison(list(labels), [r for r in self.runs if r.label in labels])

    @classmethod
    def load(cls, folder: str | Path) -> Comparison:
        """A comparison written by :meth:`save` (e.g. a benchmark's stored multi-seed runs),
        with its tables, curves and plots, without running anything."""
        path = Path(folder) / "runs.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a saved comparison ({error})") from None
        if any("summary" not in run for run in stored):
            raise ValueError(f"{path} was saved without the runs' summaries; save it again")
        runs = [RunResult(r["method"], r["seed"], r["wall-s"],
                          Path(r["folder"]) if r["folder"] else None, r["summary"],
                          r["rounds"], r["error"]) for r in stored]
        return cls(list(dict.fromkeys(r.label for r in runs)), runs)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write table.md, table.csv, curves.csv, runs.json (every run with its summary and
        accuracy by round: :meth:`load` reads it back) and accuracy_by_round.png."""
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {name: folder / name for name in
                 ("table.md", "table.csv", "curves.csv", "runs.json", "accuracy_by_round.png")}
        paths["table.md"].write_text(self.to_markdown())
        self.table.to_csv(paths["table.csv"], index=False)
        self.curves.to_csv(paths["curves.csv"], index=False)
        paths["runs.json"].write_text(json.dumps(
            [{"method": r.label, "seed": r.seed, "wall-s": r.wall_s, "error": r.error,
              "folder": str(r.folder) if r.folder else None, "summary": r.summary,
              "rounds": [{key: row[key] for key in CURVE_KEYS if key in row} for row in r.rounds]}
             for r in self.runs], indent=1))
        fig = self.plot()
        fig.savefig(paths["accuracy_by_round.png"], dpi=120)
        plt.close(fig)
        return paths


def compare(
    methods: Sequence[MethodSpec],
    dataset: str = "digits",
    seeds: Sequence[int] = (0,),
    *,
    results_dir: str | Path = "results/compare",
    progress: Callable[[str], None] | None = print,
    engine: Engine = "flower",
    **overrides: Any,
) -> Comparison:
    """Run every method for every seed; returns a :class:`Comparison` (table, curves, plots).

    ``methods``: method names (``"fedavg"``) or ``(label, {config overrides})`` for variants,
    e.g. ``("fedme-cnn1", {"method": "fedme", "fedme.init-arch": "cnn1"})`` (``method`` defaults to
    the label). ``overrides``: run-config keys for every run, in kebab-case or snake_case
    (``num_clients=20``); a key of a method's section (``fedme.init-arch``) reaches only the
    methods that use it. Every config is checked before the first run starts, so a typo fails
    at once; errors during a run are caught and shown in the table. ``engine``: ``"flower"``
    (``flwr run`` on a local SuperLink) or ``"in-process"`` (no Flower processes: a quick look).
    """
    if engine not in get_args(Engine):
        raise ValueError(f"engine={engine!r}: expected one of {', '.join(get_args(Engine))}")
    if isinstance(methods, str) or _is_pair(methods) or not methods:
        raise TypeError("methods must be a non-empty list of names or (label, overrides) pairs")
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    common = {key.replace("_", "-"): value for key, value in overrides.items()}
    specs = [_spec(item) for item in methods]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique; got {labels}")
    plan = []
    for seed in seeds:
        for label, own in specs:
            method = own["method"]
            # a common key of one method's section (say fedme.*) applies to the methods using it
            shared = {key: value for key, value in common.items() if method_uses(method, key)}
            values = {**shared, "dataset": dataset, **own, "seed": int(seed),
                      "results-dir": str(Path(results_dir) / label / f"seed{seed}")}
            values = resolve(None, values)  # defaults + these, checked, paths absolute
            check(values)  # the data too: fail before any run
            plan.append((label, int(seed), values))
    runs = []
    for number, (label, seed, values) in enumerate(plan, start=1):
        run = _run(label, seed, values, engine)
        runs.append(run)
        if progress:
            progress(f"[compare {number}/{len(plan)}] {_describe(run)}")
    return Comparison(labels, runs)


def _run(label: str, seed: int, values: dict[str, Any], engine: Engine) -> RunResult:
    """One run; a failure becomes the result's error (the other runs go on)."""
    started = time.perf_counter()
    try:
        if engine == "in-process":
            folder, failure = run_in_process(values), ""
        else:
            log = Path(values["results-dir"]) / "flwr.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            outcome = run_experiment(values, output=log)
            folder = outcome.folders[-1] if outcome.folders else None
            # the launcher's own reason: a failed run's, or "exited with N" / "wrote no results"
            failure = outcome.reason if outcome.code or folder is None else ""
    except Exception as error:  # e.g. Flower could not start: this run fails, not the others
        return RunResult(label, seed, time.perf_counter() - started,
                         error=one_line_reason(error))
    wall = time.perf_counter() - started
    if failure:
        return RunResult(label, seed, wall, folder, error=failure)
    return RunResult(label, seed, wall, folder, json.loads((folder / "summary.json").read_text()),
                     read_rounds(folder))


def _is_pair(item: Any) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], Mapping))


def _spec(item: MethodSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {"method": item}
    if _is_pair(item):
        own = {key.replace("_", "-"): value for key, value in item[1].items()}
        return item[0], {"method": item[0], **own}
    raise TypeError(f"method spec {item!r}: expected a name or (label, {{overrides}})")


def _describe(run: RunResult) -> str:
    head = f"{run.label} seed={run.seed}"
    if run.error:
        return f"{head}: FAILED after {run.wall_s:.1f}s: {run.error}"
    mean, sd = run.accuracy()
    return (f"{head}: accuracy {mean:.2f} ± {sd:.2f} % over clients "
            f"({run.reported}) in {run.wall_s:.1f}s")


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _num(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _pm(mean: float, sd: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.2f} ± {sd:.2f}"
