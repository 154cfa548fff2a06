"""Client side of the FedMe paper's baselines: HypCluster, FML, pFedMe, MAPPER, centralized.

One handler per Flower message type (registered in :data:`fedapps.client.HANDLERS`) plus the
training loop each method needs, written as plain PyTorch on top of :mod:`fedapps.training`.
The server side and every design choice are documented in ``fedapps/strategies/<method>.py``.

FML, pFedMe and MAPPER share one message layout (see :mod:`fedapps.strategies.personal`): the
server sends the shared model in ``arrays`` and, from round 2 on, the client's own ``state``;
the client replies with its update of the shared model (``arrays``), its new ``state``, its
``personal`` model (the one evaluated) and that model's test accuracy, so the per-round curve
shows the personalized models, not the shared one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message
from torch import nn
from torch.func import functional_call

from fedapps import training
from fedapps.client import _eval_metrics, _reply, _setup, generator, optim_of
from fedapps.config import RunConfig
from fedapps.data import client_data, partition_for
from fedapps.messages import from_arrays, new_model, to_arrays
from fedapps.training import Optim, batches

MAPPER_LAMBDA = "mapper.lambda-logit"  # MAPPER's mixing weight travels inside its state record


# ------------------------------------------------------------------------------ HypCluster


def choose_model(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                 device: torch.device) -> tuple[int, list[float]]:
    """HypCluster's assignment: the model with the lowest loss on ``(x, y)`` (ties: first)."""
    losses = [training.evaluate(model, x, y, device).loss for model in models]
    return min(range(len(losses)), key=losses.__getitem__), losses


def _hypcluster_models(msg: Message, config: RunConfig) -> list[nn.Module]:
    k = int(msg.content["hypcluster"]["k"])
    return [from_arrays(config.model, msg.content[f"model-{j}"], config) for j in range(k)]


def train_hypcluster(msg: Message, context: Context) -> Message:
    """Pick the global model with the lowest loss on the local train split, train only that."""
    config, pid, data, device = _setup(msg, context)
    server_round = int(msg.content["hypcluster"]["server-round"])
    models = _hypcluster_models(msg, config)
    chosen, _ = choose_model(models, data.train.x, data.train.y, device)
    loss = training.train(models[chosen], data.train.x, data.train.y, config.local_epochs,
                          optim_of(config), generator(config, "hypcluster", server_round, pid),
                          device)
    return _reply(msg, {"partition-id": pid, "num-examples": len(data.train), "cluster": chosen,
                        "train-loss": loss}, arrays=to_arrays(models[chosen]))


def evaluate_hypcluster(msg: Message, context: Context) -> Message:
    """Test the model this client would choose now (same rule as in training)."""
    config, pid, data, device = _setup(msg, context)
    models = _hypcluster_models(msg, config)
    chosen, _ = choose_model(models, data.train.x, data.train.y, device)
    result = training.evaluate(models[chosen], data.test.x, data.test.y, device)
    return _reply(msg, {"partition-id": pid, "num-examples": result.num_examples,
                        "cluster": chosen, **_eval_metrics("test", result)})


# ------------------------------------------------------------------------------------- FML


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
    config, pid, data, device = _setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    meme = from_arrays(config.model, msg.content["arrays"], config)
    state = msg.content.array_records.get("state", msg.content["arrays"])
    local = from_arrays(config.model, state, config)
    loss_local, loss_meme = train_fml(
        local, meme, data.train.x, data.train.y, config.local_epochs, optim_of(config),
        generator(config, "fml", server_round, pid), device, config.fml_alpha, config.fml_beta,
        config.dml_temperature,
    )
    return _personal_reply(msg, pid, data, device, shared=meme, personal=local,
                           state=to_arrays(local), metrics={"train-loss": loss_local,
                                                            "shared-train-loss": loss_meme})


# ---------------------------------------------------------------------------------- pFedMe


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
    config, pid, data, device = _setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    local = from_arrays(config.model, msg.content["arrays"], config)
    personal = from_arrays(config.model, msg.content["arrays"], config)
    loss = train_pfedme(local, personal, data.train.x, data.train.y, config.local_epochs,
                        optim_of(config), generator(config, "pfedme", server_round, pid), device,
                        config.pfedme_lambda, config.pfedme_inner_steps, config.pfedme_personal_lr)
    return _personal_reply(msg, pid, data, device, shared=local, personal=personal,
                           metrics={"train-loss": loss})


# ---------------------------------------------------------------------------------- MAPPER


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
    config, pid, data, device = _setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
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
    return _personal_reply(msg, pid, data, device, shared=received, personal=personal,
                           state=state, metrics={"train-loss": mix_loss,
                                                 "shared-train-loss": global_loss,
                                                 "lambda": float(lam)})


def _personal_reply(msg: Message, pid: int, data, device: torch.device, shared: nn.Module,
                    personal: nn.Module, metrics: dict[str, float],
                    state: ArrayRecord | None = None) -> Message:
    tested = training.evaluate(personal, data.test.x, data.test.y, device)
    records = {"arrays": to_arrays(shared), "personal": to_arrays(personal)}
    if state is not None:
        records["state"] = state
    return _reply(msg, {"partition-id": pid, "num-examples": len(data.train), **metrics,
                        **_eval_metrics("test", tested)}, **records)


# ----------------------------------------------------------------------------- centralized


def train_centralized(msg: Message, context: Context) -> Message:
    """Centralized (the ideal): one node trains on every client's train split pooled.

    Runs ``num-rounds * local-epochs`` epochs (the passes over the data FedAvg makes) and keeps
    the epoch with the lowest pooled validation loss. After every ``local-epochs`` epochs ("a
    round") it reports the mean over clients of each client's test accuracy, for the curve.
    """
    config, pid, _, device = _setup(msg, context)
    parts = [client_data(config, p) for p in range(partition_for(config).num_clients)]
    train_x = torch.cat([part.train.x for part in parts])
    train_y = torch.cat([part.train.y for part in parts])
    val_x, val_y = torch.cat([p.val.x for p in parts]), torch.cat([p.val.y for p in parts])
    torch.manual_seed(config.seed)
    model = new_model(config.model, config)
    rng = generator(config, "centralized")
    best_loss, best_state, curve = float("inf"), None, []
    for epoch in range(1, config.num_rounds * config.local_epochs + 1):
        training.train(model, train_x, train_y, 1, optim_of(config), rng, device)
        loss = training.evaluate(model, val_x, val_y, device).loss
        if best_state is None or loss < best_loss:
            best_loss = loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch % max(config.local_epochs, 1) == 0:
            tests = [training.evaluate(model, p.test.x, p.test.y, device).accuracy for p in parts]
            curve.append(sum(tests) / len(tests))
    if best_state is not None:  # local-epochs=0 leaves the initial model
        model.load_state_dict(best_state)
    return _reply(msg, {"partition-id": pid, "num-examples": len(train_y), "val-loss": best_loss,
                        "round-accuracy": curve}, arrays=to_arrays(model))


HANDLERS = {
    ("train", "hypcluster"): train_hypcluster,
    ("evaluate", "hypcluster"): evaluate_hypcluster,
    ("train", "fml"): fml_round,
    ("train", "pfedme"): pfedme_round,
    ("train", "mapper"): mapper_round,
    ("train", "centralized"): train_centralized,
}
