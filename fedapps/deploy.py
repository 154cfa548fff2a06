"""Rehearse a real deployment on one machine: a SuperLink and N SuperNodes as real processes.

    python -m fedapps.deploy [conf/EXPERIMENT.toml] [--num-supernodes N] [--set key=value ...]

Unlike :mod:`fedapps.launch` (Flower's simulation engine), this starts ``flower-superlink`` and
one ``flower-supernode`` per client, talking over loopback HTTP exactly as separate machines
would, so it exercises node configs, connections, polling and node failures before a real
rollout. Everything runs insecure on free 127.0.0.1 ports with a private FLWR_HOME, and every
process started is killed on exit, also on errors and timeouts (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedapps.config import PROJECT, exit_on_bad_input, parse_override, resolve
from fedapps.launch import flwr_environment, free_port, num_supernodes, write_run_config

CONNECTION = "rehearsal"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def connection_toml(name: str, address: str) -> str:
    """A Flower config.toml with one insecure connection to the SuperLink at ``address``."""
    return (f'[superlink]\ndefault = "{name}"\n\n'
            f'[superlink.{name}]\naddress = "{address}"\ninsecure = true\n')


def stop_process(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
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


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path,
                  timeout_s: float = START_TIMEOUT_S) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; fail early if ``process`` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening "
                               f"on port {port}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on port {port} after {timeout_s:.0f}s; see {log}")


@dataclass
class Deployment:
    """A running SuperLink with its SuperNodes, and the environment to drive it with ``flwr``."""

    home: Path
    env: dict[str, str]
    address: str
    stack: ExitStack
    superlink: subprocess.Popen[bytes] | None = None
    supernodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)  # all spawned

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def spawn(self, name: str, command: list[str], env: Mapping[str, str] | None = None,
              echo: bool = False) -> subprocess.Popen[bytes]:
        """Start ``command`` in its own process group, logging to ``logs/<name>.log``
        (or to this terminal, with ``echo``).

        The process is stopped when the deployment closes, whatever happens meanwhile.
        """
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(command, env=dict(env or self.env), cwd=PROJECT,
                                       stdout=None if echo else log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes.append(process)
        self.stack.callback(stop_process, process)
        return process

    def start_run(self, run_config: Path, echo: bool = False,
                  name: str = "flwr-run") -> subprocess.Popen[bytes]:
        """Submit this project as a run, streaming its logs (to ``logs/<name>.log``)."""
        command = [_tool("flwr"), "run", str(PROJECT), CONNECTION, "--stream",
                   "--run-config", str(run_config)]
        return self.spawn(name, command, echo=echo)

    def run(self, run_config: Path, timeout_s: float | None = None, echo: bool = False) -> int:
        """Submit a run and wait for it; returns the CLI's exit code (stopped on timeout)."""
        process = self.start_run(run_config, echo)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(process)
            raise

    def kill_supernode(self, index: int) -> None:
        """Kill one SuperNode abruptly (with its ClientApps), as a crashed device would go."""
        stop_process(self.supernodes[index], grace_s=0)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _tool(name: str) -> str:
    """A Flower command from the environment running this module (not whatever is on PATH)."""
    return str(Path(sys.executable).parent / name)


@contextmanager
def deployment(num_nodes: int, home: Path,
               node_config: Mapping[str, Any] | None = None) -> Iterator[Deployment]:
    """Start a SuperLink and ``num_nodes`` SuperNodes (partition-id i of ``num_nodes``).

    ``home`` holds FLWR_HOME for the CLI, one per server process, and ``logs/``. Yields once
    the SuperLink listens; SuperNodes connect on their own (the ServerApp waits for them).
    """
    link_port = free_port()
    address = f"127.0.0.1:{link_port}"
    env = flwr_environment(home, connection_toml(CONNECTION, address))
    with ExitStack() as stack:
        deploy = Deployment(home, env, address, stack)
        deploy.superlink = deploy.spawn(
            "superlink",
            [_tool("flower-superlink"), "--insecure", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(link_port),
             "--disable-runtime-dependency-installation"],
            {**env, "FLWR_HOME": str(home / "superlink")},
        )
        wait_for_port(link_port, deploy.superlink, deploy.logs / "superlink.log")
        extra = " ".join(f"{k}={v}" for k, v in (node_config or {}).items())
        for index in range(num_nodes):
            config = f"partition-id={index} num-partitions={num_nodes} {extra}".strip()
            deploy.supernodes.append(deploy.spawn(
                f"supernode-{index}",
                [_tool("flower-supernode"), "--insecure", "--superlink", address,
                 "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(free_port()),
                 "--node-config", config],
                {**env, "FLWR_HOME": str(home / f"supernode-{index}")},
            ))
        yield deploy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", nargs="?", help="experiment file, e.g. conf/fedme-digits.toml")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="SuperNodes to start (default: the run's number of clients)")
    parser.add_argument("--home", type=Path, default=PROJECT / ".flwr" / "deploy",
                        help="FLWR_HOME and logs of this rehearsal")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    args = parser.parse_args(argv)
    overrides = dict(args.overrides)
    if args.num_supernodes is not None:
        overrides.setdefault("num-clients", args.num_supernodes)
    values = resolve(args.config, overrides)
    nodes = args.num_supernodes or num_supernodes(values)
    if nodes != num_supernodes(values):
        parser.error(f"--num-supernodes {nodes} differs from the run's "
                     f"{num_supernodes(values)} clients (num-partitions must match)")
    home = args.home.resolve()
    # `kill`/`timeout` send SIGTERM: exit through the context manager so it stops every process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with deployment(nodes, home) as deploy:
        print(f"fedapps.deploy: SuperLink on {deploy.address}, {nodes} SuperNodes; "
              f"logs in {deploy.logs}", flush=True)
        return deploy.run(write_run_config(values, home / "run-config.toml"), args.timeout,
                          echo=True)


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(main))
