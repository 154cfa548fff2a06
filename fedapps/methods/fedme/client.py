"""FedMe's client half: the local-best set-up and the deep-mutual-learning round."""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, Context, Message

from fedapps import training, tuning
from fedapps.config import RunConfig
from fedapps.data.federated import ClientData
from fedapps.protocol.messages import from_arrays, new_model
from fedapps.protocol.node import generator, injected_fault, optim_of, outgoing, reply, setup


def local_best(config: RunConfig, pid: int, data: ClientData, device: torch.device) -> ConfigRecord:
    """Set-up (``fedme.init-arch = local-best``): every candidate trained alone with early stopping.

    The paper's choice (:func:`fedapps.tuning.choose_local_best`); the server may pool the
    figures of all clients. It takes minutes on real data, so each candidate prints progress.
    """
    if config.init_arch != "local-best":
        return ConfigRecord()
    started = time.perf_counter()

    def build(name: str) -> torch.nn.Module:
        torch.manual_seed(config.seed)
        return new_model(name, config)

    def progress(line: str) -> None:
        print(f"fedapps: client {pid} local-best {line} "
              f"(t={time.perf_counter() - started:.1f}s)", flush=True)

    arch, results = tuning.choose_local_best(
        config.candidates, build, data.train, data.val, config.local_best_epochs,
        config.local_best_patience, optim_of(config),
        lambda name: generator(config, "local-best", pid, name), device, progress,
    )
    progress(f"chose {arch}")
    return ConfigRecord({
        "candidates": [r.name for r in results],
        "val-accuracy": [r.accuracy for r in results],
        "val-loss": [r.loss for r in results],
        "best-epoch": [r.best_epoch for r in results],
    })


def train_mutual(msg: Message, context: Context) -> Message:
    """FedMe client round: deep mutual learning, then the adoption decision on validation.

    ``fedme.adoption-rule`` (:class:`fedapps.tuning.AdoptionRule`; the paper: strictly lower
    validation loss). The decision is made on this client's DML-trained copy; the server then
    hands the client the AGGREGATED version of the chosen model (paper's rule, made explicit).
    """
    config, pid, data, device = setup(msg, context)
    info = msg.content["fedme"]
    server_round = int(info["server-round"])
    fault = injected_fault(config, pid, server_round)
    personal = from_arrays(str(info["personal-arch"]), msg.content["personal"], config)
    exchange = from_arrays(str(info["exchange-arch"]), msg.content["exchange"], config)
    started = time.perf_counter()
    loss_p, loss_ex = training.train_mutual(
        personal, exchange, data.train.x, data.train.y, config.local_epochs, optim_of(config),
        generator(config, "mutual", server_round, pid), device,
        config.dml_temperature, config.dml_kl_weight,
    )
    val_p = training.evaluate(personal, data.val.x, data.val.y, device)
    val_ex = training.evaluate(exchange, data.val.x, data.val.y, device)
    rule = tuning.AdoptionRule.of(config)
    same_arch = str(info["personal-arch"]) == str(info["exchange-arch"])
    adopt = rule.adopt(val_p, val_ex, same_arch, server_round)
    return reply(
        msg,
        {
            "partition-id": pid,
            "num-examples": len(data.train),
            "train-loss": loss_p,
            "exchange-train-loss": loss_ex,
            "val-loss": val_p.loss,
            "exchange-val-loss": val_ex.loss,
            "val-accuracy": val_p.accuracy,
            "exchange-val-accuracy": val_ex.accuracy,
            "adopted": int(adopt),
            "train-s": time.perf_counter() - started,
        },
        personal=outgoing(personal, fault),
        exchange=outgoing(exchange, fault),
    )
