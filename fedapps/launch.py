"""Run the app with ``flwr run`` in Flower's local simulation, with the environment it needs.

    python -m fedapps.launch [conf/EXPERIMENT.toml] [--set key=value ...]

Handles what ``flwr run .`` leaves to the user (see docs/running.md): no per-run reinstall of
dependencies, one SuperNode per client with sensible client resources, stopping the SuperLink
afterwards, and three things a script that wraps a run relies on:

- **Checked first**: the config, then the data set, partition and client count with the
  ServerApp's own checks (:func:`fedapps.server.prepare`); a problem is one line on stderr and
  exit status 2, before Flower starts.
- **On its own**: every launch has its own FLWR_HOME (``.flwr/launches/<new folder>``, removed
  afterwards), its own local SuperLink on free ports (the default port is shared by every user
  of a machine), its own run-config file and a results folder it names itself, so launches
  started side by side from one checkout never mix their settings or results.
- **An exit status that tells the truth**: 0 only when every Flower run's ``summary.json`` says
  ``completed``. A failed run exits 1 with one line naming the cause as the last thing printed;
  its traceback is in ``error.log`` in its results folder (Flower's CLI itself exits 0 then).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import psutil

from fedapps.config import (
    PROJECT,
    CommandLine,
    RunConfig,
    parse_override,
    resolve,
    run_command,
)
from fedapps.methods.distill.channel import open_channel
from fedapps.protocol.results import ERROR_LOG, FAILED, MISSING, run_status
from fedapps.server import prepare

# The launch's own SuperLink keeps its state in memory: it lives for this launch only, and no
# message (models included) goes through an on-disk database.
LOCAL_CONNECTION = ('[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                    'address = ":local-in-memory:"\n')
LAUNCHES = PROJECT / ".flwr" / "launches"  # one FLWR_HOME per launch, removed afterwards
# Ray starts its workers, here every simulated client, at niceness 15: next to any busy process
# at 0 (the ServerApp, a second run, a test) they got ~5 % of a core and a 3 s round took
# minutes. The clients are the work: they run at the same priority as everything else.
RAY_ENVIRONMENT = {"RAY_worker_niceness": "0"}
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class Outcome:
    """What a launch ran: its Flower runs' results folders, exit status and, if it failed, why."""

    folders: tuple[Path, ...]
    code: int
    reason: str = ""


def write_run_config(values: Mapping[str, Any], path: Path) -> Path:
    """Write resolved values as the TOML file ``flwr run --run-config`` takes."""
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flwr_environment(home: Path, connections: str = LOCAL_CONNECTION) -> dict[str, str]:
    """Environment for Flower commands using ``home`` as FLWR_HOME, with ``connections``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(connections)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **RAY_ENVIRONMENT,
    )
    return env


def stop_process(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a process, its process group and every descendant: SIGTERM, then SIGKILL.

    Flower detaches its helpers (SuperExec, ServerApp and ClientApp processes) into sessions of
    their own, so killing the group alone would leave them behind: they are listed first.
    ``grace_s=0`` kills at once (a crash).
    """
    tree: list[psutil.Process] = []
    if process.poll() is None:  # once reaped, its pid may belong to someone else
        with suppress(psutil.NoSuchProcess):
            root = psutil.Process(process.pid)
            tree = [root, *root.children(recursive=True)]
    signals = [signal.SIGTERM, signal.SIGKILL] if grace_s > 0 else [signal.SIGKILL]
    for sig in signals:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        for member in tree:
            with suppress(psutil.NoSuchProcess):
                member.send_signal(sig)
        _, tree = psutil.wait_procs(tree, timeout=grace_s if sig == signal.SIGTERM else 5)
        if not tree:
            break
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1)  # reap it, so no zombie is left either


def stop_local_superlink(port: str) -> None:
    """The CLI leaves its SuperLink running; stop the one this launch started."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("flower-superlink" in part for part in cmdline) and port in cmdline:
            with suppress(psutil.NoSuchProcess):
                for child in process.children(recursive=True):
                    child.kill()
                process.kill()


def check(values: Mapping[str, Any]) -> int:
    """The ServerApp's own checks of config and data, here before Flower starts (one-line
    ConfigError or DataError); returns the run's number of clients."""
    return prepare(RunConfig.from_mapping(values))


def launch(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    home: Path | None = None,
    output: Path | None = None,
) -> int:
    """Resolve, check and ``flwr run`` an experiment; returns the exit status (0: completed).
    A failed run prints its one-line reason on stderr, last."""
    outcome = run_experiment(resolve(config_file, overrides or {}), num_cpus, num_gpus, home,
                             output)
    if outcome.code:
        print(f"error: {outcome.reason}", file=sys.stderr, flush=True)
    return outcome.code


def run_experiment(
    values: Mapping[str, Any],
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    home: Path | None = None,
    output: Path | None = None,
    split_async: bool = True,
) -> Outcome:
    """``flwr run`` resolved ``values`` on a local SuperLink of this launch's own.

    ``home``: FLWR_HOME to use (default: a new folder, removed afterwards unless a run left no
    results, when Flower's logs there are all there is). ``output``: a file for Flower's
    streamed log (default: this terminal). ``async-distill`` runs as two Flower runs on that
    SuperLink, as it is deployed: the distillation server (``async-distillation``, one idle
    virtual SuperNode: it trains no client) and, once it has published the initial model, the
    averaging server (``async-averaging``), sharing ``distill.channel-dir``; with
    ``split_async=False`` it is one Flower run whose ServerApp starts the distillation server as
    a child process (the benchmark's setting: one clock, both servers on one machine).
    """
    num_clients = check(values)
    folder = home or Path(tempfile.mkdtemp(prefix="launch-", dir=_made(LAUNCHES)))
    env = flwr_environment(folder)
    started: list[tuple[Path, subprocess.Popen]] = []
    log = output.open("ab") if output else None
    codes: list[int] = []
    try:
        resources = (num_cpus, num_gpus, env, log)
        if values["method"] != "async-distill" or not split_async:
            run = named(values)
            started.append((results_folder(run),
                            start_run(run, num_clients, *resources, folder / "run-config.toml")))
        else:
            distillation, averaging = async_distill_runs(named(values))
            first = start_run(distillation, 1, *resources, folder / "distillation.toml")
            started.append((results_folder(distillation), first))
            channel = open_channel(distillation["distill.channel-backend"],
                                   distillation["distill.channel-dir"])
            while channel.latest_version("forward") < 0 and first.poll() is None:
                time.sleep(0.5)  # the averaging server starts from the initial distilled model
            if first.poll() is None:
                started.append((results_folder(averaging),
                                start_run(averaging, num_clients, *resources,
                                          folder / "averaging.toml")))
        codes = [process.wait() for _, process in started]
    finally:
        for _, process in started:
            stop_process(process)  # on an interrupt: the CLI and what it started
        stop_local_superlink(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
        if log:
            log.close()
    folders = [run_folder for run_folder, _ in started]
    if home is None and all(run_status(f)[0] != MISSING for f in folders):
        shutil.rmtree(folder, ignore_errors=True)  # else Flower's logs there are all there is
    return outcome_of(folders, codes, folder)


def outcome_of(folders: Sequence[Path], codes: Sequence[int], home: Path) -> Outcome:
    """Completed only if every run's summary says so; else the first failure's reason."""
    for folder, code in zip(folders, codes):
        status, reason = run_status(folder)
        if status == FAILED:
            return Outcome(tuple(folders), EXIT_FAILED,
                           f"{reason} (traceback: {folder / ERROR_LOG})")
        if status == MISSING:
            return Outcome(tuple(folders), EXIT_FAILED,
                           f"the run wrote no results (flwr run exited with {code}); "
                           f"Flower's logs are in {home}")
        if code:
            return Outcome(tuple(folders), EXIT_FAILED,
                           f"flwr run exited with {code}; results in {folder}")
    return Outcome(tuple(folders), 0)


def named(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with a run-name, so the launcher knows the results folder it will read (a
    name the user gave is kept: a named run resumes)."""
    if values.get("run-name"):
        return dict(values)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return {**values, "run-name": f"{values['method']}-{values['dataset']}-{stamp}-{os.getpid()}"}


def results_folder(values: Mapping[str, Any]) -> Path:
    return Path(values["results-dir"]) / values["run-name"]


def async_distill_runs(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The distillation run and the averaging run of one ``async-distill`` experiment, each
    with its own results folder, sharing one channel folder."""
    name = values["run-name"]
    channel = (values["distill.channel-dir"]
               or str(Path(values["results-dir"]).resolve() / f"{name}-channel"))
    return ({**values, "method": "async-distillation", "distill.channel-dir": channel,
             "run-name": f"{name}-distillation"},
            {**values, "method": "async-averaging", "distill.channel-dir": channel,
             "run-name": f"{name}-averaging"})


def start_run(values: Mapping[str, Any], supernodes: int, num_cpus: float, num_gpus: float,
              env: Mapping[str, str], log: BinaryIO | None,
              config_path: Path) -> subprocess.Popen:
    """Submit one run to the local SuperLink, streaming its output here (or to ``log``)."""
    federation = (f"num-supernodes={supernodes} client-resources-num-cpus={num_cpus:g} "
                  f"client-resources-num-gpus={num_gpus:g}")
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(PROJECT), "--stream",
               "--run-config", str(write_run_config(values, config_path)),
               "--federation-config", federation]
    return subprocess.Popen(command, env=dict(env), cwd=PROJECT, stdout=log,
                            stderr=subprocess.STDOUT if log else None, start_new_session=True)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLine(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", nargs="?", help="experiment file, e.g. conf/fedme-digits.toml")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per client (Ray)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per client (Ray)")
    args = parser.parse_args(argv)
    try:
        return launch(args.config, dict(args.overrides), args.num_cpus, args.num_gpus)
    except KeyboardInterrupt:
        print("error: interrupted; Flower's processes were stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    run_command(main)
