"""The distillation server: holds the large global model and does all distillation.

Reverse distillation fits the global model (student) to the averaged small model (teacher) on the
server's distillation set U; forward distillation fits a small model to the global one. Both come
from the server's own pool (removed from the data before clients are formed):
``distill.global-test = server`` holds ``distill.global-test-fraction`` of it out, with labels,
and distils on the rest; of the held-out set, ``distill.validation-fraction`` is the validation
split of the adoption check (:mod:`.adoption`) and the rest the global model's test set.
``distill.global-test = clients`` tests on the union of the clients' test splits instead (for
comparison with older runs; a real server never sees those).

Testing is kept off the critical path: the global model is saved (a state-dict file,
milliseconds) as the time grid (:func:`.budget.grid_index`) passes each point — at the first
optimiser step after it, or, when the server was waiting with the model at rest, the resting
model stamped with the time its pass ended — and once more when the run ends; the snapshots are
tested after the run and written to ``global.jsonl`` (time, version, accuracy). So the global
model's accuracy is known on the same time grid in every scheme, and testing never slows a run.
Every pass is a row of ``passes.jsonl`` (kind, start, end, KL; ``cut`` when the time budget
ended it).

:class:`Distiller` is shared by the synchronous scheme (:mod:`fedapps.methods.distill.sync`, in the
ServerApp) and the asynchronous one (:func:`serve`, a process of its own):

    python -m fedapps.methods.distill.distillation conf/async-digits.toml \
        --set distill.channel-dir=/shared/ch

runs it without Flower, e.g. on a second machine sharing the channel with an ``async-averaging``
run (docs/async-distill.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedapps import training
from fedapps.config import CommandLine, RunConfig, parse_override, resolve, run_command
from fedapps.data.federated import DataError, client_data, num_clients_of, server_pool
from fedapps.methods.distill.budget import ORIGIN, TimeBudget, TimeUp, grid_index
from fedapps.methods.distill.channel import ChannelTimeout, ModelChannel, State, open_channel
from fedapps.protocol.messages import from_arrays, new_model
from fedapps.protocol.node import generator
from fedapps.protocol.results import write_json

GLOBAL_LOG = "global.jsonl"  # tested snapshots: what the benchmark plots
PASSES_LOG = "passes.jsonl"  # one row per distillation pass: the time breakdown
SNAPSHOTS = "snapshots"  # untested snapshot files, next to GLOBAL_LOG

StepHook = Callable[[nn.Module], None]


@dataclasses.dataclass(frozen=True, eq=False)
class ServerData:
    """The server's data: inputs U to distil on, the global model's test set, and the
    validation split of the adoption check (empty unless ``distill.validation-fraction``)."""

    distill: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    validation_x: torch.Tensor
    validation_y: torch.Tensor


def server_data(config: RunConfig) -> ServerData:
    """Split the server's pool (``unlabeled-size``) into U and the held-out set, and the
    held-out set into the validation split and the test set (disjoint: the reported accuracy is
    never measured on what the adoption check chose by)."""
    pool_x, pool_y = server_pool(config)
    if config.global_test == "clients":
        tests = [client_data(config, pid).test for pid in range(num_clients_of(config))]
        return ServerData(torch.from_numpy(pool_x), torch.cat([t.x for t in tests]),
                          torch.cat([t.y for t in tests]), torch.empty(0, *pool_x.shape[1:]),
                          torch.empty(0, dtype=torch.long))
    held_out = round(config.global_test_fraction * len(pool_y))
    if not 0 < held_out < len(pool_y):
        raise DataError(
            f"distill.global-test-fraction={config.global_test_fraction} of the server's pool of "
            f"{len(pool_y)} samples leaves no {'test' if held_out == 0 else 'distillation'} "
            "sample; raise unlabeled-size"
        )
    validation = round(config.validation_fraction * held_out)
    if config.validation_fraction and not 0 < validation < held_out:
        raise DataError(
            f"distill.validation-fraction={config.validation_fraction} of the server's "
            f"{held_out} held-out samples leaves no {'validation' if validation == 0 else 'test'} "
            "sample; raise unlabeled-size"
        )
    # its own seed stream: the split must not shift when other seeded draws change; the
    # validation split comes first, so without one the test set is what it always was
    order = np.random.default_rng([config.seed, 7]).permutation(len(pool_y))
    checked, test, distill = order[:validation], order[validation:held_out], order[held_out:]
    return ServerData(torch.from_numpy(pool_x[np.sort(distill)]),
                      torch.from_numpy(pool_x[test]), torch.from_numpy(pool_y[test]),
                      torch.from_numpy(pool_x[checked]), torch.from_numpy(pool_y[checked]))


def he_init(model: nn.Module) -> nn.Module:
    """He-normal weights, zero biases for every conv/linear layer.

    Why: with PyTorch's default init a deep plain ReLU stack such as cnn-large starts with
    almost input-independent outputs, and a few hundred unlabeled samples per pass could not get
    it moving (KL flat for 15+ passes on digits); with He init it follows the teacher at once.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


def initial_small_state(config: RunConfig) -> State:
    """A freshly initialised small model, seeded: the same for every scheme with the same seed.

    He init as the global model: with PyTorch's default init cnn-distill6 sat at chance (loss
    ln 10) for several epochs on ``shapes``, centrally trained; with He init it learnt at once.
    """
    torch.manual_seed(config.seed)
    return he_init(new_model(config.model, config)).state_dict()


def initial_distilled_state(config: RunConfig, distiller: Distiller) -> State:
    """The clients' first model. The paper's first step forward-distils the initial global model
    into it, so the two start out agreeing; ``distill.initial-forward-distill = 0`` skips that
    step."""
    small = initial_small_state(config)
    return distiller.forward(small, 0) if config.initial_forward_distill else small


@dataclasses.dataclass(frozen=True)
class WatchedOptim(training.Optim):
    """:class:`training.Optim` that calls ``after_step(model)`` after every optimiser step:
    how snapshots are taken in the middle of a pass without touching the training loop."""

    after_step: StepHook | None = None

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        super().step(model, optimizer, loss)
        if self.after_step is not None:
            self.after_step(model)


class Distiller:
    """The global model with the data it is distilled on (U) and tested on."""

    def __init__(self, config: RunConfig, global_state: State | None = None) -> None:
        self.config = config
        torch.manual_seed(config.seed + 1)  # not the small model's initial weights
        self.model = he_init(new_model(config.global_model, config))
        if global_state is not None:
            self.model = from_arrays(config.global_model, ArrayRecord(global_state), config)
        data = server_data(config)
        self.unlabeled, self.test_x, self.test_y = data.distill, data.test_x, data.test_y
        self.probe: nn.Module | None = None  # one model the snapshots are loaded into
        if len(self.unlabeled) == 0:
            raise DataError("distillation needs the server's unlabeled pool: unlabeled-size is 0")
        self.optim = training.Optim(config.distill_lr, config.momentum, config.weight_decay,
                                    config.clip_norm, config.batch_size)
        self.device = training.resolve_device(config.device)
        if config.distill_threads:
            # One thread by default: in simulation the clients share the machine, and torch's
            # one-thread-per-core default then oversubscribes it and stalls every pass.
            torch.set_num_threads(config.distill_threads)

    def small(self, state: State) -> nn.Module:
        return from_arrays(self.config.model, ArrayRecord(state), self.config)

    def reverse(self, small_state: State, step: int, after_step: StepHook | None = None) -> float:
        """Small model teaches the global model; returns the last epoch's mean KL."""
        optim = WatchedOptim(**dataclasses.asdict(self.optim), after_step=after_step)
        kl = training.distill(
            self.model, self.small(small_state), self.unlabeled, self.config.distill_epochs,
            optim, generator(self.config, "reverse", step), self.device,
            self.config.distill_temperature,
        )
        if self.config.distill_delay:
            time.sleep(self.config.distill_delay)
        return kl

    def forward(self, small_state: State, step: int) -> State:
        """Global model teaches a copy of ``small_state`` (warm start keeps the clients' work)."""
        student = self.small(small_state)
        training.distill(
            student, self.model, self.unlabeled, self.config.distill_epochs, self.optim,
            generator(self.config, "forward", step), self.device, self.config.distill_temperature,
        )
        return _detached(student)

    def evaluate(self, state: State | None = None) -> training.EvalResult:
        """Test the global model (or a snapshot ``state`` of it) on the held-out test set.

        Snapshots are loaded into one model kept for that (building the 12-layer model anew
        for each of hundreds of snapshots costs more than loading its weights)."""
        if state is None:
            return training.evaluate(self.model, self.test_x, self.test_y, self.device)
        if self.probe is None:
            self.probe = from_arrays(self.config.global_model, ArrayRecord(state), self.config)
        else:
            self.probe.load_state_dict(state)
        return training.evaluate(self.probe, self.test_x, self.test_y, self.device)

    def state(self) -> State:
        return _detached(self.model)


def _detached(model: nn.Module) -> State:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class GlobalLog:
    """Snapshots of the global model on a time grid, tested after the run, plus pass timings.

    ``t0`` is a ``time.time()`` value, so that two processes (averaging and distillation) share
    one time axis; the grid (``every`` seconds, growing by ``growth``: :func:`.budget.grid_index`)
    counts from the origin set by :meth:`begin`. Files, all next to ``path`` (the
    ``global.jsonl`` of tested snapshots): ``snapshots/<n>.pt`` until tested, ``passes.jsonl``
    one row per pass. A restarted server continues the numbering and tests only its own,
    untested snapshots.
    """

    def __init__(self, path: Path, t0: float | None = None, every: float = 0.0,
                 growth: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.t0 = clock() if t0 is None else t0
        self.every, self.growth = every, growth
        self.origin = self.t0
        self.folder = path.parent / SNAPSHOTS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = len(read_log(path)) + len(list(self.folder.glob("*.pt")))
        self.seen = 0  # grid index up to which the saved snapshots cover the model
        self.changed = False  # the model took a step since the newest snapshot
        # the model at rest after a pass (row, state), saved only if a grid point sees it
        self.resting: tuple[dict[str, Any], State] | None = None

    def now(self) -> float:
        return self.clock() - self.t0

    def grid_point(self) -> int:
        return grid_index(self.clock() - self.origin, self.every, self.growth)

    def begin(self, model: nn.Module, version: int, passes: int,
              origin: float | None = None) -> float:
        """The first snapshot of this server's life. The grid counts from ``origin`` (a
        ``clock()`` value; None: now, the initial model being ready); returns it."""
        self.origin = self.clock() if origin is None else origin
        self.snapshot(model, version, passes)
        return self.origin

    def snapshot(self, model: nn.Module, version: int, passes: int) -> None:
        """Save the model as it is now (tested later by :meth:`test_snapshots`)."""
        self._save(self._row(version, passes), _detached(model))

    def _row(self, version: int, passes: int) -> dict[str, Any]:
        return {"time": round(self.now(), 3), "version": version, "passes": passes}

    def _save(self, row: Mapping[str, Any], state: State) -> None:
        torch.save({"row": dict(row), "state": state}, self.folder / f"{self.count:06d}.pt")
        self.count += 1
        self.seen, self.changed, self.resting = self.grid_point(), False, None

    def watcher(self, version: int, passes: int, budget: TimeBudget | None = None) -> StepHook:
        """The step hook of one reverse pass: a snapshot at the first step past a grid point;
        once ``budget`` is spent, a snapshot and :class:`.budget.TimeUp` (the pass ends)."""
        def after_step(model: nn.Module) -> None:
            self.changed = True
            if self.resting is not None:
                # the model rested until this step: a grid point in the rest saw that state
                resting, self.resting = self.resting, None
                if self.grid_point() > self.seen:
                    self._save(*resting)
                    self.changed = True
            if self.every and self.grid_point() > self.seen:
                self.snapshot(model, version, passes)
            if budget is not None and budget.spent():
                if self.changed:
                    self.snapshot(model, version, passes)
                raise TimeUp(f"time budget of {budget.seconds:g}s spent")
        return after_step

    def settle(self, model: nn.Module, version: int, passes: int) -> None:
        """End of a pass after which the model rests (the server waits for clients or a new
        model): it stays what every grid point until the next step sees. It is saved, stamped
        with this time, once a grid point has fallen in the rest (the next step or
        :meth:`finish` tells); a rest no grid point falls in costs no snapshot. Without a grid
        (``every = 0``) every rest is saved."""
        if not self.changed:
            return
        row, state = self._row(version, passes), _detached(model)
        if not self.every:
            self._save(row, state)
        else:
            self.resting, self.seen, self.changed = (row, state), self.grid_point(), False

    def finish(self, model: nn.Module, version: int, passes: int) -> None:
        """The run's last snapshot: the model as the run ends, whatever the grid."""
        if self.resting is not None:
            self._save(*self.resting)
        elif self.changed:
            self.snapshot(model, version, passes)

    def log_pass(self, kind: str, version: int, passes: int, started: float,
                 kl: float | None = None, cut: bool = False) -> None:
        """One distillation pass (reverse or forward) that ran from ``started`` until now;
        ``cut``: the time budget ended it."""
        row = {"kind": kind, "version": version, "passes": passes,
               "start": round(started, 3), "end": round(self.now(), 3)}
        if kl is not None:
            row["kl"] = round(kl, 5)
        if cut:
            row["cut"] = True
        _append(self.path.parent / PASSES_LOG, row)
        print(f"[{kind} pass {passes}] v{version} t={row['end']:.1f}s "
              f"({row['end'] - row['start']:.1f}s)" + (f" kl={kl:.5f}" if kl else "")
              + (" cut by the time budget" if cut else ""), flush=True)

    def test_snapshots(self, distiller: Distiller) -> dict[str, Any]:
        """Test every untested snapshot (after the run: all cores), append them to the log;
        returns how many and how long it took (the benchmark reports that cost)."""
        started, files = time.perf_counter(), sorted(self.folder.glob("*.pt"))
        with training.torch_threads(training.available_cores()):
            for file in files:
                saved = torch.load(file, weights_only=True)
                result = distiller.evaluate(saved["state"])
                _append(self.path, {**saved["row"], "accuracy": result.accuracy,
                                    "loss": result.loss})
                file.unlink()
        seconds = round(time.perf_counter() - started, 2)
        rows = read_log(self.path)
        if rows:
            print(f"[global] {len(files)} snapshots tested in {seconds:.1f}s; final accuracy "
                  f"{rows[-1]['accuracy']:.4f} at t={rows[-1]['time']:.1f}s", flush=True)
        return {"snapshots-tested": len(files), "snapshot-test-s": seconds}


def reverse_pass(distiller: Distiller, log: GlobalLog, small: State, version: int, passes: int,
                 budget: TimeBudget) -> None:
    """One logged reverse-distillation pass of ``small`` into the global model, cut short when
    the time budget runs out during it."""
    started, kl, cut = log.now(), None, False
    try:
        kl = distiller.reverse(small, passes, log.watcher(version, passes, budget))
    except TimeUp:
        cut = True
    log.log_pass("reverse", version, passes, started, kl, cut)


def log_for(config: RunConfig, path: Path, t0: float | None) -> GlobalLog:
    """The global model's log with the configured snapshot grid."""
    return GlobalLog(path, t0, config.snapshot_every_s, config.snapshot_growth)


def _append(path: Path, row: Mapping[str, Any]) -> None:
    with path.open("a") as stream:
        stream.write(json.dumps(row) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def global_summary(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Final and best global accuracy, and the first time it reached ``target`` (None: never)."""
    reached = [r["time"] for r in rows if r["accuracy"] >= target]
    return {
        "global-accuracy": rows[-1]["accuracy"] if rows else float("nan"),
        "best-global-accuracy": max((r["accuracy"] for r in rows), default=float("nan")),
        "distill.target-accuracy": target,
        "time-to-target-s": reached[0] if reached else None,
        "global-evaluations": len(rows),
    }


def serve(config: RunConfig, channel: ModelChannel, log: GlobalLog) -> dict[str, Any]:
    """Distillation server loop, until the averaging server's final model is distilled or the
    time budget (``distill.time-budget-s``) is spent.

    Topics: reads ``distilled`` (averaged small models) and ``stop`` (version = the final
    distilled model); writes ``forward`` (the initial small model, then every
    ``distill.forward-distill-every`` passes a forward-distilled one) and ``global`` (a checkpoint
    per pass, from which a restarted server carries on). ``per-round`` distils once per new small
    model (the newest, when several arrived during a pass); ``continuous`` keeps distilling from
    the newest it has instead of waiting, and distils the final model ``distill.final-passes``
    times. Every entry it writes carries the origin of the time axis (:data:`.budget.ORIGIN`).
    The snapshots are tested once the loop is over.
    """
    checkpoint = channel.latest("global")
    distiller = Distiller(config, checkpoint.state if checkpoint else None)
    passes = checkpoint.version if checkpoint else 0
    offered = channel.latest("forward")
    if offered is None:
        first = initial_distilled_state(config, distiller)
        origin = log.begin(distiller.model, 0, passes)  # the initial model is ready: t = 0
        channel.publish("forward", first, {"based-on": 0, ORIGIN: origin})
    else:  # a restart: count from the experiment's origin, not from now
        resumed = checkpoint or offered
        origin = log.begin(distiller.model,
                           checkpoint.meta["distilled-version"] if checkpoint else 0, passes,
                           resumed.meta.get(ORIGIN))
    budget = TimeBudget(config.time_budget_s, origin)
    final_passes = config.final_passes if config.distill_mode == "continuous" else 1
    small, have, on_have, last_news = None, -1, 0, time.monotonic()
    while True:
        if budget.spent():
            stopped = "time-budget-s"
            break
        if channel.latest_version("distilled") > have:
            entry = channel.latest("distilled")
            small, have, on_have, last_news = entry.state, entry.version, 0, time.monotonic()
        else:
            finished = 0 <= channel.latest_version("stop") <= have
            if finished and on_have >= final_passes:
                # the final model has been distilled (distill.final-passes times if continuous)
                stopped = "final-model"
                break
            if not finished and time.monotonic() - last_news > config.channel_timeout:
                raise ChannelTimeout(
                    f"no new distilled model for {config.channel_timeout:.0f}s (newest: "
                    f"{have}); is the averaging server running on the same channel?"
                )
            if config.distill_mode == "per-round" or small is None:
                time.sleep(0.05)
                continue
        passes, on_have = passes + 1, on_have + 1
        reverse_pass(distiller, log, small, have, passes, budget)
        if config.distill_mode == "per-round" or not config.snapshot_every_s:
            log.settle(distiller.model, have, passes)  # it waits for the next model now
        channel.publish("global", distiller.state(), {"distilled-version": have, ORIGIN: origin},
                        version=passes)
        offer_due = config.forward_distill_every and passes % config.forward_distill_every == 0
        if offer_due and not budget.spent():
            started = log.now()
            channel.publish("forward", distiller.forward(small, passes),
                            {"based-on": have, ORIGIN: origin})
            log.log_pass("forward", have, passes, started)
    log.finish(distiller.model, have, passes)
    tested = log.test_snapshots(distiller)
    return {"distillation-passes": passes, "distilled-version": have,
            "distillation-stopped-by": stopped, **tested}


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", help="experiment file (.toml), or a results config.json")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--log", help=f"where to append {GLOBAL_LOG} rows "
                        "(default: <distill.channel-dir>/distillation/global.jsonl)")
    parser.add_argument("--t0", type=float, help="time.time() at which the time axis starts")
    parser.add_argument("--result", help="also write the result (JSON) to this file")
    args = parser.parse_args(argv)
    if args.config.endswith(".json"):
        values = {**json.loads(Path(args.config).read_text()), **dict(args.overrides)}
        config = RunConfig.from_mapping(values)
    else:
        config = RunConfig.from_mapping(resolve(args.config, dict(args.overrides)))
    channel = open_channel(config.channel_backend, config.channel_dir)
    path = Path(args.log) if args.log else Path(config.channel_dir) / "distillation" / GLOBAL_LOG
    result = serve(config, channel, log_for(config, path, args.t0))
    if args.result:
        write_json(Path(args.result), result)
    print(json.dumps({**result, **global_summary(read_log(path), config.target_accuracy)}),
          flush=True)
    return 0


if __name__ == "__main__":
    run_command(main)
