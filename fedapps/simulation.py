"""Run a simulation inside this Python process, for tests that patch the server's code.

Users and every script of this project (``fedapps.compare``, the notebook, the benchmarks) run
experiments through :func:`fedapps.launch.run_experiment`: ``flwr run`` on a local SuperLink,
Flower's supported path. Flower 1.41 has no supported way to run a simulation in-process;
:func:`simulate` is the one place that uses the deprecated ``flwr.simulation.run_simulation``,
because a test can then replace a method or a strategy hook in this process (a crash in round 3,
a broken method). ``test_the_deprecated_in_process_simulation_still_works`` (test_end_to_end.py)
fails loudly when Flower removes or changes it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedapps import server
from fedapps.client import build_client_app
from fedapps.config import RunConfig, app_defaults
from fedapps.launch import RAY_ENVIRONMENT


def simulate(
    overrides: Mapping[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    verbose: bool = False,
) -> Path:
    """The app defaults with ``overrides`` on top, run in Flower's simulation engine in this
    process; returns the results folder, or raises what stopped the ServerApp."""
    from flwr.simulation import run_simulation

    values = {**app_defaults(), **(overrides or {})}
    num_clients = server.prepare(RunConfig.from_mapping(values))
    produced: list[Path] = []
    failures: list[BaseException] = []  # Flower only logs a ServerApp's exception
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            produced.append(server.run(grid, context, values))
        except BaseException as error:
            failures.append(error)
            raise

    for key, value in RAY_ENVIRONMENT.items():  # Ray starts in this process: its workers too
        os.environ.setdefault(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=build_client_app(),
            num_supernodes=num_clients,
            backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}},
            verbose_logging=verbose,
        )
    if failures:
        raise failures[0]
    if not produced:
        raise RuntimeError("the simulation ended without results; see the log above")
    return produced[0]
