"""The synchronous ("conventional") scheme the asynchronous one is measured against.

Each round, in one ServerApp: (1) forward-distil the global model into the small model (every
``forward-distill-every`` rounds; 0 = never, the "sync without forward distillation" variant),
(2) clients train the small model, (3) FedAvg, (4) reverse-distil the averaged small model into
the global model and test it. Clients idle during (1) and (4); the server idles during (2).
Same models, data, seeds and distillation code as the asynchronous scheme.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedapps.distill.averaging import fedavg_rounds
from fedapps.distill.distillation import (
    GLOBAL_LOG,
    Distiller,
    GlobalLog,
    global_summary,
    initial_small_state,
    read_log,
)


def run_sync_distill(grid, config, clients, recorder) -> dict[str, Any]:
    distiller = Distiller(config)
    log = GlobalLog(recorder.folder / GLOBAL_LOG, time.time() - recorder.elapsed())
    log.log(0, distiller.evaluate(), passes=0)
    every = config.forward_distill_every

    def forward(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        if every and (server_round - 1) % every == 0:
            return ArrayRecord(distiller.forward(arrays.to_torch_state_dict(), server_round))
        return arrays

    def reverse(server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None) -> None:
        kl = distiller.reverse(arrays.to_torch_state_dict(), server_round)
        log.log(server_round, distiller.evaluate(), passes=server_round, kl=round(kl, 5))
        fields = {"train-loss": float(metrics["train-loss"])} if metrics else {}
        recorder.log_round(server_round, **fields)

    initial = ArrayRecord(initial_small_state(config))
    fedavg_rounds(grid, config, clients, initial, config.num_rounds, forward, reverse)
    return {"averaging-rounds": config.num_rounds,
            **global_summary(read_log(log.path), config.target_accuracy)}
