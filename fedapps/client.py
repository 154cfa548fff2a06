"""The ClientApp: every method's client half, one handler per Flower message type.

``client_app.py`` exposes :func:`build_client_app`; the handlers live with their methods
(``fedapps/methods/``) and :data:`fedapps.registry.METHODS` lists them. Every train reply passes
the privacy mods (docs/privacy.md): SecAgg+ masking, its legacy message layout, and the
differential-privacy clipping and noise, each a no-op unless the run asks for it.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedapps.protocol import discovery
from fedapps.protocol.dp import privacy_mod
from fedapps.protocol.secagg import legacy_train_mod, secaggplus_train_mod
from fedapps.registry import client_handlers, setup_hooks

HOOKS = setup_hooks()


def describe(msg: Message, context: Context) -> Message:
    """Set-up query: who this node is, plus what the run's method adds."""
    return discovery.describe(msg, context, HOOKS)


HANDLERS = {("query", ""): describe, **client_handlers()}
# Outermost first: SecAgg+ must mask the reply the privacy mod has clipped (and noised).
MODS: dict[str, list[Mod]] = {"train": [secaggplus_train_mod, legacy_train_mod, privacy_mod]}
# What answers each message type: the handler inside its kind's mods (the in-process grid
# calls these too, so benchmarks run the same client code as Flower).
ANSWERS: dict[tuple[str, str], ClientAppCallable] = {
    (kind, action): make_ffn(handler, MODS.get(kind, []))
    for (kind, action), handler in HANDLERS.items()
}


def build_client_app() -> ClientApp:
    """The ClientApp with one answer per message type."""
    app = ClientApp()
    for (kind, action), answer in ANSWERS.items():
        register = getattr(app, kind)
        (register(action) if action else register())(answer)
    return app
