"""FML, Federated Mutual Learning (Shen et al., 2020): the FedMe paper's mutual-learning baseline.

Each client keeps a private local model; the server keeps one shared "meme" model. Every round
each client trains both on its train split by deep mutual learning (client side:
:func:`fedapps.baselines_client.train_fml`) and the server averages the meme models (FedAvg
weights). Choices where the papers leave room, following the FedMe paper where it says anything:

- Loss weights: FML's alpha = beta = 0.5 (``fml.alpha``, ``fml.beta``):
  L_local = a CE + (1 - a) KL(meme || local), L_meme = b CE + (1 - b) KL(local || meme).
- Both models use ``model`` (FML allows a different private architecture; one architecture
  keeps the comparison with the other baselines about the method, not the model).
- The private model starts as a copy of the initial meme model and is kept between rounds
  (relayed through the server so ClientApps stay stateless; see
  :mod:`fedapps.methods.personal`).
- Evaluated model: the private local model. The FedMe paper does not list FML among the methods
  it fine-tunes, so the reported accuracy is before fine-tuning (the after-fine-tuning figure is
  in the summary too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Context, Message
from flwr.serverapp import Grid
from torch import nn

from fedapps import training
from fedapps.config import RunConfig
from fedapps.methods.personal import personal_reply, run_shared_and_personal
from fedapps.protocol.messages import from_arrays, to_arrays
from fedapps.protocol.method import Method
from fedapps.protocol.node import generator, injected_fault, optim_of, setup
from fedapps.protocol.results import RunRecorder
from fedapps.training import Optim, batches


def run_fml(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
            recorder: RunRecorder) -> dict[str, Any]:
    summary = run_shared_and_personal(grid, config, clients, recorder, "fml")
    return {**summary, "reported": "before-finetune"}


# ------------------------------------------------------------------ client half


def train_fml(local: nn.Module, meme: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
              optim: Optim, rng: torch.Generator, device: torch.device, alpha: float,
              beta: float, temperature: float = 1.0) -> tuple[float, float]:
    """FML (Shen et al.): deep mutual learning with the paper's alpha/beta loss weights.

    L_local = alpha CE(y, local) + (1 - alpha) KL(meme || local)
    L_meme  = beta  CE(y, meme)  + (1 - beta)  KL(local || meme)   (peers detached).
    Returns the last epoch's mean losses (local, meme).
    """
    models = (local.to(device).train(), meme.to(device).train())
    optimizers = [optim.sgd(model) for model in models]
    weights = (alpha, beta)
    last = (float("nan"), float("nan"))
    for _ in range(epochs):
        totals, count = [0.0, 0.0], 0
        for xb, yb in batches(x, y, optim.batch_size, rng):
            xb, yb = xb.to(device), yb.to(device)
            logits = [model(xb) for model in models]
            trios = zip(models, optimizers, weights, strict=True)
            for slot, (model, optimizer, weight) in enumerate(trios):
                peer = logits[1 - slot].detach()
                loss = (weight * F.cross_entropy(logits[slot], yb)
                        + (1 - weight) * training.soft_kl(logits[slot], peer, temperature))
                optim.step(model, optimizer, loss)
                totals[slot] += loss.item() * len(yb)
            count += len(yb)
        last = (totals[0] / max(count, 1), totals[1] / max(count, 1))
    return last


def fml_round(msg: Message, context: Context) -> Message:
    """FML client: the private model (in ``state``) and the shared meme model learn mutually."""
    config, pid, data, device = setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    fault = injected_fault(config, pid, server_round)
    meme = from_arrays(config.model, msg.content["arrays"], config)
    state = msg.content.array_records.get("state", msg.content["arrays"])
    local = from_arrays(config.model, state, config)
    loss_local, loss_meme = train_fml(
        local, meme, data.train.x, data.train.y, config.local_epochs, optim_of(config),
        generator(config, "fml", server_round, pid), device, config.fml_alpha, config.fml_beta,
        config.dml_temperature,
    )
    return personal_reply(msg, pid, data, device, shared=meme, personal=local,
                           state=to_arrays(local), metrics={"train-loss": loss_local,
                                                            "shared-train-loss": loss_meme},
                          fault=fault)


METHOD = Method(run=run_fml, handlers={("train", "fml"): fml_round})
