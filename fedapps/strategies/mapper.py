"""MAPPER (Mansour et al., 2020): model interpolation between a local and the global model.

As the FedMe paper describes it: clients learn the global model and a local model and take a
weighted average of their PARAMETERS, v_i = lambda_i w_local,i + (1 - lambda_i) w_global.
Per round a client (client side: :func:`fedapps.baselines_client.mapper_round`)
1. fits w_local,i and lambda_i jointly by SGD on the loss of the mixed model v_i, with the
   received global model held fixed (lambda_i = sigmoid of a free parameter, so it stays in
   [0, 1]; starts at ``mapper-lambda-init`` = 0.5);
2. trains a copy of the global model for ``local-epochs`` (the FedAvg part), which the server
   averages weighted by train-set size.
Choices where Mansour et al. leave room: the local model starts as a copy of the initial global
model (averaging the parameters of two independently initialised networks would be meaningless);
both parts use the same SGD settings and E. Evaluated model: v_i of the last round; the FedMe paper
does not fine-tune MAPPER, so the reported accuracy is before fine-tuning.
"""

from __future__ import annotations

from typing import Any

from fedapps.strategies.personal import run_shared_and_personal


def run_mapper(grid, config, clients, recorder) -> dict[str, Any]:
    summary = run_shared_and_personal(grid, config, clients, recorder, "mapper")
    return {**summary, "reported": "before-finetune"}
