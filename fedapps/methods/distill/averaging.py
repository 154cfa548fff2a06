"""The averaging server: FedAvg with the clients on the small distilled model, never waiting.

It only talks to the distillation server through the channel: it starts from the ``forward``
model (the distillation server's initial distilled model), publishes every averaged model to
``distilled`` (version = round), adopts a newer ``forward`` model between rounds when the
distillation server offers one (accuracy recovery, ``distill.forward-distill-every``; with
``distill.adoption-check = validation`` only when it beats the current model, :mod:`.adoption`),
stops after ``num-rounds`` or once ``distill.time-budget-s`` is spent, and finally publishes
``stop``. Reading the channel never blocks a round: it only looks at what is there.

Method runners (``fedapps/registry.py``):

- ``async-distill``: the whole scheme in one run; the distillation server is a separate OS
  process (``python -m fedapps.methods.distill.distillation``), so its compute never
  stalls this loop;
- ``async-averaging`` / ``async-distillation``: the two halves as two runs (or machines) sharing
  ``distill.channel-dir``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedapps.config import RunConfig
from fedapps.methods.distill.adoption import AdoptionCheck
from fedapps.methods.distill.budget import ORIGIN, TimeBudget, stopped_by
from fedapps.methods.distill.channel import ChannelTimeout, ModelChannel, open_channel
from fedapps.methods.distill.distillation import (
    GLOBAL_LOG,
    global_summary,
    log_for,
    read_log,
    serve,
)
from fedapps.methods.fedavg import RecordedFedAvg
from fedapps.protocol.dp import central_noise
from fedapps.protocol.engine import run_rounds
from fedapps.protocol.messages import config_record, from_arrays, to_arrays
from fedapps.protocol.results import RunRecorder
from fedapps.protocol.secagg import secure_grid

PROJECT_ROOT = Path(__file__).resolve().parents[3]

# before each round: may swap the model sent to clients (the async scheme adopts a newer forward
# distilled model; the sync scheme forward-distils)
BeforeRound = Callable[[int, ArrayRecord], ArrayRecord]
# after aggregation: the round, the averaged model (None: the round was skipped because fewer
# than min-replies replies were usable) and the round's record; returns fields to add to it
AfterRound = Callable[[int, ArrayRecord | None, dict[str, Any]], dict[str, Any] | None]


class HookedFedAvg(RecordedFedAvg):
    """FedAvg with a hook before each round (may swap the model sent to clients) and one after
    aggregation; the sync and async schemes differ only in these hooks.

    Replies are screened as for the ``fedavg`` method (:class:`RecordedFedAvg`): an error reply,
    or arrays with wrong keys, wrong shapes or NaN/inf values, are left out and logged with the
    client's partition; the rest are averaged.
    """

    def __init__(self, node_of: Mapping[int, int], before: BeforeRound, after: AfterRound,
                 arch: str, min_replies: int = 1, **kwargs) -> None:
        super().__init__(node_of, arch=arch, min_replies=min_replies, fraction_evaluate=0.0,
                         **kwargs)
        self.before, self.after = before, after

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, self.before(server_round, arrays),
                                       config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.record.update(self.after(server_round, arrays, dict(self.round_info)) or {})
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """No client evaluation here: the global model is tested by the distillation server."""
        return None


def fedavg_rounds(
    grid: Grid, config: RunConfig, clients: dict, recorder: RunRecorder, initial: ArrayRecord,
    before: BeforeRound, after: AfterRound, first_round: int = 1,
    stop: Callable[[], bool] | None = None,
) -> None:
    """FedAvg rounds ``first_round..num-rounds`` of ``config.model`` on the round engine (no
    client evaluation), ending early once ``stop()`` (asked before each round) is True; central
    DP and SecAgg+ as for the ``fedavg`` method (docs/privacy.md): ``after`` sees the noised
    average only."""
    count = len(clients)
    strategy = HookedFedAvg({pid: info["node"] for pid, info in clients.items()}, before, after,
                            config.model, config.min_replies, fraction_train=config.fraction_train,
                            min_train_nodes=max(1, round(config.fraction_train * count)),
                            min_available_nodes=count, central_dp=central_noise(config))
    run_rounds(strategy, secure_grid(grid, config, clients), config, recorder, initial,
               config_record(config), first_round=first_round, stop=stop)


class ForwardOffers:
    """The averaging server's side of accuracy recovery: between rounds, takes the newest
    forward-distilled model if it is newer than the last one looked at and passes ``check``
    (None: every offer is adopted), and logs each decision with the round (``offer``)."""

    def __init__(self, config: RunConfig, channel: ModelChannel, seen: int,
                 check: AdoptionCheck | None) -> None:
        self.config, self.channel, self.seen, self.check = config, channel, seen, check
        self.offers = self.adoptions = 0
        self.offer: dict[str, Any] | None = None  # this round's, until logged

    def before_round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        if self.channel.latest_version("forward") <= self.seen:
            return arrays
        entry = self.channel.latest("forward")
        self.seen, self.offers = entry.version, self.offers + 1
        verdict = (self.check(entry.state, arrays.to_torch_state_dict())
                   if self.check is not None else None)
        self.offer = {"version": entry.version, "based-on": entry.meta.get("based-on"),
                      **(verdict.record() if verdict else {"adopted": True})}
        scores = (f" (validation accuracy {verdict.candidate.accuracy:.4f} vs current "
                  f"{verdict.current.accuracy:.4f})" if verdict else "")
        if not self.offer["adopted"]:
            print(f"[round {server_round}] rejecting forward-distilled model {entry.version}"
                  f"{scores}", flush=True)
            return arrays
        self.adoptions += 1
        print(f"[round {server_round}] adopting forward-distilled model {entry.version} "
              f"(from averaged version {entry.meta.get('based-on')}){scores}", flush=True)
        return to_arrays(from_arrays(self.config.model, ArrayRecord(entry.state), self.config))

    def round_fields(self) -> dict[str, Any]:
        """Fields for the round's record: adoptions so far, and the round's offer if any."""
        offer, self.offer = self.offer, None
        return {"adoptions": self.adoptions, **({"offer": offer} if offer else {})}

    def summary(self) -> dict[str, Any]:
        return {"adoptions": self.adoptions, "offers": self.offers}


def average(grid: Grid, config: RunConfig, clients: dict, recorder: RunRecorder,
            channel: ModelChannel) -> dict[str, Any]:
    """The averaging server's loop; resumes after the newest ``distilled`` version if any."""
    resumed = channel.latest("distilled")
    if resumed is None:
        start = channel.wait("forward", timeout=config.channel_timeout)
        offset, seen = 0, start.version
    else:
        start, offset, seen = resumed, resumed.version, channel.latest_version("forward")
    # the budget counts from the initial model being ready (a channel written before origins
    # were recorded: from now)
    origin = start.meta.get(ORIGIN, time.time())
    budget = TimeBudget(config.time_budget_s, origin)
    initial = to_arrays(from_arrays(config.model, ArrayRecord(start.state), config))
    check = AdoptionCheck(config) if config.adoption_check == "validation" else None
    offers = ForwardOffers(config, channel, seen, check)
    rounds_done = offset

    def publish(server_round: int, arrays: ArrayRecord | None, info: dict[str, Any]
                ) -> dict[str, Any]:
        nonlocal rounds_done
        rounds_done = server_round
        if arrays is not None:  # a skipped round publishes nothing: no new version
            channel.publish("distilled", arrays.to_torch_state_dict(),
                            {"round": server_round, ORIGIN: origin}, version=server_round)
        return offers.round_fields()

    fedavg_rounds(grid, config, clients, recorder, initial, offers.before_round, publish,
                  offset + 1, stop=budget.spent)
    final = channel.latest_version("distilled")
    if final < 0:
        raise RuntimeError("no averaged model was published: no round had enough usable replies "
                           f"(min-replies={config.min_replies}; see the rejected replies in "
                           "rounds.jsonl), or distill.time-budget-s was spent before round 1")
    if channel.latest_version("stop") < final:  # stop's version: the final distilled model
        channel.publish("stop", {}, {"final-version": final}, version=final)
    return {"averaging-rounds": rounds_done - offset,
            "stopped-by": stopped_by(rounds_done, config.num_rounds),
            "averaging-time-s": round(recorder.elapsed(), 2), **offers.summary()}


def run_async_distill(grid, config, clients, recorder) -> dict[str, Any]:
    """Both servers in one run: averaging here, distillation in a child process."""
    channel_dir = config.channel_dir or str(recorder.folder / "channel")
    channel = open_channel(config.channel_backend, channel_dir)
    log_path, result_path = recorder.folder / GLOBAL_LOG, recorder.folder / "distillation.json"
    command = [sys.executable, "-m", "fedapps.methods.distill.distillation",
               str(recorder.folder / "config.json"), "--set", f"distill.channel-dir={channel_dir}",
               "--log", str(log_path), "--t0", repr(time.time() - recorder.elapsed()),
               "--result", str(result_path)]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, env=env)
    try:
        _wait_for_start(channel, process, config.channel_timeout)
        summary = average(grid, config, clients, recorder, channel)
        code = process.wait()  # it ends by itself: final passes, then testing the snapshots
        if code != 0:
            raise RuntimeError(f"the distillation server exited with code {code}; see its log")
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait()
    distillation = json.loads(result_path.read_text())
    return {**summary, **distillation,
            **global_summary(read_log(log_path), config.target_accuracy)}


def _wait_for_start(channel: ModelChannel, process: subprocess.Popen, timeout: float) -> None:
    """Wait for the initial model, failing fast if the distillation process died instead."""
    deadline = time.monotonic() + timeout
    while channel.latest_version("forward") < 0:
        if process.poll() is not None:
            raise RuntimeError(
                f"the distillation server exited with code {process.returncode} before "
                "publishing the initial model; see its log above"
            )
        if time.monotonic() > deadline:
            raise ChannelTimeout(f"no initial model from the distillation server in {timeout}s")
        time.sleep(0.05)


def run_async_averaging(grid, config, clients, recorder) -> dict[str, Any]:
    """Deployment half 1: the averaging server only (pair it with async-distillation)."""
    return average(grid, config, clients, recorder,
                   open_channel(config.channel_backend, config.channel_dir))


def run_async_distillation(grid, config, clients, recorder) -> dict[str, Any]:
    """Deployment half 2: the distillation server as a Flower run (it uses no clients)."""
    log_path = recorder.folder / GLOBAL_LOG
    channel = open_channel(config.channel_backend, config.channel_dir)
    result = serve(config, channel, log_for(config, log_path, time.time() - recorder.elapsed()))
    return {**result, **global_summary(read_log(log_path), config.target_accuracy)}
