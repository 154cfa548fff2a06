"""The ServerApp's work: resolve the config, find the clients, run a method, write results.

``server_app.py`` only hands Flower's ``grid`` and ``context`` to :func:`run`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedapps import tuning
from fedapps.config import RunConfig
from fedapps.data import dataset_for, partition_for, save_partition, unlabeled_inputs
from fedapps.distill.averaging import (
    run_async_averaging,
    run_async_distill,
    run_async_distillation,
)
from fedapps.distill.sync import run_sync_distill
from fedapps.messages import config_record, error_summary, new_model
from fedapps.results import RunRecorder, client_summary
from fedapps.rounds import run_rounds
from fedapps.strategies.centralized import run_centralized
from fedapps.strategies.fedavg import RecordedFedAvg
from fedapps.strategies.fedme import FedMe, per_client
from fedapps.strategies.fml import run_fml
from fedapps.strategies.hypcluster import run_hypcluster
from fedapps.strategies.mapper import run_mapper
from fedapps.strategies.pfedme import run_pfedme

log = logging.getLogger(__name__)

NODE_WAIT_S = 300.0


class ClientFailure(RuntimeError):
    """Clients answered a set-up message with errors; names each client and its error."""


def run(grid: Grid, context: Context, overrides: Mapping[str, Any] | None = None) -> Path:
    """Run the configured method; returns the results folder."""
    config = RunConfig.from_mapping({**context.run_config, **(overrides or {})})
    random.seed(config.seed)  # Flower's node sampling uses the random module
    dataset = dataset_for(config.dataset, config.data_path)
    partition = partition_for(config)  # bad partitions fail here, before any client works
    recorder = RunRecorder(config)
    save_partition(partition, dataset, recorder.folder / "partition.json")
    print(f"fedapps: {config.method} on {config.dataset}, {partition.num_clients} clients, "
          f"{config.num_rounds} rounds; results in {recorder.folder}", flush=True)
    clients = discover_clients(grid, config, partition.num_clients)
    summary = {"num-clients": partition.num_clients, "rounds": config.num_rounds,
               **METHODS[config.method](grid, config, clients, recorder)}
    recorder.write_summary(summary)
    after = summary.get("after-finetune")
    accuracy = (f"; accuracy {after['mean']:.4f} ± {after['sd']:.4f} over clients"
                if after else "")
    print(f"fedapps: done in {recorder.elapsed():.1f}s{accuracy}; results in {recorder.folder}",
          flush=True)
    return recorder.folder


def discover_clients(grid: Grid, config: RunConfig, expected: int) -> dict[int, dict[str, Any]]:
    """Ask every node who it is: ``{partition id: {node, num-examples, arch}}``."""
    deadline = time.monotonic() + NODE_WAIT_S
    while len(nodes := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise ClientFailure(
                f"only {len(nodes)} of {expected} SuperNodes connected after {NODE_WAIT_S:.0f}s"
            )
        time.sleep(0.5)
    messages = [
        Message(
            content=RecordDict({"config": config_record(config)}),
            message_type=MessageType.QUERY,
            dst_node_id=n,
        )
        for n in nodes
    ]
    # Set-up (and local-best training) is not a round: it gets the generous start-up wait.
    replies = list(grid.send_and_receive(messages, timeout=max(NODE_WAIT_S, config.round_timeout)))
    errors = [f"node {r.metadata.src_node_id}: {error_summary(r.error.reason)}"
              for r in replies if r.has_error()]
    if errors:
        raise ClientFailure("clients failed to start: " + "; ".join(errors))
    clients: dict[int, dict[str, Any]] = {}
    for reply in replies:
        metrics = reply.content["metrics"]
        pid = int(metrics["partition-id"])
        if pid in clients:
            raise ClientFailure(f"two nodes claim partition-id={pid}; check their node config")
        clients[pid] = {
            "node": reply.metadata.src_node_id,
            "num-examples": int(metrics["num-examples"]),
            "num-val": int(metrics.get("num-val", 0)),
            "local-best": candidate_results(reply.content["info"]),
        }
    missing = sorted(set(range(expected)) - set(clients))
    if missing:
        raise ClientFailure(f"no node answered for partition(s) {missing}")
    return clients


def candidate_results(info: ConfigRecord) -> list[tuning.CandidateResult]:
    """A client's local-best figures per candidate (empty when it trained none)."""
    if "candidates" not in info:
        return []
    return [
        tuning.CandidateResult(str(name), float(accuracy), float(loss), int(epoch))
        for name, accuracy, loss, epoch in zip(info["candidates"], info["val-accuracy"],
                                               info["val-loss"], info["best-epoch"])
    ]


def initial_architectures(config: RunConfig, clients: Mapping[int, Mapping[str, Any]]):
    """init-arch: local-best (clients chose), random (seeded), one name, or one per client."""
    pids = sorted(clients)
    if config.init_arch == "local-best":
        return tuning.pooled_choice(
            {pid: clients[pid]["local-best"] for pid in pids},
            {pid: clients[pid]["num-val"] for pid in pids}, config.local_best_pooling,
        )
    if config.init_arch == "random":
        rng = np.random.default_rng(config.seed)
        return {pid: str(rng.choice(config.candidates)) for pid in pids}
    names = [name.strip() for name in config.init_arch.split(",")]
    if len(names) == 1:
        return dict.fromkeys(pids, names[0])
    if len(names) != len(pids):
        raise ValueError(f"init-arch lists {len(names)} models for {len(pids)} clients")
    return dict(zip(pids, names))


def run_fedme(grid, config, clients, recorder) -> dict[str, Any]:
    archs = initial_architectures(config, clients)
    log.info("FedMe initial architectures: %s", archs)
    strategy = FedMe(
        config,
        {pid: info["node"] for pid, info in clients.items()},
        archs,
        unlabeled_inputs(config),
        {pid: info["num-examples"] for pid, info in clients.items()},
        on_round=recorder.log_round,
    )
    run_rounds(strategy, grid, config, recorder)
    final = strategy.final_models()
    return {
        **finetune_summary(finetune_clients(grid, config, clients, final)),
        "initial-architectures": {str(p): arch for p, arch in sorted(archs.items())},
        "architectures": {str(p): arch for p, (arch, _) in sorted(final.items())},
    }


def run_fedavg(grid, config, clients, recorder) -> dict[str, Any]:
    # Node minimums stay low: on real devices a vanished node must not stall sampling.
    strategy = RecordedFedAvg(
        on_round=recorder.log_round,
        arch=config.model,
        min_replies=config.min_replies,
        fraction_train=config.fraction_train,
        min_train_nodes=min(2, len(clients)),
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    torch.manual_seed(config.seed)
    initial = ArrayRecord(new_model(config.model, config).state_dict())
    arrays = run_rounds(strategy, grid, config, recorder, initial,
                        config_record(config), config_record(config))
    final = dict.fromkeys(clients, (config.model, arrays))
    return finetune_summary(finetune_clients(grid, config, clients, final))


def run_local(grid, config, clients, recorder) -> dict[str, Any]:
    """Local-only baseline: each client trains alone (early stopping on its validation split)."""
    return finetune_summary(finetune_clients(grid, config, clients, None))


def finetune_clients(grid, config, clients, final) -> dict[int, dict[str, float]]:
    """Each client fine-tunes and tests its final model (or trains alone, for local-only)."""
    messages = []
    for pid, info in sorted(clients.items()):
        content = RecordDict({"config": config_record(config)})
        if final is None:
            message_type = MessageType.TRAIN + ".local"
        else:
            arch, arrays = final[pid]
            content["model"] = ConfigRecord({"arch": arch})
            content["arrays"] = arrays
            message_type = MessageType.EVALUATE + ".finetune"
        messages.append(
            Message(content=content, message_type=message_type, dst_node_id=info["node"])
        )
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    before, after = per_client(replies, "before-accuracy"), per_client(replies, "after-accuracy")
    tested = per_client(replies, "num-examples")
    return {
        pid: {"before": before[pid], "after": after[pid], "num-test": int(tested[pid])}
        for pid in sorted(after)
    }


def finetune_summary(accuracies: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """Mean/SD over clients before and after fine-tuning, plus each client's figures."""
    sizes = {pid: int(a["num-test"]) for pid, a in accuracies.items()}
    return {
        "before-finetune": client_summary({p: a["before"] for p, a in accuracies.items()}, sizes),
        "after-finetune": client_summary({p: a["after"] for p, a in accuracies.items()}, sizes),
        "clients": {str(p): dict(a) for p, a in sorted(accuracies.items())},
    }


MethodRunner = Callable[[Grid, RunConfig, dict[int, dict[str, Any]], RunRecorder], dict[str, Any]]

# Every method a run can name (config key ``method``): one runner each, returning summary fields.
METHODS: dict[str, MethodRunner] = {
    "fedme": run_fedme,
    "fedavg": run_fedavg,
    "local": run_local,
    "async-distill": run_async_distill,
    "async-averaging": run_async_averaging,
    "async-distillation": run_async_distillation,
    "sync-distill": run_sync_distill,
    # the FedMe paper's other baselines (README, "Comparing strategies")
    "hypcluster": run_hypcluster,
    "fml": run_fml,
    "pfedme": run_pfedme,
    "mapper": run_mapper,
    "centralized": run_centralized,
}
