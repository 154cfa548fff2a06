"""MAPPER (Mansour et al., 2020): model interpolation between a local and the global model.

As the FedMe paper describes it: clients learn the global model and a local model and take a
weighted average of their PARAMETERS, v_i = lambda_i w_local,i + (1 - lambda_i) w_global.
Per round a client (client side: :func:`fedapps.baselines_client.mapper_round`)
1. fits w_local,i and lambda_i jointly by SGD on the loss of the mixed model v_i, with the
   received global model held fixed (lambda_i = sigmoid of a free parameter, so it stays in
   [0, 1]; starts at ``mapper.lambda-init`` = 0.5);
2. trains a copy of the global model for ``local-epochs`` (the FedAvg part), which the server
   averages weighted by train-set size.
Choices where Mansour et al. leave room: the local model starts as a copy of the initial global
model (averaging the parameters of two independently initialised networks would be meaningless);
both parts use the same SGD settings and E. Evaluated model: v_i of the last round; the FedMe paper
does not fine-tune MAPPER, so the reported accuracy is before fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid
from torch import nn
from torch.func import functional_call

from fedapps import training
from fedapps.config import RunConfig
from fedapps.methods.personal import personal_reply, run_shared_and_personal
from fedapps.protocol.messages import from_arrays
from fedapps.protocol.method import Method
from fedapps.protocol.node import generator, injected_fault, optim_of, setup
from fedapps.protocol.results import RunRecorder
from fedapps.training import Optim, batches

MAPPER_LAMBDA = "mapper.lambda-logit"  # the mixing weight travels inside the state record


def run_mapper(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
               recorder: RunRecorder) -> dict[str, Any]:
    summary = run_shared_and_personal(grid, config, clients, recorder, "mapper")
    return {**summary, "reported": "before-finetune"}


# ------------------------------------------------------------------ client half


def mixed_state(local: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
                lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """MAPPER's personalized parameters: lam * local + (1 - lam) * shared."""
    return {name: lam * local[name] + (1 - lam) * shared[name] for name in shared}


def train_mapper(template: nn.Module, local: dict[str, torch.Tensor], lam_logit: torch.Tensor,
                 shared: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, epochs: int,
                 optim: Optim, rng: torch.Generator, device: torch.device) -> float:
    """Fit the local parameters and the mixing weight (sigmoid of ``lam_logit``) jointly by SGD
    on the loss of the mixed model, with the shared parameters held fixed. Updates in place."""
    template.to(device).train()
    shared = {name: value.to(device).detach() for name, value in shared.items()}
    params = list(local.values())
    for value in [*params, lam_logit]:
        value.requires_grad_(True)
    optimizer = torch.optim.SGD(
        [{"params": params, "weight_decay": optim.weight_decay},
         {"params": [lam_logit], "weight_decay": 0.0}], lr=optim.lr, momentum=optim.momentum)
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in batches(x, y, optim.batch_size, rng):
            xb, yb = xb.to(device), yb.to(device)
            mixed = mixed_state(local, shared, torch.sigmoid(lam_logit))
            loss = F.cross_entropy(functional_call(template, mixed, (xb,)), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.clip_norm > 0:
                nn.utils.clip_grad_norm_([*params, lam_logit], optim.clip_norm)
            optimizer.step()
            total, count = total + loss.item() * len(yb), count + len(yb)
        last = total / max(count, 1)
    return last


def mapper_round(msg: Message, context: Context) -> Message:
    """MAPPER client: a FedAvg update of the shared model, then local parameters + mixing weight."""
    config, pid, data, device = setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    fault = injected_fault(config, pid, server_round)
    received = from_arrays(config.model, msg.content["arrays"], config)
    shared = {name: value.detach().clone() for name, value in received.named_parameters()}
    if "state" in msg.content.array_records:
        state = msg.content["state"].to_torch_state_dict()
        lam_logit = state.pop(MAPPER_LAMBDA).float()
        local = {name: state[name].float() for name in shared}
    else:  # round 1: the local model starts as the shared one, so parameter mixing is meaningful
        lam = torch.tensor(config.mapper_lambda_init)
        lam_logit = torch.log(lam / (1 - lam))
        local = {name: value.clone() for name, value in shared.items()}
    rng = generator(config, "mapper", server_round, pid)
    mix_loss = train_mapper(received, local, lam_logit, shared, data.train.x, data.train.y,
                            config.local_epochs, optim_of(config), rng, device)
    personal = from_arrays(config.model, msg.content["arrays"], config)  # buffers, if any
    with torch.no_grad():
        lam = torch.sigmoid(lam_logit)
        personal.load_state_dict(mixed_state(local, shared, lam), strict=False)
    global_loss = training.train(received, data.train.x, data.train.y, config.local_epochs,
                                 optim_of(config), rng, device)
    state = ArrayRecord({**{k: v.detach().cpu() for k, v in local.items()},
                         MAPPER_LAMBDA: lam_logit.detach().cpu().reshape(1)})
    return personal_reply(msg, pid, data, device, shared=received, personal=personal,
                           state=state, metrics={"train-loss": mix_loss,
                                                 "shared-train-loss": global_loss,
                                                 "lambda": float(lam)}, fault=fault)


METHOD = Method(run=run_mapper, handlers={("train", "mapper"): mapper_round})
