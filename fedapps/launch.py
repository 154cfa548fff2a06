"""Run the app with ``flwr run`` in Flower's local simulation, with the environment it needs.

    python -m fedapps.launch [conf/EXPERIMENT.toml] [--set key=value ...]

Handles what ``flwr run .`` leaves to the user (see the README): a project-local FLWR_HOME with
a local-simulation connection, no per-run reinstall of dependencies, free ports for the local
SuperLink (the default port is shared by every user of a machine), one SuperNode per client
with sensible client resources, and stopping the SuperLink afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from fedapps.config import PROJECT, exit_on_bad_input, parse_override, resolve
from fedapps.methods.distill.channel import open_channel

LOCAL_CONNECTION = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'


def num_supernodes(values: Mapping[str, Any]) -> int:
    if values.get("partition-file"):
        return len(json.loads(Path(values["partition-file"]).read_text())["clients"])
    return int(values["num-clients"])


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
    )
    return env


def stop_local_superlink(port: str) -> None:
    """The CLI leaves its SuperLink running; stop the one this launch started."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("flower-superlink" in part for part in cmdline) and port in cmdline:
            for child in process.children(recursive=True):
                child.kill()
            process.kill()


def launch(
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    home: Path | None = None,
) -> int:
    """``flwr run`` the experiment on a local simulation SuperLink; returns the exit status.

    ``async-distill`` runs as two Flower runs on that SuperLink, as it is deployed: the
    distillation server (``async-distillation``, one idle virtual SuperNode: it trains no
    client) and, once it has published the initial model, the averaging server
    (``async-averaging``), sharing ``distill.channel-dir``.
    """
    values = resolve(config_file, overrides or {})
    env = flwr_environment(home or PROJECT / ".flwr")
    folder = Path(env["FLWR_HOME"])
    try:
        if values["method"] != "async-distill":
            return start_run(values, num_supernodes(values), num_cpus, num_gpus, env,
                             folder / "run-config.toml").wait()
        distillation, averaging = async_distill_runs(values)
        first = start_run(distillation, 1, num_cpus, num_gpus, env, folder / "distillation.toml")
        channel = open_channel(distillation["distill.channel-backend"],
                               distillation["distill.channel-dir"])
        while channel.latest_version("forward") < 0 and first.poll() is None:
            time.sleep(0.5)  # the averaging server starts from the initial distilled model
        second = start_run(averaging, num_supernodes(values), num_cpus, num_gpus, env,
                           folder / "averaging.toml")
        return max(abs(second.wait()), abs(first.wait()))
    finally:
        stop_local_superlink(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])


def async_distill_runs(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The distillation run and the averaging run of one ``async-distill`` experiment."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    channel = (values["distill.channel-dir"]
               or str(Path(values["results-dir"]).resolve() / f"async-distill-channel-{stamp}"))
    return ({**values, "method": "async-distillation", "distill.channel-dir": channel},
            {**values, "method": "async-averaging", "distill.channel-dir": channel})


def start_run(values: Mapping[str, Any], supernodes: int, num_cpus: float, num_gpus: float,
              env: Mapping[str, str], config_path: Path) -> subprocess.Popen[bytes]:
    """Submit one run to the local SuperLink, streaming its output here."""
    federation = (f"num-supernodes={supernodes} client-resources-num-cpus={num_cpus:g} "
                  f"client-resources-num-gpus={num_gpus:g}")
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(PROJECT), "--stream",
               "--run-config", str(write_run_config(values, config_path)),
               "--federation-config", federation]
    return subprocess.Popen(command, env=dict(env), cwd=PROJECT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", nargs="?", help="experiment file, e.g. conf/fedme-digits.toml")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per client (Ray)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per client (Ray)")
    args = parser.parse_args(argv)
    return launch(args.config, dict(args.overrides), args.num_cpus, args.num_gpus)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main))
