"""What every method's client half shares: reading a message, seeding, replying.

A handler starts with :func:`setup` (run config, partition id, this client's data and device)
and ends with :func:`reply`. Nothing here knows a method.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedapps import training
from fedapps.config import RunConfig
from fedapps.data.devices import read_device_file
from fedapps.data.federated import ClientData, client_data, num_clients_of
from fedapps.data.registry import DataError
from fedapps.protocol.messages import run_config_of
from fedapps.training import Optim

# A real device keeps its data (and partition file) wherever it likes: node config
# 'data-path=/data/femnist' overrides the run's path on that SuperNode only.
DEVICE_PATHS = ("data-path", "partition-file")


def partition_id(context: Context, config: RunConfig) -> int:
    """The node's partition (its client number), checked against the run's client count.

    It is the node config's ``partition-id``; a device with its own data may instead carry it in
    its file (``python -m fedapps.data.split`` writes it there).
    """
    node = context.node_config
    expected = num_clients_of(config)
    own = read_device_file(config.data_path) if config.dataset == "devices" else None
    if "partition-id" in node:
        pid = int(node["partition-id"])
    elif own is not None and own.partition_id is not None:
        pid = own.partition_id
    else:
        raise KeyError(
            "node config has no 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=N num-partitions=M'"
            + (" or give its data file a partition_id" if config.dataset == "devices" else "")
        )
    if "num-partitions" in node and int(node["num-partitions"]) != expected:
        raise ValueError(
            f"node config num-partitions={node['num-partitions']} but the run has "
            f"{expected} clients (num-clients or the partition file)"
        )
    if config.dataset == "devices" and not 0 <= pid < expected:
        raise DataError(f"partition-id={pid} but the run has num-clients={expected}")
    return pid


def device_name(context: Context) -> str:
    """What a person calls this node: ``device-name`` of its node config, else its data file's
    name, else nothing (simulated nodes are known by partition id alone)."""
    node = context.node_config
    if "device-name" in node:
        return str(node["device-name"])
    return Path(str(node["data-path"])).stem if "data-path" in node else ""


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
