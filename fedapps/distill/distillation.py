"""The distillation server: holds the large global model and does all distillation.

Reverse distillation fits the global model (student) to the averaged small model (teacher) on the
server's unlabeled pool U; forward distillation fits a small model to the global one. The global
model is tested on the union of all clients' test splits (held out from every training step), and
each test is one row of ``global.jsonl``: wall-clock time, version, accuracy.

:class:`Distiller` is shared by the synchronous scheme (:mod:`fedapps.distill.sync`, in the
ServerApp) and the asynchronous one (:func:`serve`, a process of its own):

    python -m fedapps.distill.distillation conf/async-digits.toml --set channel-dir=/shared/ch

runs it without Flower, e.g. on a second machine sharing the channel with an ``async-averaging``
run (README, "Asynchronous distillation FL", "Deployment").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedapps import training
from fedapps.client import generator
from fedapps.config import RunConfig
from fedapps.data import client_data, partition_for, unlabeled_inputs
from fedapps.distill.channel import ChannelTimeout, ModelChannel, State, open_channel
from fedapps.messages import from_arrays, new_model

GLOBAL_LOG = "global.jsonl"


def initial_small_state(config: RunConfig) -> State:
    """The first distilled model, seeded: the same for every scheme with the same seed."""
    torch.manual_seed(config.seed)
    return new_model(config.model, config).state_dict()


def held_out_test(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of every client's test split: data no model of either server trains on."""
    tests = [client_data(config, pid).test for pid in range(partition_for(config).num_clients)]
    return torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests])


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


class Distiller:
    """The global model with the data it is distilled on (U) and tested on (clients' tests)."""

    def __init__(self, config: RunConfig, global_state: State | None = None) -> None:
        self.config = config
        torch.manual_seed(config.seed + 1)  # not the small model's initial weights
        self.model = he_init(new_model(config.global_model, config))
        if global_state is not None:
            self.model = from_arrays(config.global_model, ArrayRecord(global_state), config)
        self.unlabeled = unlabeled_inputs(config)
        if len(self.unlabeled) == 0:
            raise ValueError("distillation needs the server's unlabeled pool: unlabeled-size is 0")
        self.test_x, self.test_y = held_out_test(config)
        self.optim = training.Optim(config.distill_lr, config.momentum, config.weight_decay,
                                    config.clip_norm, config.batch_size)
        self.device = training.resolve_device(config.device)
        if config.distill_threads:
            # One thread by default: in simulation the clients share the machine, and torch's
            # one-thread-per-core default then oversubscribes it and stalls every pass.
            torch.set_num_threads(config.distill_threads)

    def small(self, state: State) -> nn.Module:
        return from_arrays(self.config.model, ArrayRecord(state), self.config)

    def reverse(self, small_state: State, step: int) -> float:
        """Small model teaches the global model; returns the last epoch's mean KL."""
        kl = training.distill(
            self.model, self.small(small_state), self.unlabeled, self.config.distill_epochs,
            self.optim, generator(self.config, "reverse", step), self.device,
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
        return {k: v.detach().cpu() for k, v in student.state_dict().items()}

    def evaluate(self) -> training.EvalResult:
        return training.evaluate(self.model, self.test_x, self.test_y, self.device)

    def state(self) -> State:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


class GlobalLog:
    """Rows of (wall-clock time since ``t0``, version, accuracy): what the benchmark plots.

    ``t0`` is a ``time.time()`` value, so that two processes (averaging and distillation) share
    one time axis; each row is appended and flushed at once.
    """

    def __init__(self, path: Path, t0: float | None = None) -> None:
        self.path = path
        self.t0 = time.time() if t0 is None else t0
        path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, version: int, result: training.EvalResult, **fields: Any) -> dict[str, Any]:
        row = {"time": round(time.time() - self.t0, 3), "version": version,
               "accuracy": result.accuracy, "loss": result.loss, **fields}
        with self.path.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        print(f"[global v{version}] t={row['time']:.1f}s accuracy={result.accuracy:.4f}"
              + "".join(f" {k}={v}" for k, v in fields.items()), flush=True)
        return row


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
        "target-accuracy": target,
        "time-to-target-s": reached[0] if reached else None,
        "global-evaluations": len(rows),
    }


def serve(config: RunConfig, channel: ModelChannel, log: GlobalLog) -> dict[str, Any]:
    """Distillation server loop, until the averaging server's final model is distilled.

    Topics: reads ``distilled`` (averaged small models) and ``stop`` (version = the final
    averaging round); writes ``forward`` (the initial small model, then every
    ``forward-distill-every`` passes a forward-distilled one) and ``global`` (a checkpoint per
    pass, from which a restarted server carries on). ``per-round`` distils once per new small
    model (the newest, when several arrived during a pass); ``continuous`` keeps distilling from
    the newest it has instead of waiting, and distils the final model ``final-passes`` times.
    """
    checkpoint = channel.latest("global")
    distiller = Distiller(config, checkpoint.state if checkpoint else None)
    passes = checkpoint.version if checkpoint else 0
    if channel.latest_version("forward") < 0:
        channel.publish("forward", initial_small_state(config), {"based-on": 0})
    log.log(0 if checkpoint is None else checkpoint.meta["distilled-version"],
            distiller.evaluate(), passes=passes)
    final_passes = config.final_passes if config.distill_mode == "continuous" else 1
    small, have, on_have, last_news = None, -1, 0, time.monotonic()
    while True:
        if channel.latest_version("distilled") > have:
            entry = channel.latest("distilled")
            small, have, on_have, last_news = entry.state, entry.version, 0, time.monotonic()
        else:
            finished = 0 <= channel.latest_version("stop") <= have
            if finished and on_have >= final_passes:
                break  # the final model has been distilled (final-passes times if continuous)
            if not finished and time.monotonic() - last_news > config.channel_timeout:
                raise ChannelTimeout(
                    f"no new distilled model for {config.channel_timeout:.0f}s (newest: "
                    f"{have}); is the averaging server running on the same channel?"
                )
            if config.distill_mode == "per-round" or small is None:
                time.sleep(0.05)
                continue
        passes, on_have = passes + 1, on_have + 1
        kl = distiller.reverse(small, passes)
        log.log(have, distiller.evaluate(), passes=passes, kl=round(kl, 5))
        channel.publish("global", distiller.state(), {"distilled-version": have}, version=passes)
        if config.forward_distill_every and passes % config.forward_distill_every == 0:
            channel.publish("forward", distiller.forward(small, passes), {"based-on": have})
    return {"distillation-passes": passes, "distilled-version": have}


def main(argv: Sequence[str] | None = None) -> int:
    from fedapps.launch import parse_override, resolve

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", help="experiment file (.toml), or a results config.json")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--log", help=f"where to append {GLOBAL_LOG} rows "
                        "(default: <channel-dir>/distillation/global.jsonl)")
    parser.add_argument("--t0", type=float, help="time.time() at which the time axis starts")
    args = parser.parse_args(argv)
    if args.config.endswith(".json"):
        values = {**json.loads(Path(args.config).read_text()), **dict(args.overrides)}
        config = RunConfig.from_mapping(values)
    else:
        config = RunConfig.from_mapping(resolve(args.config, dict(args.overrides)))
    channel = open_channel(config.channel_backend, config.channel_dir)
    path = Path(args.log) if args.log else Path(config.channel_dir) / "distillation" / GLOBAL_LOG
    result = serve(config, channel, GlobalLog(path, args.t0))
    print(json.dumps({**result, **global_summary(read_log(path), config.target_accuracy)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
