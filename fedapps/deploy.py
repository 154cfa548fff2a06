"""Rehearse a real deployment on one machine: a SuperLink and N SuperNodes as real processes.

    python -m fedapps.deploy [conf/EXPERIMENT.toml] [--num-supernodes N] [--set key=value ...]
                             [--tls] [--auth] [--devices DIR]

Unlike :mod:`fedapps.launch` (Flower's simulation engine), this starts ``flower-superlink`` and
one ``flower-supernode`` per client, talking over loopback HTTP exactly as separate machines
would, so it exercises node configs, connections, polling and node failures before a real
rollout. By default everything runs insecure on free 127.0.0.1 ports with a private FLWR_HOME;
``--tls`` first makes a CA and a SuperLink certificate for 127.0.0.1/localhost with openssl
(``HOME/certificates``), ``--auth`` (implies ``--tls``) also makes one ssh-keygen key per
SuperNode (``HOME/keys``) and registers it with ``flwr supernode register`` before the
SuperNode starts: the steps of docs/deployment.md, with absolute paths. ``--devices DIR`` gives
each SuperNode only its own data file (``python -m fedapps.data.split`` writes them) and the
server only ``DIR/server.npz``, as real devices run. Every process started is killed on exit, also
on errors and timeouts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedapps.config import (
    PROJECT,
    CommandLine,
    ConfigError,
    parse_override,
    resolve,
    run_command,
)
from fedapps.data.devices import node_config_line
from fedapps.launch import (
    EXIT_FAILED,
    check,
    flwr_environment,
    free_port,
    named,
    outcome_of,
    results_folder,
    stop_process,
    write_run_config,
)

CONNECTION = "rehearsal"
START_TIMEOUT_S = 60.0
TOOL_TIMEOUT_S = 120.0
LOOPBACK_NAMES = "DNS:localhost,IP:127.0.0.1"


class MissingTool(ConfigError):
    """A command this needs (openssl, ssh-keygen) is not installed: one line, exit 2."""


def connection_toml(name: str, address: str, root_certificates: Path | None = None) -> str:
    """A Flower config.toml with one connection to the SuperLink at ``address``: insecure, or
    TLS verified against the CA certificate ``root_certificates`` (an absolute path)."""
    security = (f'root-certificates = "{root_certificates}"\n' if root_certificates
                else "insecure = true\n")
    return (f'[superlink]\ndefault = "{name}"\n\n'
            f'[superlink.{name}]\naddress = "{address}"\n{security}')


def require(tool: str) -> str:
    """The path of ``tool`` on PATH, or a one-line error saying it is missing."""
    if path := shutil.which(tool):
        return path
    raise MissingTool(f"`{tool}` was not found on PATH; install it (e.g. `apt-get install "
                      f"{'openssl' if tool == 'openssl' else 'openssh-client'}`) or run "
                      f"without --tls/--auth")


def run_tool(command: Sequence[str], env: Mapping[str, str] | None = None,
             verbose: bool = False) -> str:
    """Run a short command to completion (stdin closed: nothing can wait for an answer);
    its stdout, or an error carrying its output."""
    if verbose:
        print("$", shlex.join(str(part) for part in command), flush=True)
    done = subprocess.run([str(part) for part in command], env=dict(env) if env else None,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=False)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(str(part) for part in command)} exited with "
                           f"{done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class Certificates:
    """A CA and a SuperLink certificate signed by it, in one folder."""

    folder: Path

    @property
    def ca(self) -> Path:  # given to SuperNodes and CLI users
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"


def make_certificates(folder: Path, names: str = LOOPBACK_NAMES,
                      verbose: bool = False) -> Certificates:
    """A new CA and a SuperLink certificate for ``names`` (subjectAltName entries) in
    ``folder``, with the openssl commands of docs/deployment.md (absolute paths, no cd)."""
    openssl = require("openssl")
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    certs = Certificates(folder)
    (folder / "server.ext").write_text(f"subjectAltName={names}\n")
    if verbose:
        print(f'$ printf "subjectAltName={names}\\n" > {shlex.quote(str(folder / "server.ext"))}')
    for command in (
        ["req", "-x509", "-newkey", "rsa:4096", "-nodes", "-sha256", "-days", "365",
         "-subj", "/CN=fedapps CA", "-keyout", folder / "ca.key", "-out", certs.ca],
        ["req", "-newkey", "rsa:4096", "-nodes", "-sha256", "-subj", "/CN=localhost",
         "-keyout", certs.server_key, "-out", folder / "server.csr"],
        ["x509", "-req", "-in", folder / "server.csr", "-CA", certs.ca, "-CAkey",
         folder / "ca.key", "-CAcreateserial", "-days", "365", "-sha256",
         "-extfile", folder / "server.ext", "-out", certs.server_cert],
        ["verify", "-CAfile", certs.ca, certs.server_cert],
    ):
        run_tool([openssl, *command], verbose=verbose)
    return certs


def make_supernode_key(keys: Path, name: str, verbose: bool = False) -> Path:
    """A new ECDSA P-384 key pair ``keys/<name>`` and ``keys/<name>.pub`` (OpenSSH format, as
    Flower's docs make them); returns the private key. An older pair of that name is replaced."""
    ssh_keygen = require("ssh-keygen")
    keys = keys.resolve()
    keys.mkdir(parents=True, exist_ok=True)  # ssh-keygen does not create it
    private = keys / name
    for old in (private, public_key(private)):
        old.unlink(missing_ok=True)  # else ssh-keygen would ask whether to overwrite
    run_tool([ssh_keygen, "-t", "ecdsa", "-b", "384", "-N", "", "-f", private],
             verbose=verbose)
    return private


def public_key(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


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
    certificates: Certificates | None = None  # TLS: the SuperLink's CA and certificate
    auth: bool = False  # SuperNodes must be registered (flwr supernode register)
    node_ids: dict[str, int] = field(default_factory=dict)  # registered, by SuperNode name
    supernode_ports: dict[str, tuple[subprocess.Popen[bytes], int]] = field(default_factory=dict)
    verbose: bool = False  # print every command run

    @property
    def keys(self) -> Path:
        return self.home / "keys"

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
        if self.verbose:
            print("$", shlex.join(command), "&", flush=True)
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

    def flwr(self, *args: str | Path) -> str:
        """Run a ``flwr`` CLI command against this SuperLink; its stdout."""
        return run_tool([_tool("flwr"), *args], self.env, self.verbose)

    def register(self, private_key: Path, name: str) -> int:
        """Register a SuperNode's public key with the SuperLink; the node id it gets."""
        out = self.flwr("supernode", "register", public_key(private_key), CONNECTION,
                        "--format", "json")
        node_id = int(json.loads(out)["node-id"])
        self.node_ids[name] = node_id
        return node_id

    def registered(self) -> list[dict[str, Any]]:
        """The SuperLink's SuperNodes (``flwr supernode list``): node-id, status, ..."""
        return json.loads(self.flwr("supernode", "list", CONNECTION, "--format", "json"))["nodes"]

    def add_supernode(self, partition_id: int | None, num_partitions: int,
                      node_config: Mapping[str, Any] | None = None, *, name: str | None = None,
                      insecure: bool | None = None, root_certificates: Path | None = None,
                      authenticate: bool | None = None, private_key: Path | None = None,
                      register: bool = True,
                      max_retries: int | None = None) -> subprocess.Popen[bytes]:
        """Start a SuperNode for partition ``partition_id`` of ``num_partitions`` (``None``: a
        device whose node config names its own data file, which carries its partition id).

        By default it connects as the deployment expects: ``--insecure``, or TLS with the
        deployment's CA and, with auth, a key pair (``private_key``, or a new one
        ``keys/<name>``) registered first. The keyword arguments override that, e.g. to try a
        SuperNode that should be refused; ``max_retries`` makes it give up (and exit) when it
        cannot connect.
        """
        node_config = dict(node_config or {})
        name = name or str(node_config.get("device-name", f"supernode-{partition_id}"))
        insecure = self.certificates is None if insecure is None else insecure
        port = free_port()  # its ClientAppIo API: open once the SuperNode is up
        command = [_tool("flower-supernode"), "--superlink", self.address,
                   "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
        ca = root_certificates or (self.certificates.ca if self.certificates else None)
        if insecure:
            command.append("--insecure")
        elif ca:
            command += ["--root-certificates", str(ca)]
        if authenticate is None:
            authenticate = self.auth or private_key is not None
        if authenticate:
            private_key = private_key or make_supernode_key(self.keys, name, self.verbose)
            if register:
                self.register(private_key, name)
            command += ["--auth-supernode-private-key", str(private_key)]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        if partition_id is not None:
            node_config = {"partition-id": partition_id, "num-partitions": num_partitions,
                           **node_config}
        command += ["--node-config", node_config_line(node_config)]
        process = self.spawn(name, command, {**self.env, "FLWR_HOME": str(self.home / name)})
        self.supernodes.append(process)
        self.supernode_ports[name] = (process, port)
        return process

    def wait_for_supernodes(self) -> None:
        """Return once every SuperNode started so far is up; one that died (a bad node config,
        a missing file) fails here, naming its log, instead of leaving the run waiting."""
        for name, (process, port) in self.supernode_ports.items():
            wait_for_port(port, process, self.logs / f"{name}.log")

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


def device_node_configs(folder: Path) -> list[dict[str, str]]:
    """One node config per device file in ``folder`` (``devices.json`` of
    ``python -m fedapps.data.split``): its own file and name, no partition-id."""
    manifest = folder / "devices.json"
    if not manifest.exists():
        raise ConfigError(f"--devices {folder}: no devices.json there; make the files with "
                          f"`python -m fedapps.data.split CONFIG --out {folder}`")
    devices = json.loads(manifest.read_text())["devices"]
    return [{"data-path": str((folder / device["file"]).resolve()),
             "device-name": Path(device["file"]).stem} for device in devices]


def device_run_config(values: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """The run's config for devices holding their own data: the server reads only its file."""
    return {**values, "dataset": "devices", "data-path": str((folder / "server.npz").resolve()),
            "partition-file": "", "num-clients": len(device_node_configs(folder))}


@contextmanager
def deployment(num_nodes: int, home: Path, node_config: Mapping[str, Any] | None = None,
               tls: bool = False, auth: bool = False, verbose: bool = False,
               devices: Sequence[Mapping[str, Any]] | None = None) -> Iterator[Deployment]:
    """Start a SuperLink and ``num_nodes`` SuperNodes (partition-id i of ``num_nodes``), or one
    SuperNode per entry of ``devices`` with that node config (:func:`device_node_configs`).

    ``home`` holds FLWR_HOME for the CLI, one per server process, ``logs/`` and, with ``tls``,
    ``certificates/`` (a new CA and a certificate for 127.0.0.1/localhost); ``auth`` (needs
    TLS, so it implies it) starts the SuperLink with ``--enable-supernode-auth`` and registers
    a new key pair ``keys/supernode-<i>`` for each SuperNode before starting it. Yields once
    the SuperLink listens; SuperNodes connect on their own (the ServerApp waits for them).
    """
    home = home.resolve()  # every path handed to Flower is absolute: nothing depends on cwd
    tls = tls or auth
    certificates = make_certificates(home / "certificates", verbose=verbose) if tls else None
    if auth:
        require("ssh-keygen")  # fail before starting anything
    link_port = free_port()
    address = f"127.0.0.1:{link_port}"
    env = flwr_environment(home, connection_toml(
        CONNECTION, address, certificates.ca if certificates else None))
    with ExitStack() as stack:
        deploy = Deployment(home, env, address, stack, certificates=certificates, auth=auth,
                            verbose=verbose)
        security = (["--ssl-ca-certfile", str(certificates.ca),
                     "--ssl-certfile", str(certificates.server_cert),
                     "--ssl-keyfile", str(certificates.server_key)]
                    if certificates else ["--insecure"])
        deploy.superlink = deploy.spawn(
            "superlink",
            [_tool("flower-superlink"), *security,
             *(["--enable-supernode-auth"] if auth else []), "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(link_port),
             "--disable-runtime-dependency-installation"],
            {**env, "FLWR_HOME": str(home / "superlink")},
        )
        wait_for_port(link_port, deploy.superlink, deploy.logs / "superlink.log")
        if devices is not None:
            for device in devices:
                deploy.add_supernode(None, len(devices), {**device, **(node_config or {})})
        else:
            for index in range(num_nodes):
                deploy.add_supernode(index, num_nodes, node_config)
        deploy.wait_for_supernodes()
        yield deploy


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLine(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", nargs="?", help="experiment file, e.g. conf/fedme-digits.toml")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="KEY=VALUE", help="override one run-config key")
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="SuperNodes to start (default: the run's number of clients)")
    parser.add_argument("--home", type=Path, default=PROJECT / ".flwr" / "deploy",
                        help="FLWR_HOME and logs of this rehearsal")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    parser.add_argument("--tls", action="store_true",
                        help="TLS with a new CA and SuperLink certificate (HOME/certificates)")
    parser.add_argument("--auth", action="store_true",
                        help="SuperNode authentication: register a new key per SuperNode "
                             "(HOME/keys); implies --tls")
    parser.add_argument("--devices", type=Path, default=None, metavar="DIR",
                        help="each SuperNode gets its own file from DIR (python -m "
                             "fedapps.data.split CONFIG --out DIR); the server reads only "
                             "DIR/server.npz")
    args = parser.parse_args(argv)
    overrides = dict(args.overrides)
    if args.num_supernodes is not None:
        overrides.setdefault("num-clients", args.num_supernodes)
    values = resolve(args.config, overrides)
    devices = device_node_configs(args.devices) if args.devices else None
    if args.devices:
        values = resolve(None, device_run_config(values, args.devices))
    num_clients = check(values)  # the ServerApp's checks, before any process starts
    nodes = args.num_supernodes or num_clients
    if nodes != num_clients:
        parser.error(f"--num-supernodes {nodes} differs from the run's {num_clients} clients "
                     "(num-partitions must match)")
    values = named(values)  # the results folder whose summary says how the run ended
    home = args.home.resolve()
    with deployment(nodes, home, tls=args.tls, auth=args.auth, verbose=args.tls or args.auth,
                    devices=devices) as deploy:
        scheme = ("TLS + SuperNode auth" if args.auth else "TLS" if args.tls else "insecure")
        print(f"fedapps.deploy: SuperLink on {deploy.address} ({scheme}), {nodes} SuperNodes; "
              f"logs in {deploy.logs}", flush=True)
        try:
            code = deploy.run(write_run_config(values, home / "run-config.toml"),
                              args.timeout, echo=True)
        except subprocess.TimeoutExpired:
            print(f"error: no result after --timeout {args.timeout:g}s; the run was stopped "
                  f"(logs in {deploy.logs})", file=sys.stderr)
            return EXIT_FAILED
    outcome = outcome_of([results_folder(values)], [code], deploy.logs)
    if outcome.code:
        print(f"error: {outcome.reason}", file=sys.stderr)
    return outcome.code

if __name__ == "__main__":
    run_command(main)
