"""The distillation server: holds the large global model and does all distillation.

Reverse distillation fits the global model (student) to the averaged small model (teacher) on the
server's distillation set U; forward distillation fits a small model to the global one. Both come
from the server's own pool (removed from the data before clients are formed):
``distill.global-test =
server`` holds ``distill.global-test-fraction`` of it out, with labels, as the global model's test
set
and distils on the rest; ``distill.global-test = clients`` tests on the union of the clients' test
splits instead (for comparison with older runs; a real server never sees those).

Testing is kept off the critical path: during reverse distillation the global model is saved
(a state-dict file, milliseconds) at the first optimiser step after every multiple of
``distill.snapshot-every-s`` seconds, and at the end of a pass after which the server waits; the
snapshots are tested after the run and written to ``global.jsonl`` (time, version, accuracy).
So the global model's accuracy is known on the same fixed time grid in every scheme, and
testing never slows a run. Every pass is a row of ``passes.jsonl`` (kind, start, end, KL).

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
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedapps import training
from fedapps.config import CommandLine, RunConfig, exit_on_bad_input, parse_override, resolve
from fedapps.data.federated import DataError, client_data, num_clients_of, server_pool
from fedapps.methods.distill.channel import ChannelTimeout, ModelChannel, State, open_channel
from fedapps.protocol.messages import from_arrays, new_model
from fedapps.protocol.node import generator

GLOBAL_LOG = "global.jsonl"  # tested snapshots: what the benchmark plots
PASSES_LOG = "passes.jsonl"  # one row per distillation pass: the time breakdown
SNAPSHOTS = "snapshots"  # untested snapshot files, next to GLOBAL_LOG

StepHook = Callable[[nn.Module], None]


@dataclasses.dataclass(frozen=True, eq=False)
class ServerData:
    """The distillation server's data: inputs U to distil on, and the global model's test set."""

    distill: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def server_data(config: RunConfig) -> ServerData:
    """Split the server's pool (``unlabeled-size``) into U and the held-out test set."""
    pool_x, pool_y = server_pool(config)
    if config.global_test == "clients":
        tests = [client_data(config, pid).test for pid in range(num_clients_of(config))]
        return ServerData(torch.from_numpy(pool_x), torch.cat([t.x for t in tests]),
                          torch.cat([t.y for t in tests]))
    held_out = round(config.global_test_fraction * len(pool_y))
    if not 0 < held_out < len(pool_y):
        raise DataError(
            f"distill.global-test-fraction={config.global_test_fraction} of the server's pool of "
            f"{len(pool_y)} samples leaves no {'test' if held_out == 0 else 'distillation'} "
            "sample; raise unlabeled-size"
        )
    # its own seed stream: the split must not shift when other seeded draws change
    order = np.random.default_rng([config.seed, 7]).permutation(len(pool_y))
    test, distill = order[:held_out], order[held_out:]
    return ServerData(torch.from_numpy(pool_x[np.sort(distill)]),
                      torch.from_numpy(pool_x[test]), torch.from_numpy(pool_y[test]))


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
        if len(self.unlabeled) == 0:
            raise ValueError("distillation needs the server's unlabeled pool: unlabeled-size is 0")
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
        """Test the global model (or a snapshot ``state`` of it) on the held-out test set."""
        model = self.model if state is None else from_arrays(
            self.config.global_model, ArrayRecord(state), self.config)
        return training.evaluate(model, self.test_x, self.test_y, self.device)

    def state(self) -> State:
        return _detached(self.model)


def _detached(model: nn.Module) -> State:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class GlobalLog:
    """Snapshots of the global model on a time grid, tested after the run, plus pass timings.

    ``t0`` is a ``time.time()`` value, so that two processes (averaging and distillation) share
    one time axis. Files, all next to ``path`` (the ``global.jsonl`` of tested snapshots):
    ``snapshots/<n>.pt`` until tested, ``passes.jsonl`` one row per pass. A restarted server
    continues the numbering and tests only its own, untested snapshots.
    """

    def __init__(self, path: Path, t0: float | None = None, every: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.t0 = clock() if t0 is None else t0
        self.every = every
        self.folder = path.parent / SNAPSHOTS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = len(read_log(path)) + len(list(self.folder.glob("*.pt")))
        self.taken_at = -float("inf")  # time of the newest snapshot
        self.changed = False  # the model took a step since the newest snapshot

    def now(self) -> float:
        return self.clock() - self.t0

    def snapshot(self, model: nn.Module, version: int, passes: int) -> None:
        """Save the model as it is now (tested later by :meth:`test_snapshots`)."""
        self.taken_at, self.changed = self.now(), False
        row = {"time": round(self.taken_at, 3), "version": version, "passes": passes}
        torch.save({"row": row, "state": _detached(model)},
                   self.folder / f"{self.count:06d}.pt")
        self.count += 1

    def watcher(self, version: int, passes: int) -> StepHook:
        """The step hook of one reverse pass: a snapshot at the first step past a grid point."""
        def after_step(model: nn.Module) -> None:
            self.changed = True
            if self.every and self.now() // self.every > self.taken_at // self.every:
                self.snapshot(model, version, passes)
        return after_step

    def settle(self, model: nn.Module, version: int, passes: int) -> None:
        """End of a pass after which the model stays still: its state holds until the next
        pass, so it is what every grid point in between sees."""
        if self.changed:
            self.snapshot(model, version, passes)

    def log_pass(self, kind: str, version: int, passes: int, started: float,
                 kl: float | None = None) -> None:
        """One distillation pass (reverse or forward) that ran from ``started`` until now."""
        row = {"kind": kind, "version": version, "passes": passes,
               "start": round(started, 3), "end": round(self.now(), 3)}
        if kl is not None:
            row["kl"] = round(kl, 5)
        _append(self.path.parent / PASSES_LOG, row)
        print(f"[{kind} pass {passes}] v{version} t={row['end']:.1f}s "
              f"({row['end'] - row['start']:.1f}s)" + (f" kl={kl:.5f}" if kl else ""),
              flush=True)

    def test_snapshots(self, distiller: Distiller) -> list[dict[str, Any]]:
        """Test every untested snapshot (after the run: all cores), append them to the log."""
        with training.torch_threads(training.available_cores()):
            for file in sorted(self.folder.glob("*.pt")):
                saved = torch.load(file, weights_only=True)
                result = distiller.evaluate(saved["state"])
                _append(self.path, {**saved["row"], "accuracy": result.accuracy,
                                    "loss": result.loss})
                file.unlink()
        rows = read_log(self.path)
        if rows:
            print(f"[global] {len(rows)} snapshots tested; final accuracy "
                  f"{rows[-1]['accuracy']:.4f} at t={rows[-1]['time']:.1f}s", flush=True)
        return rows


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
    """Distillation server loop, until the averaging server's final model is distilled.

    Topics: reads ``distilled`` (averaged small models) and ``stop`` (version = the final
    distilled model); writes ``forward`` (the initial small model, then every
    ``distill.forward-distill-every`` passes a forward-distilled one) and ``global`` (a checkpoint
    per pass, from which a restarted server carries on). ``per-round`` distils once per new small
    model (the newest, when several arrived during a pass); ``continuous`` keeps distilling from
    the newest it has instead of waiting, and distils the final model ``distill.final-passes``
    times.
    The snapshots are tested once the loop is over.
    """
    checkpoint = channel.latest("global")
    distiller = Distiller(config, checkpoint.state if checkpoint else None)
    passes = checkpoint.version if checkpoint else 0
    if channel.latest_version("forward") < 0:
        channel.publish("forward", initial_distilled_state(config, distiller), {"based-on": 0})
    log.snapshot(distiller.model, checkpoint.meta["distilled-version"] if checkpoint else 0,
                 passes)
    final_passes = config.final_passes if config.distill_mode == "continuous" else 1
    small, have, on_have, last_news = None, -1, 0, time.monotonic()
    while True:
        if channel.latest_version("distilled") > have:
            entry = channel.latest("distilled")
            small, have, on_have, last_news = entry.state, entry.version, 0, time.monotonic()
        else:
            finished = 0 <= channel.latest_version("stop") <= have
            if finished and on_have >= final_passes:
                # the final model has been distilled (distill.final-passes times if continuous)
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
        started = log.now()
        kl = distiller.reverse(small, passes, log.watcher(have, passes))
        log.log_pass("reverse", have, passes, started, kl)
        if config.distill_mode == "per-round" or not config.snapshot_every_s:
            log.settle(distiller.model, have, passes)  # it waits for the next model now
        channel.publish("global", distiller.state(), {"distilled-version": have}, version=passes)
        if config.forward_distill_every and passes % config.forward_distill_every == 0:
            started = log.now()
            channel.publish("forward", distiller.forward(small, passes), {"based-on": have})
            log.log_pass("forward", have, passes, started)
    log.settle(distiller.model, have, passes)
    log.test_snapshots(distiller)
    return {"distillation-passes": passes, "distilled-version": have}


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLine(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", help="experiment file (.toml), or a results config.json")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--log", help=f"where to append {GLOBAL_LOG} rows "
                        "(default: <distill.channel-dir>/distillation/global.jsonl)")
    parser.add_argument("--t0", type=float, help="time.time() at which the time axis starts")
    args = parser.parse_args(argv)
    if args.config.endswith(".json"):
        values = {**json.loads(Path(args.config).read_text()), **dict(args.overrides)}
        config = RunConfig.from_mapping(values)
    else:
        config = RunConfig.from_mapping(resolve(args.config, dict(args.overrides)))
    channel = open_channel(config.channel_backend, config.channel_dir)
    path = Path(args.log) if args.log else Path(config.channel_dir) / "distillation" / GLOBAL_LOG
    result = serve(config, channel, GlobalLog(path, args.t0, config.snapshot_every_s))
    print(json.dumps({**result, **global_summary(read_log(path), config.target_accuracy)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main))
