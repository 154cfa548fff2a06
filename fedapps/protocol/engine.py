"""The round engine every method runs on: reply acceptance, sampling, checkpoints, resume.

Flower's ``Strategy.start`` always begins at round 1, ignores replies it cannot use only where
each strategy remembers to, and keeps its records to itself. :func:`run_rounds` calls the same
strategy hooks (configure/aggregate train and evaluate) and adds, for every method:

- ``round-timeout`` on each phase, and the round's record (``strategy.round_record()``) written to
  ``rounds.jsonl`` by the engine, not by the strategy;
- a checkpoint every ``checkpoint-every`` rounds (write-then-rename: never half-written) and, when
  one is there, resume after its round with the saved strategy state, global arrays and RNG
  state, so a resumed run ends exactly like an uninterrupted one;
- the privacy ledger (:class:`fedapps.privacy.PrivacyLedger`): the noised releases of every
  round, and at the end the (epsilon, delta) spent, in ``privacy.json`` and the summary.

Strategies accept replies through :func:`screen` (an error reply, a reply that does not unpack,
or arrays of the wrong shape or with NaN/inf are rejected and logged with the client's partition;
fewer than ``min-replies`` usable replies skip the round, and the models stay as they were) and
sample with :func:`participants` (``fraction-train``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedapps.config import SERVER_FAULT, RunConfig
from fedapps.privacy import PrivacyLedger
from fedapps.protocol.messages import BadModelError, error_summary, in_partition_order
from fedapps.protocol.results import RunRecorder

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# What unpacking a reply may raise when the reply is unusable (missing records, bad arrays).
UNUSABLE = (BadModelError, KeyError, TypeError, ValueError)

T = TypeVar("T")


class ResumableStrategy(Strategy):
    """What :func:`run_rounds` drives: a Flower strategy that can save and load its state and
    reports each round as a record. ``node_of`` maps its clients' partition ids to node ids."""

    node_of: dict[int, int]

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def round_record(self) -> dict[str, Any]:
        """The record of the round just finished (replies, rejected, losses, accuracy...)."""
        raise NotImplementedError

    def summary(self) -> None:
        log.info("%s on the fedapps round engine", type(self).__name__)


@dataclass
class Screened(Generic[T]):
    """Replies sorted into the usable (unpacked, by partition id) and the rejected (reasons);
    ``skipped`` says why the round is skipped (too few usable replies), if it is."""

    accepted: dict[int, T] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def record(self) -> dict[str, Any]:
        """The round record's fields about replies."""
        fields: dict[str, Any] = {"replies": len(self.accepted), "rejected": self.rejected}
        return {**fields, "skipped": self.skipped} if self.skipped else fields


def screen(
    server_round: int,
    replies: Iterable[Message],
    node_of: Mapping[int, int],
    unpack: Callable[[int, Message], T],
    min_replies: int,
) -> Screened[T]:
    """Unpack each reply of a known node in partition order; reject (and log) what fails; skip
    the round when fewer than ``min_replies`` replies are usable."""
    pid_of = {node: pid for pid, node in node_of.items()}
    screened: Screened[T] = Screened()
    for reply in in_partition_order(replies):
        pid = pid_of.get(reply.metadata.src_node_id)
        if pid is None:
            log.warning("round %d: reply from unknown node %s ignored", server_round,
                        reply.metadata.src_node_id)
            continue
        try:
            if reply.has_error():
                raise ValueError(f"client error: {error_summary(reply.error.reason)}")
            screened.accepted[pid] = unpack(pid, reply)
        except UNUSABLE as error:
            screened.rejected[str(pid)] = str(error)
            log.warning("round %d: reply of client %d rejected: %s", server_round, pid, error)
    if len(screened.accepted) < min_replies:
        screened.skipped = f"{len(screened.accepted)} usable replies < min-replies={min_replies}"
        log.warning("round %d skipped: %s", server_round, screened.skipped)
    return screened


def silent_clients(phase: str, messages: list[Message], replies: list[Message],
                   node_of: Mapping[int, int], timeout: float) -> list[int]:
    """Partition ids sent a message that sent nothing back (a dead or cut-off SuperNode), each
    logged with its partition: Flower reports only how many replies came."""
    pid_of = {node: pid for pid, node in node_of.items()}
    answered = {reply.metadata.src_node_id for reply in replies}
    silent = sorted(pid_of[m.metadata.dst_node_id] for m in messages
                    if m.metadata.dst_node_id not in answered and m.metadata.dst_node_id in pid_of)
    for pid in silent:
        log.warning("%s: no reply from client %d (node %d) within round-timeout=%gs",
                    phase, pid, node_of[pid], timeout)
    return silent


def log_errors(phase: str, replies: Iterable[Message], node_of: Mapping[int, int]) -> None:
    """Log each error reply with the client's partition (phases whose replies are not screened)."""
    pid_of = {node: pid for pid, node in node_of.items()}
    for reply in replies:
        if reply.has_error():
            node = reply.metadata.src_node_id
            who = f"client {pid_of[node]} (node {node})" if node in pid_of else f"node {node}"
            log.warning("%s: error from %s: %s", phase, who, error_summary(reply.error.reason))


def participants(pids: list[int], config: RunConfig, rng: np.random.Generator,
                 at_least: int = 1) -> list[int]:
    """``fraction-train`` of the clients (at least ``min-replies`` and ``at_least``), seeded."""
    if config.fraction_train >= 1:
        return pids
    count = max(at_least, config.min_replies, round(config.fraction_train * len(pids)))
    return sorted(rng.choice(pids, size=min(count, len(pids)), replace=False).tolist())


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    path = folder / CHECKPOINT
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    path = folder / CHECKPOINT
    return torch.load(path, weights_only=False) if path.exists() else None


def run_rounds(
    strategy: ResumableStrategy,
    grid: Grid,
    config: RunConfig,
    recorder: RunRecorder,
    arrays: ArrayRecord | None = None,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    first_round: int = 1,
    stop: Callable[[], bool] | None = None,
) -> ArrayRecord:
    """Rounds ``first_round..num-rounds`` (or the rest, after a checkpoint); returns the final
    arrays (strategies that keep one model per client return empty arrays). ``stop``, asked
    before each round, ends the rounds early when it returns True (a spent time budget;
    ``num-rounds`` is then an upper bound)."""
    arrays = arrays if arrays is not None else ArrayRecord()
    ledger = PrivacyLedger(config)
    pid_of = {node: pid for pid, node in strategy.node_of.items()}
    checkpoint = load_checkpoint(recorder.folder)
    if checkpoint is not None:
        first_round = checkpoint["round"] + 1
        if checkpoint["arrays"]:
            arrays = ArrayRecord(checkpoint["arrays"])
        strategy.load_state_dict(checkpoint["strategy"])
        ledger.load_state_dict(checkpoint["privacy"])
        random.setstate(checkpoint["random"])
        recorder.resume_after(checkpoint["round"])
        print(f"fedapps: resuming {recorder.folder} after round {checkpoint['round']}", flush=True)
    for server_round in range(first_round, config.num_rounds + 1):
        if stop is not None and stop():
            break
        if config.faults().get((SERVER_FAULT, server_round)) == "error":
            raise RuntimeError(f"fault-injection: the server fails in round {server_round}")
        recorder.begin_round()
        trained = list(strategy.configure_train(server_round, arrays,
                                                train_config or ConfigRecord(), grid))
        replies = list(grid.send_and_receive(trained, timeout=config.round_timeout))
        phase = f"round {server_round}"
        silent = silent_clients(phase, trained, replies, strategy.node_of, config.round_timeout)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        evaluate_started = time.perf_counter()
        messages = list(strategy.configure_evaluate(server_round, arrays,
                                                    evaluate_config or ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
        silent += silent_clients(f"{phase} evaluation", messages, replies, strategy.node_of,
                                 config.round_timeout)
        log_errors(f"{phase} evaluation", replies, strategy.node_of)
        strategy.aggregate_evaluate(server_round, replies)
        record = {**strategy.round_record(),
                  "evaluate-s": round(time.perf_counter() - evaluate_started, 4)}
        ledger.record_round([pid_of[m.metadata.dst_node_id] for m in trained
                             if m.metadata.dst_node_id in pid_of], record)
        recorder.log_round(server_round, **record, **({"no-reply": silent} if silent else {}))
        every = config.checkpoint_every
        if every and (server_round % every == 0 or server_round == config.num_rounds):
            save_checkpoint(recorder.folder, {
                "round": server_round,
                "arrays": arrays.to_torch_state_dict() if len(arrays) else {},
                "strategy": strategy.state_dict(),
                "privacy": ledger.state_dict(),
                "random": random.getstate(),
            })
    recorder.record_privacy(ledger.report())
    return arrays
