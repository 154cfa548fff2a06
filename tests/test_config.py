import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import psutil
import pytest

from fedapps.config import (
    ConfigError,
    RunConfig,
    app_defaults,
    exit_on_bad_input,
    markdown_table,
)
from fedapps.deploy import main as deploy_main

PROJECT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_match_runconfig():
    assert app_defaults() == RunConfig().to_dict()


def test_docs_key_table_is_generated_from_the_schema():
    assert (PROJECT / "docs" / "config.md").read_text() == markdown_table(), (
        "run: python -m fedapps.config > docs/config.md")


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "fedavg", "fedme.adoption-rule": "accuracy"},
     "fedme.adoption-rule='accuracy': method 'fedavg' does not use this key"),
    ({"method": "fedme", "hypcluster.k": 3}, "hypcluster.k=3: method 'fedme' does not use"),
    ({"method": "local", "fraction-train": 0.5}, "fraction-train=0.5: method 'local' does not"),
])
def test_a_key_the_method_cannot_honour_is_rejected_with_its_name(values, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping(values)
    assert message in str(error.value)


def test_tables_and_dotted_keys_are_the_same_config():
    assert (RunConfig.from_mapping({"fedme": {"init-arch": "cnn1"}})
            == RunConfig.from_mapping({"fedme.init-arch": "cnn1"}))


def test_the_deploy_command_refuses_a_bad_config_in_one_line(capsys):
    code = exit_on_bad_input(lambda: deploy_main(["--set", "lr=-1.0"]))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: lr=-1.0: must be > 0")


# the launcher's and deploy's bad configs run in process (tests/test_exit_status.py: BAD_INPUTS,
# and one subprocess per command there); these are the scripts with no in-process test
@pytest.mark.parametrize(("command", "message"), [
    (["benchmarks/async_distill.py", "--set", "lr=-1.0"], "lr=-1.0: must be > 0"),
    (["benchmarks/compare_digits.py", "--rounds", "0"], "num-rounds=0: must be >= 1"),
])
def test_commands_print_one_line_and_exit_2_on_a_bad_config(command, message):
    done = subprocess.run([sys.executable, *command], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: {message}")


def test_sigterm_stops_what_a_command_started(tmp_path):
    """`kill`/`timeout` on a command ends it through its ``finally`` blocks, which stop what
    it started (launch.run_experiment stops Flower there): without run_command the command died
    alone and left the SuperLink, the simulation and Ray running."""
    script = tmp_path / "command.py"
    script.write_text(textwrap.dedent("""
        import subprocess, sys, time
        from fedapps.config import run_command

        def main() -> int:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            print(child.pid, flush=True)
            try:
                time.sleep(120)
            finally:
                child.kill()
            return 0

        run_command(main)
    """))
    command = subprocess.Popen([sys.executable, str(script)], cwd=PROJECT,
                               stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(command.stdout.readline()))
    command.send_signal(signal.SIGTERM)
    assert command.wait(timeout=30) == 128 + signal.SIGTERM
    child.wait(timeout=10)  # raises TimeoutExpired if it was left running


def test_every_command_that_starts_processes_enters_through_run_command():
    scripts = [*PROJECT.glob("fedapps/**/*.py"), *PROJECT.glob("benchmarks/*.py")]
    commands = [path for path in scripts if 'if __name__ == "__main__":' in path.read_text()
                and path.name != "config.py"]  # config.py prints docs/config.md, starts nothing
    assert len(commands) >= 10
    for path in commands:
        entry = path.read_text().split('if __name__ == "__main__":')[1]
        assert entry.strip() == "run_command(main)", path

def test_every_conf_file_is_a_valid_override():
    for path in sorted((PROJECT / "conf").glob("*.toml")):
        with path.open("rb") as stream:
            RunConfig.from_mapping(tomllib.load(stream))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dataset": "mnist"}, "dataset='mnist' is not known; allowed: digits"),
        ({"model": "resnet"}, "model='resnet' is not known"),
        ({"method": "fedprox"}, "method='fedprox' is not known; allowed: fedme"),
        ({"partitioner": "shards"}, "partitioner='shards' is not known"),
        ({"alpha-label": 0.0}, "alpha-label=0.0: must be > 0"),
        ({"alpha-size": -1}, "alpha-size=-1: must be > 0"),
        ({"dataset": "npz", "data-path": "/no/such/file.npz"},
         "data-path='/no/such/file.npz': no such file"),
        ({"data-path": "/no/such/file.npz"},  # digits would run and ignore it
         "data-path='/no/such/file.npz': dataset='digits' is built in and reads no file"),
        ({"dataset": "shapes", "data-path": "."}, "dataset='shapes' is built in"),
        ({"num-rouds": 3}, "unknown config key 'num-rouds'"),
        ({"num-clients": "many"}, "num-clients='many': expected an integer"),
        ({"fedme.init-arch": "cnn1,cnn9"}, "'cnn9' is not a model"),
        ({"fedme.cluster-schedule": "1:1,x"}, "bad item 'x'"),
        ({"val-fraction": 0.5, "test-fraction": 0.5}, "must be < 1"),
    ],
)
def test_bad_values_name_key_value_and_allowed(values, message):
    with pytest.raises(ConfigError, match=None) as error:
        RunConfig.from_mapping(values)
    assert message in str(error.value)


def test_paper_cluster_schedule():
    config = RunConfig(num_rounds=100)
    assert config.cluster_schedule_pairs() == [(1, 1), (51, 2), (76, 3), (91, 4)]
    assert [config.clusters_at(r) for r in (1, 50, 51, 75, 76, 90, 91, 100)] == [
        1, 1, 2, 2, 3, 3, 4, 4,
    ]


def test_custom_cluster_schedule():
    config = RunConfig.from_mapping({"fedme.cluster-schedule": "1:1,3:2"})
    assert [config.clusters_at(r) for r in (1, 2, 3, 9)] == [1, 1, 2, 2]
