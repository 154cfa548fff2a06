"""The synchronous ("conventional") scheme the asynchronous one is measured against.

First (the paper's first step, unless ``distill.initial-forward-distill = 0``) the initial global
model is forward-distilled into the first small model. Then each round, in one ServerApp: (1)
from round 2 on, forward-distil the global model into the small model (every
``distill.forward-distill-every`` rounds; 0 = never, the "sync without forward distillation"
variant), (2) clients train the small model, (3) FedAvg, (4) reverse-distil the averaged small
model into the global model. Clients idle during (1) and (4); the server idles during (2).
Same models, data, seeds and distillation code as the asynchronous scheme. With
``distill.time-budget-s`` it starts no round and no reverse pass once the budget is spent, and
a reverse pass running then is cut there, as the asynchronous servers do.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord

from fedapps.methods.distill.averaging import fedavg_rounds
from fedapps.methods.distill.budget import TimeBudget, stopped_by
from fedapps.methods.distill.distillation import (
    GLOBAL_LOG,
    Distiller,
    global_summary,
    initial_distilled_state,
    log_for,
    read_log,
    reverse_pass,
)


def run_sync_distill(grid, config, clients, recorder) -> dict[str, Any]:
    distiller = Distiller(config)
    initial = ArrayRecord(initial_distilled_state(config, distiller))
    log = log_for(config, recorder.folder / GLOBAL_LOG, time.time() - recorder.elapsed())
    budget = TimeBudget(config.time_budget_s, log.begin(distiller.model, 0, 0))
    every = config.forward_distill_every
    rounds_done = 0

    def forward(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        # round 1's forward distillation is the initial one (distill.initial-forward-distill)
        if not every or server_round == 1 or (server_round - 1) % every:
            return arrays
        started = log.now()
        state = distiller.forward(arrays.to_torch_state_dict(), server_round)
        log.log_pass("forward", server_round - 1, server_round - 1, started)
        return ArrayRecord(state)

    def reverse(server_round: int, arrays: ArrayRecord | None, info: dict[str, Any]) -> None:
        nonlocal rounds_done
        rounds_done = server_round
        # a skipped round leaves the global model as it is; so does a spent budget (the model
        # at the budget's end is the one it rests in now)
        if arrays is not None and not budget.spent():
            reverse_pass(distiller, log, arrays.to_torch_state_dict(), server_round,
                         server_round, budget)
            log.settle(distiller.model, server_round, server_round)  # clients train now

    fedavg_rounds(grid, config, clients, recorder, initial, forward, reverse, stop=budget.spent)
    log.finish(distiller.model, rounds_done, rounds_done)
    tested = log.test_snapshots(distiller)
    return {"averaging-rounds": rounds_done,
            "stopped-by": stopped_by(rounds_done, config.num_rounds), **tested,
            **global_summary(read_log(log.path), config.target_accuracy)}
