"""Distillation server and scheme pieces that need no Flower run (fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedapps.config import ConfigError, RunConfig
from fedapps.data.federated import client_data, dataset_for, partition_for
from fedapps.methods.distill.averaging import HookedFedAvg
from fedapps.methods.distill.budget import ORIGIN
from fedapps.methods.distill.channel import DirectoryChannel
from fedapps.methods.distill.distillation import (
    Distiller,
    GlobalLog,
    global_summary,
    initial_small_state,
    read_log,
    serve,
    server_data,
)
from fedapps.training import predict, soft_kl
from tests.helpers import as_server_task, reply_from

FAST = {"method": "async-distill", "model": "cnn-small", "distill.global-model": "cnn2",
        "num-clients": 3, "distill.epochs": 3,
        "distill.lr": 0.05, "unlabeled-size": 300}


def config(**changes) -> RunConfig:
    named = {RunConfig.model_fields[name].alias: value for name, value in changes.items()}
    return RunConfig.from_mapping({**FAST, **named})


def kl_to(distiller: Distiller, teacher_state) -> float:
    x = distiller.unlabeled
    teacher = predict(distiller.small(teacher_state), x, distiller.device)
    student = predict(distiller.model, x, distiller.device)
    return float(soft_kl(student, teacher, distiller.config.distill_temperature))


def trained_teacher(cfg: RunConfig):
    """A small model with confident, input-dependent outputs: fitted to the test labels."""
    distiller = Distiller(cfg)
    small = distiller.small(initial_small_state(cfg))
    optimizer = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(small(distiller.test_x), distiller.test_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return small.state_dict()


def test_reverse_distillation_lowers_kl_between_student_and_teacher():
    cfg = config(global_model="cnn-large")
    teacher = trained_teacher(cfg)
    distiller = Distiller(cfg)
    before = kl_to(distiller, teacher)
    for step in range(1, 4):
        distiller.reverse(teacher, step)
    after = kl_to(distiller, teacher)
    assert after < 0.5 * before, (before, after)


def test_forward_distillation_moves_the_small_model_towards_the_global_one():
    cfg = config()
    distiller = Distiller(cfg)
    small = initial_small_state(cfg)
    x = distiller.unlabeled
    target = predict(distiller.model, x, distiller.device)

    def kl(state) -> float:
        return float(soft_kl(predict(distiller.small(state), x, distiller.device), target, 2.0))

    assert kl(distiller.forward(small, 1)) < kl(small)


def test_distillation_server_stops_after_the_final_model_and_resumes_from_its_checkpoint(
    tmp_path,
):
    cfg = config(distill_mode="per-round", channel_dir=str(tmp_path / "channel"))
    channel = DirectoryChannel(cfg.channel_dir)
    teacher = trained_teacher(cfg)
    channel.publish("distilled", teacher, version=1)
    channel.publish("distilled", teacher, version=2)
    channel.publish("stop", {}, version=2)
    log = GlobalLog(tmp_path / "global.jsonl")
    result = serve(cfg, channel, log)
    assert (result["distillation-passes"], result["distilled-version"]) == (1, 2)
    assert result["distillation-stopped-by"] == "final-model"
    assert channel.latest_version("forward") == 0  # the initial small model, published once
    origin = channel.latest("forward").meta[ORIGIN]
    assert channel.latest("global").meta == {"distilled-version": 2, ORIGIN: origin}
    first = read_log(log.path)
    # restart: continues from the global checkpoint (same accuracy), then distils once more
    result = serve(cfg, channel, log)
    assert (result["distillation-passes"], result["distilled-version"]) == (2, 2)
    assert channel.latest("global").meta[ORIGIN] == origin  # still the experiment's origin
    rows = read_log(log.path)
    assert rows[len(first)]["accuracy"] == pytest.approx(first[-1]["accuracy"])
    assert channel.latest_version("global") == 2 and channel.latest_version("forward") == 0


def serve_one_model_with_forward_passes(tmp_path) -> DirectoryChannel:
    """One averaged model, then stop; a forward-distillation pass after every pass."""
    cfg = config(distill_mode="per-round", forward_distill_every=1, distill_epochs=1,
                 channel_dir=str(tmp_path))
    channel = DirectoryChannel(tmp_path)
    channel.publish("distilled", initial_small_state(cfg), version=1)
    channel.publish("stop", {}, version=1)
    serve(cfg, channel, GlobalLog(tmp_path / "global.jsonl"))
    return channel


def test_forward_models_are_offered_every_n_passes(tmp_path):
    channel = serve_one_model_with_forward_passes(tmp_path)
    offered = channel.latest("forward")
    assert offered.version == 1 and offered.meta["based-on"] == 1


@pytest.mark.parametrize("first_step", [1, 0])
def test_first_small_model_is_the_forward_distilled_global_model_unless_skipped(
    tmp_path, first_step
):
    cfg = config(distill_mode="per-round", initial_forward_distill=first_step,
                 channel_dir=str(tmp_path))
    channel = DirectoryChannel(tmp_path)
    channel.publish("distilled", initial_small_state(cfg), version=1)
    channel.publish("stop", {}, version=1)
    serve(cfg, channel, GlobalLog(tmp_path / "global.jsonl"))
    first, fresh = channel.latest("forward"), initial_small_state(cfg)
    assert first.version == 0 and first.meta["based-on"] == 0
    initial_global = Distiller(cfg)  # the same seeded initial global model
    x = initial_global.unlabeled
    target = predict(initial_global.model, x, initial_global.device)

    def kl(state) -> float:
        outputs = predict(initial_global.small(state), x, initial_global.device)
        return float(soft_kl(outputs, target, 2.0))

    if first_step:
        assert kl(first.state) < kl(fresh)
    else:
        assert all(torch.equal(first.state[k], fresh[k]) for k in fresh)


SENT = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def train_reply(node: int, pid: int, w: torch.Tensor):
    metrics = MetricRecord({"partition-id": pid, "num-examples": 10, "train-loss": 1.0,
                            "train-s": 0.5})
    return reply_from(node, RecordDict({"arrays": ArrayRecord({"w": w, "b": torch.ones(2)}),
                                        "metrics": metrics}))


def averaging_round(min_replies: int):
    """One aggregation of the averaging server: a good reply, NaNs, a wrong shape, an error."""
    as_server_task()
    rounds = []
    strategy = HookedFedAvg({0: 11, 1: 12, 2: 13, 3: 14}, lambda r, arrays: arrays,
                            lambda *row: rounds.append(row), "cnn-small", min_replies=min_replies)
    strategy.sent = ArrayRecord(SENT)
    strategy.aggregate_train(5, [
        train_reply(11, 0, torch.ones(2, 2)),
        train_reply(12, 1, torch.full((2, 2), float("nan"))),
        train_reply(13, 2, torch.ones(3, 2)),
        reply_from(14, RecordDict(), error="Traceback ...\nRuntimeError: out of memory"),
    ])
    return rounds


def test_averaging_server_rejects_nan_and_misshapen_replies_and_averages_the_rest():
    [(server_round, arrays, info)] = averaging_round(min_replies=1)
    assert server_round == 5
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.ones(2, 2))
    assert info["replies"] == 1 and set(info["rejected"]) == {"1", "2", "3"}
    assert "NaN" in info["rejected"]["1"]
    assert "'w' has shape (3, 2), expected (2, 2)" in info["rejected"]["2"]
    assert info["rejected"]["3"] == "client error: RuntimeError: out of memory"


def test_averaging_round_with_too_few_usable_replies_is_skipped():
    [(_, arrays, info)] = averaging_round(min_replies=2)
    assert arrays is None and "1 usable replies < min-replies=2" in info["skipped"]


def test_global_summary_reports_time_to_target():
    rows = [{"time": 0.0, "accuracy": 0.1}, {"time": 2.5, "accuracy": 0.86},
            {"time": 4.0, "accuracy": 0.84}]
    summary = global_summary(rows, 0.85)
    assert summary["time-to-target-s"] == 2.5
    assert summary["global-accuracy"] == 0.84 and summary["best-global-accuracy"] == 0.86
    assert global_summary(rows, 0.9)["time-to-target-s"] is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"distill.mode": "eager"}, "distill.mode='eager' is not known; allowed: per-round"),
        ({"distill.global-model": "huge"}, "distill.global-model='huge' is not known"),
        ({"distill.channel-backend": "redis"},
         "distill.channel-backend='redis' is not known; allowed: directory"),
        ({"distill.temperature": 0}, "distill.temperature=0: must be > 0"),
        ({"distill.forward-distill-every": -1}, "distill.forward-distill-every=-1: must be >= 0"),
        ({"distill.target-accuracy": 1.5}, "distill.target-accuracy=1.5: must be <= 1"),
        ({"method": "async-averaging"}, "needs distill.channel-dir"),
        ({"method": "async-distillation"}, "needs distill.channel-dir"),
        ({"distill.initial-forward-distill": 2},
         "distill.initial-forward-distill=2 is not known; allowed: 0, 1"),
    ],
)
def test_bad_distillation_keys_are_rejected_with_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(changes)


def test_server_tests_the_global_model_on_its_own_held_out_share_of_its_pool():
    cfg = config(unlabeled_size=300, global_test_fraction=0.4)
    data = server_data(cfg)
    pool = dataset_for(cfg.dataset).x[partition_for(cfg).unlabeled]
    assert (len(data.test_y), len(data.distill)) == (120, 180)
    rows = {row.tobytes() for row in pool}
    assert {x.numpy().tobytes() for x in data.test_x} <= rows
    assert {x.numpy().tobytes() for x in data.distill} <= rows
    assert not {x.numpy().tobytes() for x in data.test_x} & {
        x.numpy().tobytes() for x in data.distill}


def test_global_test_on_the_clients_is_the_union_of_their_test_splits():
    cfg = config(global_test="clients")
    data = server_data(cfg)
    tests = [client_data(cfg, pid).test for pid in range(3)]
    assert torch.equal(data.test_y, torch.cat([t.y for t in tests]))
    assert len(data.distill) == 300  # the whole pool is distilled on


def test_a_pool_too_small_to_split_is_a_clear_error():
    with pytest.raises(ValueError, match="distill.global-test-fraction=0.01 of the server's "
                       "pool of 20 samples leaves no test sample; raise unlabeled-size"):
        server_data(config(unlabeled_size=20, global_test_fraction=0.01))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_snapshots_follow_the_time_grid_and_are_tested_after_the_run(tmp_path):
    cfg = config()
    distiller, clock = Distiller(cfg), FakeClock()
    log = GlobalLog(tmp_path / "global.jsonl", t0=100.0, every=1.0, clock=clock)
    log.begin(distiller.model, 0, 0)
    step = log.watcher(version=3, passes=1)
    for t in (0.2, 0.6, 1.1, 1.5, 1.9, 2.3, 4.7, 4.8):  # steps of one pass
        clock.now = 100.0 + t
        step(distiller.model)
    clock.now = 105.0
    log.settle(distiller.model, 3, 1)  # end of a pass; the server then waits
    log.settle(distiller.model, 3, 1)  # nothing changed since: nothing more to keep
    log.finish(distiller.model, 3, 1)  # the run ends: the resting model is the last snapshot
    assert list(read_log(log.path)) == []  # nothing tested while the run goes on
    assert log.test_snapshots(distiller)["snapshots-tested"] == 5
    rows = read_log(log.path)
    assert [r["time"] for r in rows] == [0.0, 1.1, 2.3, 4.7, 5.0]
    assert [r["version"] for r in rows] == [0, 3, 3, 3, 3]
    assert rows[0]["accuracy"] == distiller.evaluate().accuracy
    assert not list((tmp_path / "snapshots").glob("*.pt"))


def test_every_pass_is_timed_for_the_breakdown(tmp_path):
    serve_one_model_with_forward_passes(tmp_path)
    passes = read_log(tmp_path / "passes.jsonl")
    assert [(p["kind"], p["version"]) for p in passes] == [("reverse", 1), ("forward", 1)]
    assert all(p["end"] >= p["start"] for p in passes)


def benchmark_module():
    """benchmarks/async_distill.py, imported by path (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "async_distill.py"
    spec = importlib.util.spec_from_file_location("async_distill_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_target_and_its_resolution():
    bench = benchmark_module()
    run = {"points": [(0.0, 0.1), (4.0, 0.3), (9.0, 0.5), (10.0, 0.7)],
           "passes": [{"kind": "reverse", "start": 3.0, "end": 4.0},
                      {"kind": "reverse", "start": 8.0, "end": 10.0}],
           "rounds": [{"time": 5.0, "client-train-s": 4.0}, {"time": 10.0, "client-train-s": 4.0}]}
    # reached at 9 s; the model was last seen at 4 s but only changes from 8 s (the pass start)
    assert bench.time_to(run, 0.5) == (9.0, 1.0)
    assert bench.time_to(run, 0.3) == (4.0, 1.0)
    assert bench.time_to(run, 0.9) == (None, None)
    assert bench.breakdown(run) == {
        "end-s": 10.0, "rounds-end-s": 10.0, "s-per-round": 5.0, "client-train-s": 8.0,
        "distill-s": 3.0, "clients-wait-s": 2.0, "server-idle-s": 7.0}
