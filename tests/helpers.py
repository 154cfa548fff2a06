"""Building Flower messages and contexts outside a run, for handler and strategy tests."""

from __future__ import annotations

from types import SimpleNamespace

import dp_accounting
import torch
from dp_accounting import rdp
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedapps import launch
from fedapps.config import exit_on_bad_input
from fedapps.protocol.results import read_rounds


def as_server_task() -> None:
    """Flower only builds messages inside a run; tests pose as run 1's server."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def message(content: RecordDict, message_type: str, node: int = 1) -> Message:
    as_server_task()
    return Message(content=content, message_type=message_type, dst_node_id=node)


def context(partition_id: int, num_partitions: int) -> Context:
    node_config = {"partition-id": partition_id, "num-partitions": num_partitions}
    return Context(run_id=1, node_id=partition_id, node_config=node_config,
                   state=RecordDict(), run_config={})


def comparable_rounds(folder) -> list[dict]:
    """A run's round records without timings: what a resumed run must reproduce exactly."""
    return [{k: v for k, v in row.items() if k != "time" and not k.endswith("-s")}
            for row in read_rounds(folder)]


def reply_from(node: int, content: RecordDict, error: str | None = None) -> SimpleNamespace:
    """What a strategy reads from a reply: sender, content, error."""
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node),
        content=content,
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
    )


def launch_in_process(argv: list[str], monkeypatch) -> tuple[int, list]:
    """``python -m fedapps.launch ARGV`` in this process, as its ``__main__`` runs it (argparse
    and bad-input exits included) but with Flower's start recorded instead of run: the exit
    status and what would have started. One subprocess test per command covers the wiring."""
    started: list = []
    monkeypatch.setattr(launch, "start_run", lambda *args: started.append(args))
    monkeypatch.setattr(launch, "flwr_environment", lambda *args: started.append(args))

    def main() -> int:
        try:
            return launch.main(argv)
        except SystemExit as stop:  # argparse's exit
            return int(stop.code)

    return exit_on_bad_input(main), started


def library_epsilon(z: float, releases: int, delta: float) -> float:
    """dp-accounting's own answer, without Flower's wrapper or ours."""
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_accounting.GaussianDpEvent(z), releases)
    return accountant.get_epsilon(delta)


# Flower's SecAgg+ quantizes to 2^22 levels over [-8, 8] (steps of 3.8e-6): a secure sum is close
# to the plain one but not the same numbers, which shows that it really ran
SECAGG_TOLERANCE = 2e-5


def largest_difference(first, second) -> float:
    """The largest difference between two runs' final models (their ``checkpoint.pt``)."""
    arrays = [torch.load(folder / "checkpoint.pt", weights_only=False)["arrays"]
              for folder in (first, second)]
    return max(float((a - b).abs().max()) for a, b in zip(*(x.values() for x in arrays)))
