"""TLS and SuperNode authentication on loopback: `python -m fedapps.deploy --tls --auth`.

These are the steps of docs/deployment.md ("A fleet, step by step"): a CA and a SuperLink
certificate made with openssl, one ssh-keygen key per SuperNode registered with
`flwr supernode register`, a TLS SuperLink with `--enable-supernode-auth`. Registered
SuperNodes run a whole FedAvg run; unregistered, `--insecure` and wrong-CA ones are refused.
"""

from __future__ import annotations

import shutil
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from fedapps.config import PROJECT, exit_on_bad_input
from fedapps.deploy import deployment, main, make_certificates, make_supernode_key
from fedapps.protocol.results import read_rounds

DOC = PROJECT / "docs" / "deployment.md"
REFUSAL_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 300.0
TINY = {"method": "fedavg", "num-clients": 2, "num-rounds": 1, "model": "cnn1",
        "finetune-epochs": 0, "local-epochs": 1}

needs_tools = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                 reason="needs openssl and ssh-keygen")


def flwr_processes(home: Path) -> set[int]:
    """Flower's processes of the deployment in ``home`` (their FLWR_HOME lies under it): tests
    running alongside have Flower processes of their own."""
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        if any("flower-" in part or "flwr-" in part for part in process.info["cmdline"] or []):
            with suppress(psutil.Error):
                if process.environ().get("FLWR_HOME", "").startswith(str(home)):
                    found.add(process.pid)
    return found


def live(pids: set[int]) -> list[str]:
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
@needs_tools
def test_script_runs_fedavg_on_registered_supernodes_over_tls(tmp_path, capsys):
    """`fedapps.deploy --tls --auth` end to end; the commands it prints are the doc's."""
    settings = [f"{key}={value}" for key, value in
                {**TINY, "results-dir": str(tmp_path / "results")}.items()]
    started = time.monotonic()
    code = main(["--tls", "--auth", "--home", str(tmp_path / "fleet"),
                 "--timeout", str(RUN_TIMEOUT_S),
                 *[arg for setting in settings for arg in ("--set", setting)]])
    out = capsys.readouterr().out
    print(out, f"took {time.monotonic() - started:.0f}s")
    assert code == 0, (tmp_path / "fleet" / "logs" / "superlink.log").read_text()[-3000:]
    [folder] = (tmp_path / "results").glob("fedavg-*")
    assert [row["round"] for row in read_rounds(folder)] == [1]
    fleet = tmp_path / "fleet"
    for path in ["certificates/ca.crt", "certificates/server.pem", "certificates/server.key",
                 "keys/supernode-0", "keys/supernode-0.pub", "keys/supernode-1.pub"]:
        assert (fleet / path).is_file(), path
    # the doc shows every Flower command and option the script used (and the keys folder)
    doc = DOC.read_text()
    commands = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    assert any("--enable-supernode-auth" in c for c in commands)
    assert sum("flwr supernode register" in c for c in commands) == 2
    for command in commands:
        for word in command.split():
            if word.startswith("-") and word not in {"--format", "--isolation"}:
                assert word in doc, f"{word} (from {command}) is not in {DOC.name}"
    assert "mkdir -p" in doc and "--tls --auth" in doc
    assert not live(flwr_processes(fleet))


@pytest.mark.slow
@needs_tools
def test_unregistered_insecure_and_wrong_ca_supernodes_are_refused(tmp_path):
    """One registered SuperNode comes online; the others never do, and exit on their own
    (the `--insecure` one only because of `--max-retries`: it would retry forever)."""
    other_ca = make_certificates(tmp_path / "other-ca").ca
    with deployment(1, tmp_path / "fleet", auth=True) as deploy:
        stray = make_supernode_key(deploy.keys, "unregistered")
        refused = {
            "unregistered": deploy.add_supernode(1, 2, name="unregistered", private_key=stray,
                                                 register=False),
            "insecure": deploy.add_supernode(1, 2, name="insecure", insecure=True,
                                             authenticate=False, max_retries=2),
            "wrong-ca": deploy.add_supernode(1, 2, name="wrong-ca", root_certificates=other_ca),
            "no-key": deploy.add_supernode(1, 2, name="no-key", authenticate=False),
        }
        deadline = time.monotonic() + REFUSAL_TIMEOUT_S
        while any(p.poll() is None for p in refused.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for name, process in refused.items():
            assert process.poll() not in (None, 0), f"{name}: {deploy.log_tail(name)}"
        reasons = {name: deploy.log_tail(name, 200) for name in refused}
        assert "Failed to activate SuperNode" in reasons["unregistered"]
        assert "Giving up reconnection" in reasons["insecure"]
        assert "CERTIFICATE_VERIFY_FAILED" in reasons["wrong-ca"]
        assert "must be registered" in reasons["no-key"]
        while time.monotonic() < deadline:  # the registered one comes online
            nodes = {int(n["node-id"]): n["status"] for n in deploy.registered()}
            if nodes.get(deploy.node_ids["supernode-0"]) == "online":
                break
            time.sleep(1)
        online = {node for node, status in nodes.items() if status == "online"}
        assert online == {deploy.node_ids["supernode-0"]}, nodes
        assert nodes[deploy.node_ids["wrong-ca"]] == "registered", nodes  # its key was fine
        assert deploy.supernodes[0].poll() is None, deploy.log_tail("supernode-0")
    assert not live(flwr_processes(tmp_path / "fleet"))


@needs_tools
def test_missing_openssl_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no openssl there
    code = exit_on_bad_input(lambda: main(["--tls", "--home", str(tmp_path / "fleet")]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: `openssl` was not found"), err
    assert len(err.strip().splitlines()) == 1
