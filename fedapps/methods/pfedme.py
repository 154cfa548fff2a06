"""pFedMe (Dinh et al., NeurIPS 2020): personalization through Moreau envelopes.

Client i keeps a local model w_i and computes a personalized model theta_i that minimises
f_i(theta; D) + lambda/2 ||theta - w_i||^2 (client side: :func:`fedapps.baselines_client.
train_pfedme`); the server averages the local models w_i and mixes the average into the global
model: w <- (1 - beta) w + beta * avg_i(w_i). Choices, following the FedMe paper where it speaks:

- Local rounds R: one per minibatch of ``local-epochs`` passes over the train split (the FedMe
  paper's E = 2 epochs for every method; pFedMe's R = 20 is tied to its tiny data sets), each with
  ``pfedme.inner-steps`` (K = 5, pFedMe's value) plain gradient steps on theta with
  ``pfedme.personal-lr``; the local-model step uses ``lr`` with momentum 0.9 and weight decay
  (the FedMe paper's SGD for every method; pFedMe's own update has no momentum).
- lambda = 15 (``pfedme.lambda``, pFedMe's MNIST value) and beta = 1 (``pfedme.beta``; pFedMe
  reports 1 and 2).
- Averaging weighted by train-set size (as pFedMe's code and FedAvg).
- Evaluated model: the PERSONALIZED theta_i from the client's last local round, not the local
  or global w (the authors' reference code tests the wrong model). The FedMe paper does not
  fine-tune pFedMe (its personal step plays that role), so the reported accuracy is before
  fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Context, Message
from flwr.serverapp import Grid
from torch import nn

from fedapps.config import RunConfig
from fedapps.methods.personal import personal_reply, run_shared_and_personal
from fedapps.protocol.messages import from_arrays
from fedapps.protocol.method import Method
from fedapps.protocol.node import generator, injected_fault, optim_of, setup
from fedapps.protocol.results import RunRecorder
from fedapps.training import Optim, batches


def run_pfedme(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
               recorder: RunRecorder) -> dict[str, Any]:
    summary = run_shared_and_personal(grid, config, clients, recorder, "pfedme",
                                      mix=config.pfedme_beta)
    return {**summary, "reported": "before-finetune"}


# ------------------------------------------------------------------ client half


def train_pfedme(local: nn.Module, personal: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 epochs: int, optim: Optim, rng: torch.Generator, device: torch.device,
                 lam: float, inner_steps: int, personal_lr: float) -> float:
    """pFedMe (Dinh et al.) local rounds: one per minibatch of ``epochs`` passes.

    Per minibatch D: ``inner_steps`` gradient steps (lr ``personal_lr``) on the Moreau-envelope
    problem  f(theta; D) + lam/2 ||theta - w||^2  give the personalized theta, then the local
    model takes an SGD step along the envelope's gradient lam * (w - theta) (pFedMe's update
    w <- w - lr * lam * (w - theta), here with the momentum and weight decay the FedMe paper uses
    for every method; without momentum w learns ~10x slower than FedAvg's model). ``personal``
    (theta) starts at w and carries over between minibatches, as in the authors' code. Returns
    the last epoch's mean personalized loss f(theta; D).
    """
    local.to(device).train()
    personal.to(device).train()
    inner = torch.optim.SGD(personal.parameters(), lr=personal_lr)
    outer = optim.sgd(local)
    anchor = list(local.parameters())
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in batches(x, y, optim.batch_size, rng):
            xb, yb = xb.to(device), yb.to(device)
            for _ in range(inner_steps):
                fit = F.cross_entropy(personal(xb), yb)
                prox = sum(((p - w.detach()) ** 2).sum()
                           for p, w in zip(personal.parameters(), anchor, strict=True))
                optim.step(personal, inner, fit + lam / 2 * prox)
            with torch.no_grad():
                for w, theta in zip(anchor, personal.parameters(), strict=True):
                    w.grad = lam * (w - theta)
            outer.step()
            total, count = total + fit.item() * len(yb), count + len(yb)
        last = total / max(count, 1)
    return last


def pfedme_round(msg: Message, context: Context) -> Message:
    """pFedMe client: returns the local model w (averaged) and the personalized theta (tested)."""
    config, pid, data, device = setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    fault = injected_fault(config, pid, server_round)
    local = from_arrays(config.model, msg.content["arrays"], config)
    personal = from_arrays(config.model, msg.content["arrays"], config)
    loss = train_pfedme(local, personal, data.train.x, data.train.y, config.local_epochs,
                        optim_of(config), generator(config, "pfedme", server_round, pid), device,
                        config.pfedme_lambda, config.pfedme_inner_steps, config.pfedme_personal_lr)
    return personal_reply(msg, pid, data, device, shared=local, personal=personal,
                           metrics={"train-loss": loss}, fault=fault)


METHOD = Method(run=run_pfedme, handlers={("train", "pfedme"): pfedme_round})
