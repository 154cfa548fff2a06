"""What every method's client half shares: reading a message, seeding, replying.

A handler starts with :func:`setup` (run config, partition id, this client's data and device)
and ends with :func:`reply`. Nothing here knows a method.
"""

from __future__ import annotations

import hashlib
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedapps import training
from fedapps.config import RunConfig
from fedapps.data.federated import ClientData, client_data, partition_for
from fedapps.protocol.messages import run_config_of
from fedapps.training import Optim

# A real device keeps its data (and partition file) wherever it likes: node config
# 'data-path=/data/femnist' overrides the run's path on that SuperNode only.
DEVICE_PATHS = ("data-path", "partition-file")


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


def setup(msg: Message, context: Context) -> tuple[RunConfig, int, ClientData, torch.device]:
    """The run config (with this device's paths), partition id, data and torch device."""
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


def outgoing(model: torch.nn.Module, fault: str = "") -> ArrayRecord:
    """The model's arrays as sent back; ``fault = 'nan'`` poisons them (resilience tests)."""
    state = model.state_dict()
    if fault == "nan":
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = torch.full_like(state[name], float("nan"))
    return ArrayRecord(state)


def reply(msg: Message, metrics: dict, **records: ArrayRecord | ConfigRecord) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), **records})
    return Message(content=content, reply_to=msg)


def eval_metrics(prefix: str, result: training.EvalResult) -> dict[str, float]:
    return {f"{prefix}-loss": result.loss, f"{prefix}-accuracy": result.accuracy}


def arch_of(msg: Message, config: RunConfig) -> str:
    """The architecture named in the message (FedMe clients differ), else the run's model."""
    if "model" in msg.content.config_records:
        return str(msg.content["model"]["arch"])
    return config.model
