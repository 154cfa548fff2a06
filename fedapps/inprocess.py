"""Run a server in this process, its messages answered by the client handlers directly.

No Flower runtime (no Ray, no SuperLink): the same :func:`fedapps.server.run`, the same
strategies and the same client handlers, one client after another. Benchmarks use it to
measure Flower's overhead and to run many accuracy runs side by side, one process per core.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedapps import server
from fedapps.client import ANSWERS
from fedapps.config import RunConfig, app_defaults


class InProcessGrid:
    """The part of Flower's Grid the strategies use, answered by calling the handlers directly."""

    def __init__(self, num_nodes: int,
                 node_configs: Sequence[Mapping[str, Any]] | None = None,
                 first_node_id: int = 1) -> None:
        """``num_nodes`` simulated nodes (partition-id i), or one node per ``node_configs``
        entry, e.g. devices with their own data: ``{"data-path": "devices/device-000.npz"}``.
        Node ids count from ``first_node_id``: a restarted deployment's nodes get new ids."""
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        if node_configs is None:
            node_configs = [{"partition-id": i, "num-partitions": num_nodes}
                            for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config=dict(node_config))
            for node, node_config in enumerate(node_configs, start=first_node_id)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None):
        replies = []
        for message in messages:
            # Flower serializes each message: a client must not change what another receives
            # (Flower's own SecAgg+ sends one record to every node and its mod edits it).
            message.content = copy.deepcopy(message.content)
            kind, _, action = message.metadata.message_type.partition(".")
            answer = ANSWERS[(kind, action)]
            try:
                replies.append(answer(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as error:  # as Flower does: the client's error becomes its reply
                reason = f"{type(error).__name__}: {error}"
                replies.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason),
                                       reply_to=message))
        return replies


def run_in_process(settings: Mapping[str, Any],
                   node_configs: Sequence[Mapping[str, Any]] | None = None,
                   first_node_id: int = 1) -> Path:
    """The app defaults with ``settings`` on top, run without Flower; returns the results folder.
    ``node_configs``: one per node (default: ``num-clients`` simulated partitions)."""
    values = {**app_defaults(), **settings}
    config = RunConfig.from_mapping(values)
    grid = InProcessGrid(config.num_clients, node_configs, first_node_id)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=values)
    return server.run(grid, context)
