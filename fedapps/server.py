"""The ServerApp's work: resolve the config, find the clients, run a method, write results.

``server_app.py`` only hands Flower's ``grid`` and ``context`` to :func:`run`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid

from fedapps.config import RunConfig
from fedapps.data.federated import (
    dataset_for,
    num_clients_of,
    partition_for,
    save_partition,
    server_pool,
)
from fedapps.privacy import report_line
from fedapps.protocol.discovery import ROSTER, discover_clients, write_roster
from fedapps.protocol.results import RunRecorder
from fedapps.registry import METHODS


def run(grid: Grid, context: Context, overrides: Mapping[str, Any] | None = None) -> Path:
    """Run the configured method; returns the results folder."""
    config = RunConfig.from_mapping({**context.run_config, **(overrides or {})})
    random.seed(config.seed)  # Flower's node sampling uses the random module
    num_clients = num_clients_of(config)  # bad partitions fail here, before any client works
    if config.dataset == "devices":
        server_pool(config)  # the server's own file, not a device's: fail before Flower waits
    recorder = RunRecorder(config)
    if config.dataset != "devices":  # devices hold their own data: there is no partition
        dataset = dataset_for(config.dataset, config.data_path)
        save_partition(partition_for(config), dataset, recorder.folder / "partition.json")
    print(f"fedapps: {config.method} on {config.dataset}, {num_clients} clients, "
          f"{config.num_rounds} rounds; results in {recorder.folder}", flush=True)
    method = METHODS[config.method]
    # A method without a client half (the distillation server) needs no SuperNode to answer.
    clients = discover_clients(grid, config, num_clients) if method.handlers else {}
    write_roster(clients, recorder.folder / ROSTER)
    if clients:
        print(f"fedapps: {len(clients)} clients answered; the node and device of each: "
              f"{recorder.folder / ROSTER}", flush=True)
    summary = {"num-clients": len(clients) or num_clients, "rounds": config.num_rounds,
               **method.run(grid, config, clients, recorder)}
    recorder.write_summary(summary)
    if recorder.privacy is not None:
        print(f"fedapps: privacy: {report_line(recorder.privacy)}; "
              f"{recorder.folder / 'privacy.json'}", flush=True)
    after = summary.get("after-finetune")
    accuracy = (f"; accuracy {after['mean']:.4f} ± {after['sd']:.4f} over clients"
                if after else "")
    print(f"fedapps: done in {recorder.elapsed():.1f}s{accuracy}; results in {recorder.folder}",
          flush=True)
    return recorder.folder
