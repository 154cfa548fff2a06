"""Local-only baseline: each client trains alone (early stopping on its validation split)."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid

from fedapps import training
from fedapps.config import RunConfig
from fedapps.protocol.evaluation import final_evaluation
from fedapps.protocol.messages import new_model
from fedapps.protocol.method import Method
from fedapps.protocol.node import eval_metrics, generator, optim_of, reply, setup
from fedapps.protocol.results import RunRecorder


def run_local(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
              recorder: RunRecorder) -> dict[str, Any]:
    """No rounds: the end-of-run evaluation asks every client to train alone."""
    return final_evaluation(grid, config, clients, None)


def train_local(msg: Message, context: Context) -> Message:
    """Train alone for ``num-rounds * local-epochs`` epochs, keep the best validation loss."""
    config, pid, data, device = setup(msg, context)
    torch.manual_seed(config.seed + pid)
    model = new_model(config.model, config)
    best_loss, best_state = float("inf"), None
    rng = generator(config, "local", pid)
    for _ in range(config.num_rounds * config.local_epochs):
        training.train(model, data.train.x, data.train.y, 1, optim_of(config), rng, device)
        loss = training.evaluate(model, data.val.x, data.val.y, device).loss
        if best_state is None or loss < best_loss:
            best_loss = loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    result = training.evaluate(model, data.test.x, data.test.y, device)
    return reply(msg, {"partition-id": pid, "num-examples": result.num_examples,
                       "val-loss": best_loss, **eval_metrics("after", result),
                       **eval_metrics("before", result)})


METHOD = Method(run=run_local, handlers={("train", "local"): train_local})
