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

from fedapps.config import RunConfig
from fedapps.protocol.discovery import SetupHook
from fedapps.protocol.results import RunRecorder

# A client half: one function per Flower message type ``(kind, action)``, e.g. ("train", "fml").
Handler = Callable[[Message, Context], Message]
# A server half: runs the method on the discovered clients; returns fields for summary.json.
MethodRunner = Callable[[Grid, RunConfig, dict[int, dict[str, Any]], RunRecorder], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    run: MethodRunner
    handlers: Mapping[tuple[str, str], Handler] = field(default_factory=dict)
    setup: SetupHook | None = None  # extra set-up on each client before round 1
