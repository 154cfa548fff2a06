"""The start of every run, both halves: the server asks each node who it is.

Server: :func:`discover_clients` waits for the nodes, sends each the run config and maps partition
ids to node ids. Client: :func:`describe` answers with its partition id and data sizes, plus what
the method's set-up hook adds (FedMe's local-best candidates).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedapps.config import RunConfig
from fedapps.data.federated import ClientData
from fedapps.data.registry import DataError
from fedapps.protocol.messages import config_record, error_summary, model_shape
from fedapps.protocol.node import device_name, reply, setup

log = logging.getLogger(__name__)

NODE_WAIT_S = 300.0
ROSTER = "clients.json"  # partition -> node -> device, in the results folder

# A method's extra set-up on each client; what it returns reaches the server as ``info``.
SetupHook = Callable[[RunConfig, int, ClientData, torch.device], ConfigRecord]


class ClientFailure(RuntimeError):
    """Clients answered a set-up message with errors; names each client and its error."""


def discover_clients(grid: Grid, config: RunConfig, expected: int) -> dict[int, dict[str, Any]]:
    """Ask every node who it is: ``{partition id: {node, device, num-examples, num-val, info}}``.

    With simulated partitions any failure stops the run (it is a bug in the config). With
    ``dataset = "devices"`` a device whose data cannot be used (unreadable, another input shape
    or class count, too few samples) is left out, named in a warning, and the run goes on with
    the others, as long as ``min-replies`` of them are usable.
    """
    deadline = time.monotonic() + NODE_WAIT_S
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise ClientFailure(
                f"only {len(nodes)} of {expected} SuperNodes connected after {NODE_WAIT_S:.0f}s"
            )
        time.sleep(0.5)
    messages = [
        Message(
            content=RecordDict({"config": config_record(config)}),
            message_type=MessageType.QUERY,
            dst_node_id=n,
        )
        for n in nodes
    ]
    # Set-up (and local-best training) is not a round: it gets the generous start-up wait.
    replies = list(grid.send_and_receive(messages, timeout=max(NODE_WAIT_S, config.round_timeout)))
    clients, problems = _usable_clients(replies, model_shape(config))
    missing = sorted(set(range(expected)) - set(clients))
    if config.dataset != "devices":
        if problems:
            raise ClientFailure("clients failed to start: " + "; ".join(problems))
        if missing:
            raise ClientFailure(f"no node answered for partition(s) {missing}")
        return clients
    for problem in problems:
        log.warning("left out of the run: %s", problem)
    if missing:
        log.warning("no usable device for partition(s) %s", missing)
    if len(clients) < max(1, config.min_replies):
        raise ClientFailure(f"{len(clients)} usable devices < min-replies={config.min_replies}: "
                            + "; ".join(problems))
    return clients


def write_roster(clients: Mapping[int, Mapping[str, Any]], path: Path) -> None:
    """Which node and device each partition is, for following a fleet's logs, and the priority
    its ClientApp runs at (niceness: 0 is everyone else's) (``clients.json``)."""
    path.write_text(json.dumps({str(pid): {"node": int(client["node"]), "device": client["device"],
                                           "num-examples": client["num-examples"],
                                           "niceness": client["niceness"]}
                                for pid, client in sorted(clients.items())}, indent=1))


def client_label(pid: int, node: int, device: str = "") -> str:
    """How logs name a client: its partition, its device (if it has a name) and its node."""
    return f"client {pid} (" + (f"device '{device}', " if device else "") + f"node {node})"


def _usable_clients(
    replies: list[Message], shape: tuple[tuple[int, ...], int]
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """The answers whose data fits the run's models, by partition id, and what is wrong with
    the others (each naming the client)."""
    input_shape, num_classes = shape
    clients: dict[int, dict[str, Any]] = {}
    problems = []
    for answer in replies:
        node = answer.metadata.src_node_id
        if answer.has_error():
            problems.append(f"node {node}: {error_summary(answer.error.reason)}")
            continue
        metrics, about = answer.content["metrics"], answer.content["node"]
        pid, device = int(metrics["partition-id"]), str(about["device"])
        theirs = (tuple(about["input-shape"]), int(about["num-classes"]))
        if theirs != (tuple(input_shape), num_classes):
            problems.append(
                f"{client_label(pid, node, device)}: its data has shape {theirs[0]} and "
                f"{theirs[1]} classes; the run's models take {tuple(input_shape)} and "
                f"{num_classes}"
            )
            continue
        if pid in clients:
            raise ClientFailure(f"two nodes claim partition-id={pid}; check their node config")
        clients[pid] = {
            "node": node,
            "device": device,
            "niceness": int(about.get("niceness", 0)),
            "num-examples": int(metrics["num-examples"]),
            "num-val": int(metrics.get("num-val", 0)),
            "info": answer.content["info"],
        }
    return clients, problems


def describe(msg: Message, context: Context, hooks: Mapping[str, SetupHook]) -> Message:
    """Query: who am I, what data, and what the run's method adds (``hooks[method]``).

    A data or config error comes back naming this node (its device name and partition from the
    node config), so the server's log says which device to fix.
    """
    try:
        config, pid, data, device = setup(msg, context)
    except (DataError, KeyError, ValueError) as error:
        reason = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise DataError(f"{_node_identity(context)}: {reason}") from None
    hook = hooks.get(config.method)
    info = hook(config, pid, data, device) if hook else ConfigRecord()
    about = ConfigRecord({"device": device_name(context),
                          "input-shape": list(data.train.x.shape[1:]),
                          "num-classes": model_shape(config)[1],
                          "niceness": os.nice(0)})  # a client niced by its runtime crawls
    return reply(msg, {"partition-id": pid, "num-examples": len(data.train),
                       "num-val": len(data.val)}, info=info, node=about)


def _node_identity(context: Context) -> str:
    """The node as its node config names it (the error itself names any file)."""
    node, name = context.node_config, device_name(context)
    parts = [f"device '{name}'" if name else "",
             f"partition-id={node['partition-id']}" if "partition-id" in node else ""]
    return " ".join(part for part in parts if part) or "this node"
