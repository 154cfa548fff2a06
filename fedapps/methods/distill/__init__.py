"""Asynchronous distillation FL (docs/async-distill.md): a distillation server holding the large
global model and an averaging server running FedAvg on the small distilled model, cooperating
through a model channel; plus the synchronous scheme they are measured against.

Server halves: :mod:`.averaging` (the averaging server and the runners), :mod:`.distillation`
(the distillation server), :mod:`.sync` (the synchronous scheme), :mod:`.channel`. Client half:
FedAvg's local update (:func:`fedapps.methods.fedavg.train_global`) on the small model.
"""

from fedapps.config import RunConfig
from fedapps.methods.distill.averaging import (
    run_async_averaging,
    run_async_distill,
    run_async_distillation,
)
from fedapps.methods.distill.distillation import server_data
from fedapps.methods.distill.sync import run_sync_distill
from fedapps.methods.fedavg import train_global
from fedapps.protocol.method import Method

CLIENT_HALF = {("train", ""): train_global}


def check_server_data(config: RunConfig, num_clients: int) -> None:
    """The distillation server splits its pool into distillation inputs and a test set."""
    server_data(config)


ASYNC_DISTILL = Method(run=run_async_distill, handlers=CLIENT_HALF, check=check_server_data)
ASYNC_AVERAGING = Method(run=run_async_averaging, handlers=CLIENT_HALF)  # the other half's pool
ASYNC_DISTILLATION = Method(run=run_async_distillation, check=check_server_data)  # no client
SYNC_DISTILL = Method(run=run_sync_distill, handlers=CLIENT_HALF, check=check_server_data)
