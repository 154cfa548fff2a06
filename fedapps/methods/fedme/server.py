"""FedMe's server half: initial architectures, the strategy's rounds, the final evaluation."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedapps import tuning
from fedapps.config import RunConfig
from fedapps.data.federated import unlabeled_inputs
from fedapps.methods.fedme.strategy import FedMe
from fedapps.protocol.engine import run_rounds
from fedapps.protocol.evaluation import final_evaluation
from fedapps.protocol.results import RunRecorder

log = logging.getLogger(__name__)


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
    """fedme.init-arch: local-best (clients chose), random or spread (seeded), one name, or one
    per client."""
    pids = sorted(clients)
    if config.init_arch == "local-best":
        return tuning.pooled_choice(
            {pid: candidate_results(clients[pid]["info"]) for pid in pids},
            {pid: clients[pid]["num-val"] for pid in pids}, config.local_best_pooling,
        )
    if config.init_arch == "random":
        rng = np.random.default_rng(config.seed)
        return {pid: str(rng.choice(config.candidates)) for pid in pids}
    if config.init_arch == "spread":
        return tuning.spread_choice(pids, config.candidates, config.seed)
    names = [name.strip() for name in config.init_arch.split(",")]
    if len(names) == 1:
        return dict.fromkeys(pids, names[0])
    if len(names) != len(pids):
        raise ValueError(f"fedme.init-arch lists {len(names)} models for {len(pids)} clients")
    return dict(zip(pids, names))


def run_fedme(grid: Grid, config: RunConfig, clients: dict[int, dict[str, Any]],
              recorder: RunRecorder) -> dict[str, Any]:
    archs = initial_architectures(config, clients)
    log.info("FedMe initial architectures: %s", archs)
    strategy = FedMe(
        config,
        {pid: info["node"] for pid, info in clients.items()},
        archs,
        unlabeled_inputs(config),
        {pid: info["num-examples"] for pid, info in clients.items()},
    )
    run_rounds(strategy, grid, config, recorder)
    final = strategy.final_models()
    return {
        **final_evaluation(grid, config, clients, final),
        "initial-architectures": {str(p): arch for p, arch in sorted(archs.items())},
        "architectures": {str(p): arch for p, (arch, _) in sorted(final.items())},
    }
