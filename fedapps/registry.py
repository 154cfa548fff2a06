"""Every method a run can name (config key ``method``), read by both the ServerApp and the
ClientApp. Adding a method: give it a home in ``fedapps/methods/`` that builds a
:class:`fedapps.protocol.method.Method`, add one line here and its config section in
``fedapps/config.py`` (docs/architecture.md shows an example)."""

from __future__ import annotations

from fedapps.methods import (
    centralized,
    distill,
    fedavg,
    fedme,
    fml,
    hypcluster,
    local,
    mapper,
    pfedme,
)
from fedapps.protocol.discovery import SetupHook
from fedapps.protocol.evaluation import HANDLERS as EVALUATION
from fedapps.protocol.method import Handler, Method

METHODS: dict[str, Method] = {
    "fedme": fedme.METHOD,
    "fedavg": fedavg.METHOD,
    "local": local.METHOD,
    "async-distill": distill.ASYNC_DISTILL,
    "async-averaging": distill.ASYNC_AVERAGING,
    "async-distillation": distill.ASYNC_DISTILLATION,
    "sync-distill": distill.SYNC_DISTILL,
    # the FedMe paper's other baselines (docs/comparison.md)
    "hypcluster": hypcluster.METHOD,
    "fml": fml.METHOD,
    "pfedme": pfedme.METHOD,
    "mapper": mapper.METHOD,
    "centralized": centralized.METHOD,
}


def client_handlers() -> dict[tuple[str, str], Handler]:
    """One handler per message type over all methods; two methods may share a handler (the
    distillation schemes use FedAvg's), never give one message type two."""
    handlers: dict[tuple[str, str], Handler] = dict(EVALUATION)
    for name, method in METHODS.items():
        for message_type, handler in method.handlers.items():
            if handlers.setdefault(message_type, handler) is not handler:
                raise ValueError(f"method '{name}' redefines message type {message_type}")
    return handlers


def setup_hooks() -> dict[str, SetupHook]:
    return {name: method.setup for name, method in METHODS.items() if method.setup}
