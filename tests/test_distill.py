"""Distillation server and scheme pieces that need no Flower run (fast)."""

from __future__ import annotations

import pytest
import torch

from fedapps.config import ConfigError, RunConfig
from fedapps.distill.channel import DirectoryChannel
from fedapps.distill.distillation import (
    Distiller,
    GlobalLog,
    global_summary,
    initial_small_state,
    read_log,
    serve,
)
from fedapps.training import predict, soft_kl

FAST = {"model": "cnn-small", "global-model": "cnn2", "num-clients": 3, "distill-epochs": 3,
        "distill-lr": 0.05, "unlabeled-size": 300}


def config(**changes) -> RunConfig:
    return RunConfig.from_mapping({**FAST, **changes})


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
    assert serve(cfg, channel, log) == {"distillation-passes": 1, "distilled-version": 2}
    assert channel.latest_version("forward") == 0  # the initial small model, published once
    assert channel.latest("global").meta == {"distilled-version": 2}
    first = read_log(log.path)
    # restart: continues from the global checkpoint (same accuracy), then distils once more
    assert serve(cfg, channel, log) == {"distillation-passes": 2, "distilled-version": 2}
    rows = read_log(log.path)
    assert rows[len(first)]["accuracy"] == pytest.approx(first[-1]["accuracy"])
    assert channel.latest_version("global") == 2 and channel.latest_version("forward") == 0


def test_forward_models_are_offered_every_n_passes(tmp_path):
    cfg = config(distill_mode="per-round", forward_distill_every=1, distill_epochs=1,
                 channel_dir=str(tmp_path))
    channel = DirectoryChannel(tmp_path)
    channel.publish("distilled", initial_small_state(cfg), version=1)
    channel.publish("stop", {}, version=1)
    serve(cfg, channel, GlobalLog(tmp_path / "global.jsonl"))
    offered = channel.latest("forward")
    assert offered.version == 1 and offered.meta == {"based-on": 1}


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
        ({"distill-mode": "eager"}, "distill-mode='eager' is not known; allowed: per-round"),
        ({"global-model": "huge"}, "global-model='huge' is not known"),
        ({"channel-backend": "redis"}, "channel-backend='redis' is not known; allowed: directory"),
        ({"distill-temperature": 0}, "distill-temperature=0.0: must be > 0"),
        ({"forward-distill-every": -1}, "forward-distill-every=-1: must be >= 0"),
        ({"target-accuracy": 1.5}, "target-accuracy=1.5: must be in"),
        ({"method": "async-averaging"}, "needs channel-dir"),
        ({"method": "async-distillation"}, "needs channel-dir"),
    ],
)
def test_bad_distillation_keys_are_rejected_with_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(changes)
