"""What a method is to the rest of the package: its server half and its client half.

Each method's home (``fedapps/methods/<name>``) builds one :class:`Method`; ``fedapps/registry.py``
lists them by the name a run config gives in ``method``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid

from fedapps.config import ConfigError, RunConfig
from fedapps.data.federated import DataError, server_pool
from fedapps.protocol.discovery import SetupHook
from fedapps.protocol.results import RunRecorder

# A client half: one function per Flower message type ``(kind, action)``, e.g. ("train", "fml").
Handler = Callable[[Message, Context], Message]
# A server half: runs the method on the discovered clients; returns fields for summary.json.
MethodRunner = Callable[[Grid, RunConfig, dict[int, dict[str, Any]], RunRecorder], dict[str, Any]]
# What a method needs of the data beyond the config (clients, the server's pool): raises a
# ConfigError or DataError before Flower starts (fedapps.server.prepare).
Check = Callable[[RunConfig, int], None]


@dataclass(frozen=True)
class Method:
    run: MethodRunner
    handlers: Mapping[tuple[str, str], Handler] = field(default_factory=dict)
    setup: SetupHook | None = None  # extra set-up on each client before round 1
    check: Check | None = None  # given the run's config and its number of clients


def require_clients(method: str, needed: int, num_clients: int) -> None:
    """A method that cannot work with fewer than ``needed`` clients refuses to start."""
    if num_clients < needed:
        raise ConfigError(f"method='{method}' needs at least {needed} clients; the run has "
                          f"{num_clients} (num-clients, or the clients of the partition)")


def require_pool(config: RunConfig, use: str) -> None:
    """A method that works on the server's unlabeled pool refuses to start without one."""
    if not len(server_pool(config)[1]):
        raise DataError(f"method='{config.method}' {use} on the server's unlabeled pool, which "
                        f"is empty (unlabeled-size={config.unlabeled_size})")
