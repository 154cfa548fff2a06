"""Asynchronous distillation FL (docs/async-distill.md): a distillation server holding the large
global model and an averaging server running FedAvg on the small distilled model, cooperating
through a model channel; plus the synchronous scheme they are measured against.

Server halves: :mod:`.averaging` (the averaging server and the runners), :mod:`.distillation`
(the distillation server), :mod:`.sync` (the synchronous scheme), :mod:`.channel`. Client half:
FedAvg's local update (:func:`fedapps.methods.fedavg.train_global`) on the small model.
"""

from fedapps.methods.distill.averaging import (
    run_async_averaging,
    run_async_distill,
    run_async_distillation,
)
from fedapps.methods.distill.sync import run_sync_distill
from fedapps.methods.fedavg import train_global
from fedapps.protocol.method import Method

CLIENT_HALF = {("train", ""): train_global}

ASYNC_DISTILL = Method(run=run_async_distill, handlers=CLIENT_HALF)
ASYNC_AVERAGING = Method(run=run_async_averaging, handlers=CLIENT_HALF)
ASYNC_DISTILLATION = Method(run=run_async_distillation)  # trains no client
SYNC_DISTILL = Method(run=run_sync_distill, handlers=CLIENT_HALF)
