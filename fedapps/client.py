"""Client-side work of every method, one function per Flower message type.

``client_app.py`` registers these handlers; each reads the run config and models from the
message, loads its partition (cached per process) and calls :mod:`fedapps.training`.
"""

from __future__ import annotations

import hashlib
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedapps import training, tuning
from fedapps.config import RunConfig
from fedapps.data import ClientData, client_data, partition_for
from fedapps.messages import from_arrays, new_model, run_config_of
from fedapps.training import Optim


def partition_id(context: Context, config: RunConfig) -> int:
    """The node's partition, checked against the run's client count."""
    node = context.node_config
    if "partition-id" not in node:
        raise KeyError(
            "node config has no 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=N num-partitions=M'"
        )
    expected = partition_for(config).num_clients
    if "num-partitions" in node and int(node["num-partitions"]) != expected:
        raise ValueError(
            f"node config num-partitions={node['num-partitions']} but the run has "
            f"{expected} clients (num-clients or the partition file)"
        )
    return int(node["partition-id"])


def generator(config: RunConfig, *parts: int | str) -> torch.Generator:
    """A seeded generator per (run seed, purpose, round, client): runs repeat exactly."""
    digest = hashlib.sha256(repr((config.seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def optim_of(config: RunConfig) -> Optim:
    return Optim(config.lr, config.momentum, config.weight_decay, config.clip_norm,
                 config.batch_size)


DEVICE_PATHS = ("data-path", "partition-file")


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, ClientData, torch.device]:
    # A real device keeps its data (and partition file) wherever it likes: node config
    # 'data-path=/data/femnist' overrides the run's path on that SuperNode only.
    local = {key: str(context.node_config[key]) for key in DEVICE_PATHS
             if key in context.node_config}
    config = run_config_of(msg.content, local)
    pid = partition_id(context, config)
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    return config, pid, client_data(config, pid), training.resolve_device(config.device)


def injected_fault(config: RunConfig, pid: int, server_round: int) -> str:
    """``fault-injection`` for resilience tests: fail, stall past the timeout, or send NaNs."""
    kind = config.faults().get((pid, server_round), "")
    if kind == "error":
        raise RuntimeError(f"fault-injection: client {pid} fails in round {server_round}")
    if kind == "slow":
        time.sleep(config.round_timeout + 2.0)
    return kind


def _outgoing(model: torch.nn.Module, fault: str) -> ArrayRecord:
    state = model.state_dict()
    if fault == "nan":
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = torch.full_like(state[name], float("nan"))
    return ArrayRecord(state)


def _reply(msg: Message, metrics: dict, **records: ArrayRecord | ConfigRecord) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), **records})
    return Message(content=content, reply_to=msg)


def _eval_metrics(prefix: str, result: training.EvalResult) -> dict[str, float]:
    return {f"{prefix}-loss": result.loss, f"{prefix}-accuracy": result.accuracy}


def describe(msg: Message, context: Context) -> Message:
    """Query: who am I, how much data, and (``init-arch=local-best``) my best architecture.

    local-best is the paper's choice (:func:`fedapps.tuning.choose_local_best`): every
    candidate trained alone with early stopping, the highest validation accuracy kept. It takes
    minutes on real data, so each candidate prints a progress line.
    """
    config, pid, data, device = _setup(msg, context)
    info = ConfigRecord()
    if config.method == "fedme" and config.init_arch == "local-best":
        info = local_best(config, pid, data, device)
    return _reply(msg, {"partition-id": pid, "num-examples": len(data.train),
                        "num-val": len(data.val)}, info=info)


def local_best(config: RunConfig, pid: int, data: ClientData, device: torch.device) -> ConfigRecord:
    """This client's best candidate and every candidate's figures (the server may pool them)."""
    started = time.perf_counter()

    def build(name: str) -> torch.nn.Module:
        torch.manual_seed(config.seed)
        return new_model(name, config)

    def progress(line: str) -> None:
        print(f"fedapps: client {pid} local-best {line} "
              f"(t={time.perf_counter() - started:.1f}s)", flush=True)

    arch, results = tuning.choose_local_best(
        config.candidates, build, data.train, data.val, config.local_best_epochs,
        config.local_best_patience, optim_of(config),
        lambda name: generator(config, "local-best", pid, name), device, progress,
    )
    progress(f"chose {arch}")
    return ConfigRecord({
        "candidates": [r.name for r in results],
        "val-accuracy": [r.accuracy for r in results],
        "val-loss": [r.loss for r in results],
        "best-epoch": [r.best_epoch for r in results],
    })


def train_global(msg: Message, context: Context) -> Message:
    """FedAvg local update of the shared model."""
    config, pid, data, device = _setup(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    fault = injected_fault(config, pid, server_round)
    model = from_arrays(config.model, msg.content["arrays"], config)
    started = time.perf_counter()
    loss = training.train(model, data.train.x, data.train.y, config.local_epochs,
                          optim_of(config), generator(config, "train", server_round, pid), device)
    return _reply(
        msg,
        {"partition-id": pid, "num-examples": len(data.train), "train-loss": loss,
         "train-s": time.perf_counter() - started},
        arrays=_outgoing(model, fault),
    )


def train_mutual(msg: Message, context: Context) -> Message:
    """FedMe client round: deep mutual learning, then the adoption decision on validation.

    ``adoption-rule`` (:class:`fedapps.tuning.AdoptionRule`; the paper: strictly lower
    validation loss). The decision is made on this client's DML-trained copy; the server then
    hands the client the AGGREGATED version of the chosen model (paper's rule, made explicit).
    """
    config, pid, data, device = _setup(msg, context)
    info = msg.content["fedme"]
    server_round = int(info["server-round"])
    fault = injected_fault(config, pid, server_round)
    personal = from_arrays(str(info["personal-arch"]), msg.content["personal"], config)
    exchange = from_arrays(str(info["exchange-arch"]), msg.content["exchange"], config)
    started = time.perf_counter()
    loss_p, loss_ex = training.train_mutual(
        personal, exchange, data.train.x, data.train.y, config.local_epochs, optim_of(config),
        generator(config, "mutual", server_round, pid), device,
        config.dml_temperature, config.dml_kl_weight,
    )
    val_p = training.evaluate(personal, data.val.x, data.val.y, device)
    val_ex = training.evaluate(exchange, data.val.x, data.val.y, device)
    rule = tuning.AdoptionRule.of(config)
    same_arch = str(info["personal-arch"]) == str(info["exchange-arch"])
    adopt = rule.adopt(val_p, val_ex, same_arch, server_round)
    return _reply(
        msg,
        {
            "partition-id": pid,
            "num-examples": len(data.train),
            "train-loss": loss_p,
            "exchange-train-loss": loss_ex,
            "val-loss": val_p.loss,
            "exchange-val-loss": val_ex.loss,
            "val-accuracy": val_p.accuracy,
            "exchange-val-accuracy": val_ex.accuracy,
            "adopted": int(adopt),
            "train-s": time.perf_counter() - started,
        },
        personal=_outgoing(personal, fault),
        exchange=_outgoing(exchange, fault),
    )


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model in the message on this client's test split."""
    config, pid, data, device = _setup(msg, context)
    model = from_arrays(_arch_of(msg, config), msg.content["arrays"], config)
    result = training.evaluate(model, data.test.x, data.test.y, device)
    return _reply(msg, {"partition-id": pid, "num-examples": result.num_examples,
                        **_eval_metrics("test", result)})


def finetune(msg: Message, context: Context) -> Message:
    """End of training: test accuracy before and after ``finetune-epochs`` of plain CE."""
    config, pid, data, device = _setup(msg, context)
    model = from_arrays(_arch_of(msg, config), msg.content["arrays"], config)
    before = training.evaluate(model, data.test.x, data.test.y, device)
    training.train(model, data.train.x, data.train.y, config.finetune_epochs, optim_of(config),
                   generator(config, "finetune", pid), device)
    after = training.evaluate(model, data.test.x, data.test.y, device)
    return _reply(msg, {"partition-id": pid, "num-examples": after.num_examples,
                        **_eval_metrics("before", before), **_eval_metrics("after", after)})


def train_local(msg: Message, context: Context) -> Message:
    """Local-only baseline: train alone, keep the epoch with the best validation loss."""
    config, pid, data, device = _setup(msg, context)
    torch.manual_seed(config.seed + pid)
    model = new_model(config.model, config)
    best_loss, best_state = float("inf"), None
    rng = generator(config, "local", pid)
    for _ in range(config.num_rounds * config.local_epochs):
        training.train(model, data.train.x, data.train.y, 1, optim_of(config), rng, device)
        loss = training.evaluate(model, data.val.x, data.val.y, device).loss
        if best_state is None or loss < best_loss:
            best_loss = loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    result = training.evaluate(model, data.test.x, data.test.y, device)
    return _reply(msg, {"partition-id": pid, "num-examples": result.num_examples,
                        "val-loss": best_loss, **_eval_metrics("after", result),
                        **_eval_metrics("before", result)})


def _arch_of(msg: Message, config: RunConfig) -> str:
    if "model" in msg.content.config_records:
        return str(msg.content["model"]["arch"])
    return config.model


HANDLERS = {
    ("query", ""): describe,
    ("train", ""): train_global,
    ("train", "mutual"): train_mutual,
    ("train", "local"): train_local,
    ("evaluate", ""): evaluate,
    ("evaluate", "finetune"): finetune,
}


def build_client_app() -> ClientApp:
    """The ClientApp with one handler per message type (``client_app.py`` exposes it)."""
    from fedapps.baselines_client import HANDLERS as BASELINES  # it imports this module

    app = ClientApp()
    for (kind, action), handler in {**HANDLERS, **BASELINES}.items():
        register = getattr(app, kind)
        (register(action) if action else register())(handler)
    return app
