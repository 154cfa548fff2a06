"""fedapps.compare: one row per method, a failing method does not lose the others; the notebook."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedapps.compare import compare
from fedapps.config import ConfigError

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "compare_strategies.ipynb"


def test_bad_specs_fail_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        compare(["fedavg", "no-such-method"], results_dir=tmp_path)
    with pytest.raises(ConfigError, match="num-rounds"):
        compare(["fedavg"], num_rounds=0, results_dir=tmp_path)
    with pytest.raises(ValueError, match="unique"):
        compare(["fedavg", ("fedavg", {})], results_dir=tmp_path)
    with pytest.raises(TypeError):
        compare("fedavg", results_dir=tmp_path)
    with pytest.raises(TypeError):
        compare(("fedme-cnn1", {"fedme.init-arch": "cnn1"}), results_dir=tmp_path)
    with pytest.raises(TypeError, match="spec"):
        compare(["fedavg", 3], results_dir=tmp_path)


def test_in_process_engine_gives_one_row_per_method_and_reports_a_failure(tmp_path):
    lines = []
    broken = ("fedavg-broken", {"method": "fedavg", "fault-injection": "error:server:2"})
    result = compare(["fedavg", broken], "digits", [0], num_clients=3, num_rounds=2,
                     model="cnn1", local_epochs=1, results_dir=tmp_path / "runs",
                     progress=lines.append, engine="in-process")
    table = result.table
    assert list(table["method"]) == ["fedavg", "fedavg-broken"]
    ok, failed = table.to_dict("records")
    assert ok["runs"] == "1/1" and ok["status"] == "ok" and not ok["error"] and ok["accuracy"] > 0
    assert failed["runs"] == "0/1" and failed["status"] == "1 of 1 FAILED"
    assert failed["error"] == "seed 0: RuntimeError: fault-injection: the server fails in round 2"
    assert math.isnan(failed["accuracy"])
    assert len(lines) == 2 and "FAILED" in lines[1]
    assert set(result.curves["method"]) == {"fedavg"} and set(result.curves["round"]) == {1, 2}
    markdown = result.to_markdown()
    assert "| fedavg |" in markdown and "| fedavg-broken | – |" in markdown
    saved = result.save(tmp_path / "out")
    for name in ("table.md", "table.csv", "accuracy_by_round.png"):
        assert saved[name].stat().st_size > 0
    with pytest.raises(ValueError, match="engine='ray'"):
        compare(["fedavg"], results_dir=tmp_path, engine="ray")


@pytest.mark.slow
def test_a_failure_through_flower_is_reported_with_its_reason(tmp_path):
    """compare() through ``flwr run``: the launch, Flower's log next to the run and the reason
    read back from the failed run. One launch (each costs a Ray cluster): the table of completed
    and failed methods together is the in-process test above, the same code after the run."""
    lines = []
    broken = ("fedavg-broken", {"method": "fedavg", "fault-injection": "error:server:1"})
    result = compare([broken], "digits", [0], num_clients=3, num_rounds=1, model="cnn1",
                     results_dir=tmp_path / "runs", progress=lines.append)
    [failed] = result.table.to_dict("records")
    assert failed["runs"] == "0/1" and failed["status"] == "1 of 1 FAILED"
    assert "the server fails in round 1" in failed["error"] and math.isnan(failed["accuracy"])
    assert len(lines) == 1 and "FAILED" in lines[0]
    assert "| fedavg-broken | – |" in result.to_markdown()
    assert (tmp_path / "runs" / "fedavg-broken" / "seed0" / "flwr.log").stat().st_size > 0


@pytest.mark.slow  # a Jupyter kernel
def test_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("FEDAPPS_NOTEBOOK_SETTINGS", json.dumps({
        "methods": [["fedme-cnn1", {"method": "fedme", "fedme.init-arch": "cnn1"}]],
        "seeds": [0], "num_clients": 3, "num_rounds": 2,
        "results_dir": str(tmp_path / "runs"),
        # compare() through Flower is test_a_failure_through_flower_is_reported_with_its_reason
        "engine": "in-process",
    }))
    committed = NOTEBOOK.read_bytes()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # committed with the outputs of a real run: the tables and the plot show without running it
    kinds = {kind for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []) for kind in output.get("data", {})}
    assert {"text/markdown", "text/html", "image/png"} <= kinds
    for cell in notebook.cells:  # run an in-memory copy from scratch; the file is left as it is
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent.parent)}}).execute()
    assert (tmp_path / "runs" / "summary" / "table.md").exists()
    assert any(output.get("data", {}).get("image/png") for cell in notebook.cells
               if cell.cell_type == "code" for output in cell.outputs)
    assert NOTEBOOK.read_bytes() == committed


def test_table_and_architectures_from_runs():
    from fedapps.compare import Comparison, RunResult

    def run(label, seed, mean, archs=None, reported="after-finetune"):
        summary = {"rounds": 3, "reported": reported,
                   "before-finetune": {"mean": mean - 0.1, "sd": 0.05},
                   "after-finetune": {"mean": mean, "sd": 0.1}}
        if archs:
            summary["architectures"] = dict(enumerate(archs))
        return RunResult(label, seed, 10.0, Path("."), summary, [{"round": 1, "accuracy": 0.5}])

    result = Comparison(["a", "b", "c", "d"], [
        run("a", 0, 0.8, ["cnn1", "cnn2"]), run("a", 1, 0.6, ["cnn1", "cnn1"]),
        run("b", 0, 0.5, reported="before-finetune"),
        RunResult("c", 0, 1.0, error="RuntimeError: boom"),
        run("d", 0, 0.9), RunResult("d", 1, 1.0, error="DataError: bad file"),
    ])
    rows = {row["method"]: row for row in result.table.to_dict("records")}
    assert rows["a"]["accuracy"] == pytest.approx(70) and rows["a"]["accuracy-sd"] == 10
    assert rows["a"]["seed-sd"] == pytest.approx(14.142, abs=1e-3)
    assert rows["b"]["accuracy"] == pytest.approx(40)  # its reported field: before fine-tuning
    assert rows["c"]["runs"] == "0/1" and "boom" in rows["c"]["error"]
    assert rows["c"]["status"] == "1 of 1 FAILED" and math.isnan(rows["c"]["accuracy"])
    assert rows["a"]["status"] == "ok"
    # a failed seed is shown as failed and left out of the mean, never counted as a number
    assert rows["d"]["accuracy"] == pytest.approx(90) and rows["d"]["runs"] == "1/2"
    assert rows["d"]["status"] == "1 of 2 FAILED" and "seed 1: DataError" in rows["d"]["error"]
    assert "| 1/2 | 1 of 2 FAILED |" in result.to_markdown()
    archs = result.architectures().set_index("method")
    assert archs.loc["a", "cnn1"] == 1.5 and archs.loc["a", "cnn2-sd"] == 0.5
    assert list(result.curves["method"]) == ["a", "a", "b", "d"]
