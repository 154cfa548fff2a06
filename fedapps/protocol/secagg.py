"""Secure aggregation with Flower's SecAgg+ (docs/privacy.md): the server learns only the sum.

Flower 1.41 ships SecAgg+ for its legacy strategy API only: ``SecAggPlusWorkflow`` runs its four
stages (keys, key shares, masked vectors, unmasking) through ``grid.send_and_receive``, but takes
a ``LegacyContext`` whose legacy strategy builds the ``FitIns`` (``configure_fit``) and receives
the unmasked average (``aggregate_fit``); its client half, ``secaggplus_mod``, reads and writes
the legacy ``FitIns``/``FitRes`` record layout. This module meets our round engine at the grid:

- server: :class:`SecAggPlusGrid` wraps the run's grid; a FedAvg train phase (plain ``train``
  messages) sent through it runs Flower's workflow instead of one exchange. Its legacy strategy
  (:class:`LegacyRound`) turns our messages into ``FitIns`` and the unmasked average into one
  reply per client with that client's metrics and the average, as the workflow itself hands the
  average to a legacy strategy (every ``FitRes`` carries it). FedAvg then averages identical
  arrays; screening, central noise and the distillation hooks work as without SecAgg+.
- client: :func:`secaggplus_train_mod` runs Flower's ``secaggplus_mod`` on SecAgg+ messages; in
  the masked-vector stage :func:`legacy_train_mod` turns the ``FitIns`` into our train message
  and our reply into a ``FitRes``, so the train handler and the privacy mod run unchanged.

Quantization is Flower's: every parameter clipped to [-8, 8] and mapped to 2^22 levels, so the
average differs from plain FedAvg's by about 1e-6 per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedapps.config import RunConfig
from fedapps.protocol.messages import run_config_of

FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"  # Flower's legacy layout
ARRAY_NAMES = "fedapps-array-names"  # legacy Parameters lose the names; they travel here


def secagg_weight(config: RunConfig, num_examples: int) -> int:
    """The weight of a client's model in the secure sum: its sample count, as FedAvg; 1 under
    central DP, whose noise assumes a uniform average."""
    return 1 if config.privacy_mode == "central" else num_examples


# ---------------------------------------------------------------------------- server half


class LegacyRound:
    """The legacy strategy ``SecAggPlusWorkflow`` calls for one round: ``FitIns`` from our train
    messages, and our replies from its unmasked average."""

    def __init__(self, messages: list[Message], grid: Grid) -> None:
        self.by_node = {message.metadata.dst_node_id: message for message in messages}
        self.grid = grid
        self.replies: list[Message] = []

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[GridClientProxy, FitIns]]:
        return [(GridClientProxy(node, self.grid, run_id=0), fit_instructions(message))
                for node, message in self.by_node.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[GridClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[None, dict]:
        """Every result carries the unmasked average; each becomes its client's reply."""
        if not results:
            return None, {}
        template = next(iter(self.by_node.values())).content["arrays"]
        average = named_arrays(template, parameters_to_ndarrays(results[0][1].parameters))
        for proxy, result in results:
            content = RecordDict({"arrays": average, "metrics": MetricRecord(result.metrics)})
            self.replies.append(Message(content, reply_to=self.by_node[proxy.node_id]))
        return None, {}  # None: the workflow keeps no model of its own


def fit_instructions(message: Message) -> FitIns:
    arrays = message.content["arrays"]
    config = {**message.content["config"], ARRAY_NAMES: ",".join(arrays)}
    return FitIns(ndarrays_to_parameters(arrays.to_numpy_ndarrays()), config)


def named_arrays(template: ArrayRecord, arrays: list[np.ndarray]) -> ArrayRecord:
    """``arrays`` (in the order of ``template``) with its names and dtypes: SecAgg+ dequantizes
    to float64."""
    return ArrayRecord({name: Array(np.asarray(array, dtype=like.numpy().dtype))
                        for (name, like), array in zip(template.items(), arrays)})


class SecAggPlusGrid:
    """The run's grid, except that a FedAvg train phase runs Flower's SecAgg+ workflow."""

    def __init__(self, grid: Grid, config: RunConfig, max_weight: float) -> None:
        self.grid = grid
        self.workflow = SecAggPlusWorkflow(
            config.privacy_secagg_shares, config.privacy_secagg_threshold,
            max_weight=max_weight, timeout=config.round_timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message],
                         timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        return self.secure_round(messages)

    def secure_round(self, messages: list[Message]) -> list[Message]:
        """One train phase through ``SecAggPlusWorkflow``; the replies of the clients whose
        masked models were summed (none when the protocol halted: too few clients left)."""
        legacy = LegacyRound(messages, self.grid)
        server_round = int(messages[0].content["config"]["server-round"])
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}), strategy=legacy)
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND:
                                                           server_round})
        context.state[MAIN_PARAMS_RECORD] = messages[0].content["arrays"]
        self.workflow(self.grid, context)
        return legacy.replies


def secure_grid(grid: Grid, config: RunConfig, clients: Mapping[int, Mapping[str, Any]]) -> Grid:
    """``grid`` itself, or with ``privacy.secagg = 1`` the SecAgg+ grid sized for the clients'
    weights (larger weights than ``max_weight`` would overflow the masked sum)."""
    if not config.privacy_secagg:
        return grid
    weights = [secagg_weight(config, int(info["num-examples"])) for info in clients.values()]
    return SecAggPlusGrid(grid, config, max_weight=max(weights, default=1))


# ---------------------------------------------------------------------------- client half


def secaggplus_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round; others pass."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, call_next)


def legacy_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The masked-vector stage's legacy ``FitIns`` as our train message, and our reply as the
    ``FitRes`` ``secaggplus_mod`` masks; other messages pass."""
    if FITINS_ARRAYS not in msg.content.array_records:
        return call_next(msg, context)
    config = dict(msg.content[FITINS_CONFIG])
    names = str(config.pop(ARRAY_NAMES)).split(",")
    arrays = parameters_to_ndarrays(arrayrecord_to_parameters(msg.content[FITINS_ARRAYS],
                                                              keep_input=True))
    msg.content = RecordDict({
        "arrays": ArrayRecord({name: Array(array) for name, array in zip(names, arrays)}),
        "config": ConfigRecord(config),
    })
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    metrics = reply.content["metrics"]
    weight = secagg_weight(run_config_of(msg.content), int(metrics["num-examples"]))
    parameters = ndarrays_to_parameters(reply.content["arrays"].to_numpy_ndarrays())
    reply.content = fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), parameters, weight, dict(metrics)), keep_input=False)
    return reply
