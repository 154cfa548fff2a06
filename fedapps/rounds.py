"""The round loop of every strategy, with atomic checkpoints and resume.

Flower's ``Strategy.start`` always begins at round 1; a restarted server must continue where it
stopped. This loop calls the same strategy hooks (configure/aggregate train and evaluate), saves
``checkpoint.pt`` in the run folder every ``checkpoint-every`` rounds (write-then-rename: never
half-written) and, when one is there, resumes after its round with the saved strategy state,
global arrays and RNG state — so a resumed simulation ends exactly like an uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedapps.config import RunConfig
from fedapps.results import RunRecorder

CHECKPOINT = "checkpoint.pt"


class Resumable(Protocol):
    """A strategy whose own state (beyond the global arrays) survives a restart."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    path = folder / CHECKPOINT
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    path = folder / CHECKPOINT
    return torch.load(path, weights_only=False) if path.exists() else None


class ResumableStrategy(Strategy, Resumable):
    """What :func:`run_rounds` drives: a Flower strategy that can save and load its state."""


def run_rounds(
    strategy: ResumableStrategy,
    grid: Grid,
    config: RunConfig,
    recorder: RunRecorder,
    arrays: ArrayRecord | None = None,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
) -> ArrayRecord:
    """Rounds ``1..num-rounds`` (or the rest, after a checkpoint); returns the final arrays."""
    arrays = arrays if arrays is not None else ArrayRecord()
    first = 1
    checkpoint = load_checkpoint(recorder.folder)
    if checkpoint is not None:
        first = checkpoint["round"] + 1
        if checkpoint["arrays"]:
            arrays = ArrayRecord(checkpoint["arrays"])
        strategy.load_state_dict(checkpoint["strategy"])
        random.setstate(checkpoint["random"])
        recorder.resume_after(checkpoint["round"])
        print(f"fedapps: resuming {recorder.folder} after round {checkpoint['round']}", flush=True)
    for server_round in range(first, config.num_rounds + 1):
        recorder.begin_round()
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, train_config or ConfigRecord(), grid),
            timeout=config.round_timeout,
        )
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        replies = grid.send_and_receive(
            strategy.configure_evaluate(
                server_round, arrays, evaluate_config or ConfigRecord(), grid
            ),
            timeout=config.round_timeout,
        )
        strategy.aggregate_evaluate(server_round, replies)
        every = config.checkpoint_every
        if every and (server_round % every == 0 or server_round == config.num_rounds):
            save_checkpoint(recorder.folder, {
                "round": server_round,
                "arrays": arrays.to_torch_state_dict() if len(arrays) else {},
                "strategy": strategy.state_dict(),
                "random": random.getstate(),
            })
    return arrays
