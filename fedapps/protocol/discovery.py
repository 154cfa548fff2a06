"""The start of every run, both halves: the server asks each node who it is.

Server: :func:`discover_clients` waits for the nodes, sends each the run config and maps partition
ids to node ids. Client: :func:`describe` answers with its partition id and data sizes, plus what
the method's set-up hook adds (FedMe's local-best candidates).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedapps.config import RunConfig
from fedapps.data.federated import ClientData
from fedapps.protocol.messages import config_record, error_summary
from fedapps.protocol.node import reply, setup

NODE_WAIT_S = 300.0

# A method's extra set-up on each client; what it returns reaches the server as ``info``.
SetupHook = Callable[[RunConfig, int, ClientData, torch.device], ConfigRecord]


class ClientFailure(RuntimeError):
    """Clients answered a set-up message with errors; names each client and its error."""


def discover_clients(grid: Grid, config: RunConfig, expected: int) -> dict[int, dict[str, Any]]:
    """Ask every node who it is: ``{partition id: {node, num-examples, num-val, info}}``."""
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
    errors = [f"node {r.metadata.src_node_id}: {error_summary(r.error.reason)}"
              for r in replies if r.has_error()]
    if errors:
        raise ClientFailure("clients failed to start: " + "; ".join(errors))
    clients: dict[int, dict[str, Any]] = {}
    for answer in replies:
        metrics = answer.content["metrics"]
        pid = int(metrics["partition-id"])
        if pid in clients:
            raise ClientFailure(f"two nodes claim partition-id={pid}; check their node config")
        clients[pid] = {
            "node": answer.metadata.src_node_id,
            "num-examples": int(metrics["num-examples"]),
            "num-val": int(metrics.get("num-val", 0)),
            "info": answer.content["info"],
        }
    missing = sorted(set(range(expected)) - set(clients))
    if missing:
        raise ClientFailure(f"no node answered for partition(s) {missing}")
    return clients


def describe(msg: Message, context: Context, hooks: Mapping[str, SetupHook]) -> Message:
    """Query: who am I, how much data, and what the run's method adds (``hooks[method]``)."""
    config, pid, data, device = setup(msg, context)
    hook = hooks.get(config.method)
    info = hook(config, pid, data, device) if hook else ConfigRecord()
    return reply(msg, {"partition-id": pid, "num-examples": len(data.train),
                       "num-val": len(data.val)}, info=info)
