"""The results folder of a run: config, per-round JSONL log, summary JSON and plots.

``results/<method>-<dataset>-<timestamp>/`` holds ``config.json`` (the resolved run config),
``rounds.jsonl`` (one JSON object per round, appended and flushed as the round ends, so a crash
never leaves a half-written history), ``summary.json``, ``accuracy.png`` and, when a privacy
option is on, ``privacy.json`` (docs/privacy.md).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedapps.config import ConfigError, RunConfig
from fedapps.data.base import DataError

ERROR_LOG = "error.log"
COMPLETED, FAILED, MISSING = "completed", "failed", "missing"


class RunRecorder:
    def __init__(self, config: RunConfig, folder: Path | None = None) -> None:
        self.config = config
        if folder is None and config.run_name:
            folder = named_folder(config)
        if folder is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            folder = Path(config.results_dir) / f"{config.method}-{config.dataset}-{stamp}"
        self.folder = folder
        check_resumable(config, folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.round_started: float | None = None
        self.privacy: dict[str, Any] | None = None
        config_path = self.folder / "config.json"
        write_json(config_path, config.to_dict())

    def resume_after(self, server_round: int) -> None:
        """Drop log rows past the checkpoint and continue its clock."""
        rows = [row for row in read_rounds(self.folder) if row["round"] <= server_round]
        temporary = self.log_path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
        temporary.replace(self.log_path)
        self.started = time.perf_counter() - (rows[-1]["time"] if rows else 0.0)

    @property
    def log_path(self) -> Path:
        return self.folder / "rounds.jsonl"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def begin_round(self) -> None:
        self.round_started = time.perf_counter()

    def log_round(self, server_round: int, **fields: Any) -> dict[str, Any]:
        """Append one round; also prints the one-line progress report users watch."""
        row = {"round": server_round, "time": round(self.elapsed(), 3), **fields}
        if self.round_started is not None:
            row["round-s"] = round(time.perf_counter() - self.round_started, 4)
        with self.log_path.open("a") as stream:
            stream.write(json.dumps(row, default=_jsonable) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        print(progress_line(row, self.config.num_rounds), flush=True)
        return row

    def record_privacy(self, report: Mapping[str, Any] | None) -> None:
        """What the privacy options protected and spent (``None``: none was on): written to
        ``privacy.json`` now and into the summary at the end."""
        if report is not None:
            self.privacy = dict(report)
            write_json(self.folder / "privacy.json", self.privacy)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.folder / "summary.json"
        privacy = {"privacy": self.privacy} if self.privacy is not None else {}
        write_json(path, {"status": COMPLETED, "method": self.config.method,
                          "dataset": self.config.dataset,
                          "wall-time-s": round(self.elapsed(), 2), **summary, **privacy})
        plot_run(self.folder)
        plot_architectures(self.folder)
        return path

    def write_failure(self, error: BaseException) -> Path:
        """A failed run: its traceback in ``error.log``, ``summary.json`` saying ``failed`` with
        the reason (so nothing reads the folder as a result); returns the log's path."""
        log = self.folder / ERROR_LOG
        log.write_text("".join(traceback.format_exception(error)))
        rounds = read_rounds(self.folder)
        write_json(self.folder / "summary.json", {
            "status": FAILED, "reason": one_line_reason(error), "method": self.config.method,
            "dataset": self.config.dataset, "wall-time-s": round(self.elapsed(), 2),
            "rounds-logged": len(rounds), "error-log": str(log)})
        return log


def named_folder(config: RunConfig) -> Path | None:
    """``<results-dir>/<run-name>`` of a named run (None: the recorder picks a new folder)."""
    return Path(config.results_dir) / config.run_name if config.run_name else None


def check_resumable(config: RunConfig, folder: Path | None = None) -> None:
    """A folder that already holds a run must hold this experiment (a restart resumes it)."""
    folder = folder or named_folder(config)
    config_path = folder / "config.json" if folder else None
    if config_path is None or not config_path.exists():
        return
    saved = json.loads(config_path.read_text())
    changed = {k: (saved.get(k), v) for k, v in config.to_dict().items() if saved.get(k) != v}
    if changed:
        raise ConfigError(
            f"run-name='{config.run_name}' holds a run with another config "
            f"(saved vs now: {changed}); choose a new run-name to start afresh"
        )


def one_line_reason(error: BaseException) -> str:
    """What stopped a run, in one line: the message of the errors users cause (bad config or
    data, clients that failed), the type and message of anything else."""
    message = " ".join(str(error).split()) or "no message"
    if isinstance(error, ConfigError | DataError):
        return message
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {message}"


def run_status(folder: Path) -> tuple[str, str]:
    """``(status, reason)`` of a run folder: completed, failed (with its reason), or
    ``missing`` when the run never wrote a summary (it died before, or never started)."""
    path = folder / "summary.json"
    if not path.exists():
        return MISSING, f"no summary.json in {folder}: the run ended before writing one"
    summary = json.loads(path.read_text())
    return summary.get("status", COMPLETED), summary.get("reason", "")


def progress_line(row: Mapping[str, Any], num_rounds: int) -> str:
    parts = [f"[round {row['round']}/{num_rounds}]", f"t={row['time']:.1f}s"]
    for key in ("train-loss", "accuracy", "accuracy-sd", "k", "adoptions", "replies"):
        value = row.get(key)
        if isinstance(value, dict):
            parts.append(f"{key}={len(value)}")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4f}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def client_summary(accuracies: Mapping[int, float], sizes: Mapping[int, int]) -> dict[str, float]:
    """Mean and SD over clients (unweighted, as the paper reports) and the sample-weighted mean."""
    values = [accuracies[c] for c in sorted(accuracies) if not math.isnan(accuracies[c])]
    if not values:
        return {"mean": float("nan"), "sd": float("nan"), "weighted-mean": float("nan")}
    total = sum(sizes[c] for c in accuracies)
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "weighted-mean": sum(accuracies[c] * sizes[c] for c in accuracies) / max(total, 1),
    }


def read_rounds(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(folder: str | Path, rows: Sequence[Mapping[str, Any]] | None = None) -> Path | None:
    """Mean client accuracy by round and by wall-clock time (``accuracy.png``)."""
    rows = [r for r in (rows if rows is not None else read_rounds(folder)) if "accuracy" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    accuracy = [r["accuracy"] for r in rows]
    by_round.plot([r["round"] for r in rows], accuracy, marker="o", markersize=3)
    by_round.set(xlabel="round", ylabel="mean client test accuracy", title="by round")
    by_time.plot([r["time"] for r in rows], accuracy, marker="o", markersize=3)
    by_time.set(xlabel="wall-clock seconds", title="by time")
    for axis in (by_round, by_time):
        axis.grid(alpha=0.3)
    fig.suptitle(Path(folder).name)
    fig.tight_layout()
    path = Path(folder) / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_architectures(folder: str | Path) -> Path | None:
    """Clients per architecture by round (the FedMe paper's Table 3 over time)."""
    rows = [r for r in read_rounds(folder) if r.get("architectures")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for r in rows for name in r["architectures"]})
    rounds = [r["round"] for r in rows]
    fig, axis = plt.subplots(figsize=(6, 3.5))
    axis.stackplot(rounds, [[r["architectures"].get(n, 0) for r in rows] for n in names],
                   labels=names, alpha=0.85)
    axis.set(xlabel="round", ylabel="clients", title="clients per architecture")
    axis.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path = Path(folder) / "architectures.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: Path, content: Any) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(content, indent=2, default=_jsonable))
    temporary.replace(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
