"""The ClientApp: every method's client half, one handler per Flower message type.

``client_app.py`` exposes :func:`build_client_app`; the handlers live with their methods
(``fedapps/methods/``) and :data:`fedapps.registry.METHODS` lists them.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedapps.protocol import discovery
from fedapps.registry import client_handlers, setup_hooks

HOOKS = setup_hooks()


def describe(msg: Message, context: Context) -> Message:
    """Set-up query: who this node is, plus what the run's method adds."""
    return discovery.describe(msg, context, HOOKS)


HANDLERS = {("query", ""): describe, **client_handlers()}


def build_client_app() -> ClientApp:
    """The ClientApp with one handler per message type."""
    app = ClientApp()
    for (kind, action), handler in HANDLERS.items():
        register = getattr(app, kind)
        (register(action) if action else register())(handler)
    return app
