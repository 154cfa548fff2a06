"""The ServerApp's work: check the data, find the clients, run a method, write results.

``server_app.py`` only hands Flower's ``grid`` and ``context`` to :func:`run`. The launcher calls
:func:`prepare` too, before Flower starts, so a data problem is one line in seconds; the
ServerApp checks again for a ``flwr run`` by hand and on a real fleet.
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
from fedapps.protocol.results import RunRecorder, check_resumable, one_line_reason
from fedapps.registry import METHODS


def prepare(config: RunConfig) -> int:
    """Everything the run needs before a client is asked: the data set loads and is well
    formed, the partition can be drawn, the server's own file is the server's, the method has
    what it needs (e.g. FedMe two clients), a named run's folder holds this experiment.
    Returns the number of clients; raises ConfigError or DataError (one line)."""
    check_resumable(config)
    num_clients = num_clients_of(config)
    if config.dataset == "devices":
        server_pool(config)  # the server's own file, not a device's: fail before Flower waits
    method = METHODS[config.method]
    if method.check:
        method.check(config, num_clients)
    return num_clients


def run(grid: Grid, context: Context, overrides: Mapping[str, Any] | None = None) -> Path:
    """Run the configured method; returns the results folder.

    Whatever stops the run, its folder says so: ``summary.json`` with ``status: failed`` and the
    reason, the traceback in ``error.log``, and one line naming the cause as the last thing this
    prints; the exception then goes on to Flower, which marks the run failed.
    """
    config = RunConfig.from_mapping({**context.run_config, **(overrides or {})})
    random.seed(config.seed)  # Flower's node sampling uses the random module
    num_clients = prepare(config)  # bad data fails here, before any client works
    recorder = RunRecorder(config)
    try:
        summary = run_method(grid, config, num_clients, recorder)
    except BaseException as error:
        log = recorder.write_failure(error)
        print(f"fedapps: FAILED: {one_line_reason(error)} (traceback: {log})", flush=True)
        raise
    after = summary.get("after-finetune")
    accuracy = (f"; accuracy {after['mean']:.4f} ± {after['sd']:.4f} over clients"
                if after else "")
    print(f"fedapps: done in {recorder.elapsed():.1f}s{accuracy}; results in {recorder.folder}",
          flush=True)
    return recorder.folder


def run_method(grid: Grid, config: RunConfig, num_clients: int,
               recorder: RunRecorder) -> dict[str, Any]:
    """Find the clients, run the method, write ``summary.json``; returns the summary."""
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
    return summary
