"""The end of every run, both halves: each client tests (and fine-tunes) its final model.

Server: :func:`finetune_clients` sends each client its final model (or, for local-only, asks it to
train alone) and :func:`finetune_summary` reduces the answers. Client: :func:`evaluate` (a test,
used by the per-round curves) and :func:`finetune` (before/after ``finetune-epochs`` of plain CE).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedapps import training
from fedapps.config import RunConfig
from fedapps.protocol.discovery import ClientFailure
from fedapps.protocol.engine import log_errors, silent_clients
from fedapps.protocol.messages import config_record, from_arrays, in_partition_order
from fedapps.protocol.node import arch_of, eval_metrics, generator, optim_of, reply, setup
from fedapps.protocol.results import client_summary

# What a method hands to the end-of-run evaluation: each client's architecture and arrays.
FinalModels = Mapping[int, tuple[str, ArrayRecord]]


def per_client(replies: Iterable[Message], key: str) -> dict[int, float]:
    """``{partition id: metric}`` from the replies that carry it (errors are skipped: the
    round engine logs them with the client's partition)."""
    values = {}
    for answer in in_partition_order(replies):
        if answer.has_error():
            continue
        metrics = answer.content["metrics"]
        if key in metrics:
            values[int(metrics["partition-id"])] = float(metrics[key])
    return values


def finetune_clients(grid: Grid, config: RunConfig, clients: Mapping[int, Mapping[str, Any]],
                     final: FinalModels | None) -> dict[int, dict[str, float]]:
    """Each client fine-tunes and tests its final model (``final=None``: trains alone)."""
    messages = []
    for pid, info in sorted(clients.items()):
        content = RecordDict({"config": config_record(config)})
        if final is None:
            message_type = MessageType.TRAIN + ".local"
        else:
            arch, arrays = final[pid]
            content["model"] = ConfigRecord({"arch": arch})
            content["arrays"] = arrays
            message_type = MessageType.EVALUATE + ".finetune"
        messages.append(
            Message(content=content, message_type=message_type, dst_node_id=info["node"])
        )
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    node_of = {pid: info["node"] for pid, info in clients.items()}
    silent_clients("final evaluation", messages, replies, node_of, config.round_timeout)
    log_errors("final evaluation", replies, node_of)
    before, after = per_client(replies, "before-accuracy"), per_client(replies, "after-accuracy")
    tested = per_client(replies, "num-examples")
    return {
        pid: {"before": before[pid], "after": after[pid], "num-test": int(tested[pid])}
        for pid in sorted(after)
    }


def finetune_summary(accuracies: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """Mean/SD over clients before and after fine-tuning, plus each client's figures."""
    sizes = {pid: int(a["num-test"]) for pid, a in accuracies.items()}
    return {
        "before-finetune": client_summary({p: a["before"] for p, a in accuracies.items()}, sizes),
        "after-finetune": client_summary({p: a["after"] for p, a in accuracies.items()}, sizes),
        "clients": {str(p): dict(a) for p, a in sorted(accuracies.items())},
    }


def final_evaluation(grid: Grid, config: RunConfig, clients: Mapping[int, Mapping[str, Any]],
                     final: FinalModels | None) -> dict[str, Any]:
    """:func:`finetune_clients` then :func:`finetune_summary`: what every method ends with.

    The figures of a run are these answers: none at all fails the run; clients that did not
    answer are named in the summary (``missing-clients``), never silently left out."""
    accuracies = finetune_clients(grid, config, clients, final)
    if not accuracies:
        raise ClientFailure("final evaluation: no client returned a test result (their errors "
                            "are logged above)")
    summary = finetune_summary(accuracies)
    if missing := sorted(set(clients) - set(accuracies)):
        summary["missing-clients"] = missing
        print(f"fedapps: warning: the final figures leave out client(s) {missing}, which did "
              "not answer the final evaluation", flush=True)
    return summary


# ------------------------------------------------------------------------------ client half


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model in the message on this client's test split."""
    config, pid, data, device = setup(msg, context)
    model = from_arrays(arch_of(msg, config), msg.content["arrays"], config)
    result = training.evaluate(model, data.test.x, data.test.y, device)
    return reply(msg, {"partition-id": pid, "num-examples": result.num_examples,
                       **eval_metrics("test", result)})


def finetune(msg: Message, context: Context) -> Message:
    """End of training: test accuracy before and after ``finetune-epochs`` of plain CE."""
    config, pid, data, device = setup(msg, context)
    model = from_arrays(arch_of(msg, config), msg.content["arrays"], config)
    before = training.evaluate(model, data.test.x, data.test.y, device)
    training.train(model, data.train.x, data.train.y, config.finetune_epochs, optim_of(config),
                   generator(config, "finetune", pid), device)
    after = training.evaluate(model, data.test.x, data.test.y, device)
    return reply(msg, {"partition-id": pid, "num-examples": after.num_examples,
                       **eval_metrics("before", before), **eval_metrics("after", after)})


HANDLERS = {("evaluate", ""): evaluate, ("evaluate", "finetune"): finetune}
