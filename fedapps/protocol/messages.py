"""What travels in Flower messages: models as (architecture, ArrayRecord) and the run config.

Every message carries the server's resolved run config in its ``"config"`` ConfigRecord, so a
ClientApp behaves the same under ``flwr run``, the Python simulation API and a real SuperNode.
Incoming models are checked here (names, shapes, finite values) before anyone trains on or
aggregates them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import nn

from fedapps.config import RunConfig
from fedapps.data.federated import dataset_for
from fedapps.models import build_model

CONFIG_KEY = "config"
# added to the config record by Flower's strategies (the round; central DP's clip norm)
ROUND_KEYS = ("server-round", KEY_CLIPPING_NORM)


class BadModelError(ValueError):
    """Arrays that do not fit the architecture they claim, or that hold NaN/inf."""


def config_record(config: RunConfig, **extra: int | float | str | bool) -> ConfigRecord:
    return ConfigRecord({**config.to_dict(), **extra})


def run_config_of(content: RecordDict, local: Mapping[str, str] | None = None) -> RunConfig:
    """The server's run config; ``local`` replaces keys that differ per device (file paths)."""
    items = {k: v for k, v in content[CONFIG_KEY].items() if k not in ROUND_KEYS}
    return _parse_config(tuple(sorted({**items, **(local or {})}.items())))


@functools.lru_cache(maxsize=16)
def _parse_config(items: tuple) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def model_shape(config: RunConfig) -> tuple[tuple[int, ...], int]:
    dataset = dataset_for(config.dataset, config.data_path)
    return dataset.input_shape, dataset.num_classes


def new_model(arch: str, config: RunConfig) -> nn.Module:
    return build_model(arch, *model_shape(config))


def to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def from_arrays(arch: str, arrays: ArrayRecord, config: RunConfig) -> nn.Module:
    """Build ``arch`` and load ``arrays`` into it, rejecting anything that does not fit."""
    model = new_model(arch, config)
    check_state(arch, arrays.to_torch_state_dict(), model.state_dict())
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def check_state(
    arch: str, state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> None:
    if set(state) != set(reference):
        missing, unexpected = set(reference) - set(state), set(state) - set(reference)
        raise BadModelError(
            f"arrays do not match architecture '{arch}': missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != reference[name].shape:
            raise BadModelError(
                f"arrays do not match architecture '{arch}': '{name}' has shape "
                f"{tuple(tensor.shape)}, expected {tuple(reference[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BadModelError(f"arrays for '{arch}' hold NaN or infinite values in '{name}'")


def error_summary(reason: str, limit: int = 300) -> str:
    """The last line of a client's error (Ray wraps it in a long traceback)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:limit]


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by partition id, error replies last by node id.

    Replies arrive in whatever order the clients finish; floating-point sums depend on order,
    so aggregating in a fixed one is what makes the same seed give the same run, bit for bit.
    """
    def key(reply: Message) -> tuple[int, int]:
        if reply.has_error() or "partition-id" not in reply.content.get("metrics", {}):
            return (1, int(reply.metadata.src_node_id))
        return (0, int(reply.content["metrics"]["partition-id"]))

    return sorted(replies, key=key)
