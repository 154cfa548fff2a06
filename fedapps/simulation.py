"""Run a simulation from Python (tests, notebooks, :mod:`fedapps.compare`).

Uses Flower's Ray-backed simulation engine in this process (``flwr.simulation.run_simulation``)
with the project's own ServerApp and ClientApp, so results match ``flwr run``. The run config is
the app defaults (pyproject.toml) with ``overrides`` on top; the results folder is returned.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedapps import server
from fedapps.client import build_client_app
from fedapps.config import app_defaults
from fedapps.launch import num_supernodes


def simulate(
    overrides: Mapping[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    verbose: bool = False,
) -> Path:
    from flwr.simulation import run_simulation

    values = {**app_defaults(), **(overrides or {})}
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=build_client_app(),
            num_supernodes=num_supernodes(values),
            backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}},
            verbose_logging=verbose,
        )
    if failures:
        raise failures[0]
    if not produced:
        raise RuntimeError("the simulation ended without results; see the log above")
    return produced[0]
