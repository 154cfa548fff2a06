"""Privacy (docs/privacy.md): clipping and noise as sent, the accountant's epsilon, SecAgg+
against plain FedAvg, and settings that protect nothing refused before Flower starts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedapps import privacy
from fedapps.config import ConfigError, RunConfig
from fedapps.inprocess import InProcessGrid, run_in_process
from fedapps.methods.distill.averaging import HookedFedAvg
from fedapps.protocol.dp import CentralNoise, central_noise, privacy_mod
from fedapps.protocol.messages import config_record, new_model
from fedapps.protocol.results import read_rounds
from tests.helpers import (
    SECAGG_TOLERANCE,
    context,
    largest_difference,
    launch_in_process,
    library_epsilon,
    message,
)

SMALL = {"method": "fedavg", "num-clients": 3, "model": "cnn1", "local-epochs": 1,
         "finetune-epochs": 0}


def norm(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def difference(after, before) -> list[np.ndarray]:
    return [a.astype(np.float64) - b for a, b in zip(after, before)]


def model_arrays(config: RunConfig, seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(new_model(config.model, config).state_dict())


def moved(record: ArrayRecord, distance: float, seed: int) -> ArrayRecord:
    """``record`` plus a random update of L2 norm ``distance`` (what training might send)."""
    rng = np.random.default_rng(seed)
    arrays = record.to_numpy_ndarrays()
    update = [rng.normal(size=a.shape) for a in arrays]
    scale = distance / norm(update)
    return ArrayRecord({name: Array((a + scale * u).astype(a.dtype))
                        for name, a, u in zip(record.keys(), arrays, update)})


def train_reply(msg: Message, records: dict[str, ArrayRecord]) -> Message:
    return Message(RecordDict({**records, "metrics": MetricRecord({"num-examples": 10})}),
                   reply_to=msg)


# ------------------------------------------------------------------------------ mechanisms


def test_clipping_bounds_the_update_and_leaves_a_small_one_alone():
    rng = np.random.default_rng(0)
    received = [rng.normal(size=(30, 20)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    far = [a + 3.0 * rng.normal(size=a.shape).astype(np.float32) for a in received]
    clipped = privacy.clip_update(far, received, clip_norm=1.5)
    assert norm(difference(clipped, received)) == pytest.approx(1.5, rel=1e-5)
    assert all(c.dtype == np.float32 for c in clipped)
    direction = np.concatenate([d.ravel() for d in difference(far, received)])
    kept = np.concatenate([d.ravel() for d in difference(clipped, received)])
    assert np.dot(direction, kept) / (np.linalg.norm(direction) * np.linalg.norm(kept)) > 0.9999
    near = [a + 1e-3 for a in received]
    assert all(np.array_equal(c, n) for c, n in
               zip(privacy.clip_update(near, received, 1.5), near))


def test_noise_has_the_asked_sd_and_repeats_with_its_seed():
    zeros = [np.zeros((200, 100), np.float32), np.zeros(5000, np.float32)]
    noised = privacy.add_gaussian_noise(zeros, 0.3, torch.Generator().manual_seed(7))
    flat = np.concatenate([n.ravel() for n in noised])
    assert flat.std() == pytest.approx(0.3, rel=0.02) and abs(flat.mean()) < 0.01
    again = privacy.add_gaussian_noise(zeros, 0.3, torch.Generator().manual_seed(7))
    other = privacy.add_gaussian_noise(zeros, 0.3, torch.Generator().manual_seed(8))
    assert all(np.array_equal(a, b) for a, b in zip(noised, again))
    assert not np.array_equal(noised[0], other[0])


# ------------------------------------------------------------------- what clients send


def local_config(**extra) -> RunConfig:
    return RunConfig.from_mapping({**SMALL, "privacy.mode": "local",
                                   "privacy.noise-multiplier": 0.05, "privacy.clip-norm": 0.5,
                                   **extra})


def test_local_dp_sends_the_clipped_update_plus_noise_of_the_expected_sd():
    config = local_config()
    received = model_arrays(config, seed=1)
    msg = message(RecordDict({"arrays": received,
                              "config": config_record(config, **{"server-round": 3})}),
                  MessageType.TRAIN)
    trained = moved(received, distance=4.0, seed=2)
    reply = privacy_mod(msg, context(1, 3), lambda m, c: train_reply(m, {"arrays": trained}))
    sent = reply.content["arrays"].to_numpy_ndarrays()
    clipped = privacy.clip_update(trained.to_numpy_ndarrays(), received.to_numpy_ndarrays(), 0.5)
    noise = np.concatenate([d.ravel() for d in difference(sent, clipped)])
    assert noise.std() == pytest.approx(2 * 0.05 * 0.5, rel=0.03)  # z times 2C
    assert abs(noise.mean()) < 0.003
    same = privacy_mod(msg, context(1, 3), lambda m, c: train_reply(m, {"arrays": trained}))
    assert all(np.array_equal(a, b) for a, b in
               zip(same.content["arrays"].to_numpy_ndarrays(), sent))
    other_client = privacy_mod(msg, context(2, 3),
                               lambda m, c: train_reply(m, {"arrays": trained}))
    assert not np.array_equal(other_client.content["arrays"].to_numpy_ndarrays()[0], sent[0])


def test_local_dp_clips_both_fedme_models_together_and_noises_each():
    config = local_config(method="fedme")
    personal, exchange = model_arrays(config, seed=1), model_arrays(config, seed=2)
    msg = message(RecordDict({"personal": personal, "exchange": exchange,
                              "config": config_record(config, **{"server-round": 1})}),
                  "train.mutual")
    trained = {"personal": moved(personal, 3.0, seed=3), "exchange": moved(exchange, 4.0, seed=4)}
    reply = privacy_mod(msg, context(0, 3), lambda m, c: train_reply(m, trained))
    both_sent = [a for name in trained for a in trained[name].to_numpy_ndarrays()]
    both_received = [*personal.to_numpy_ndarrays(), *exchange.to_numpy_ndarrays()]
    clipped = privacy.clip_update(both_sent, both_received, 0.5)
    assert norm(difference(clipped, both_received)) == pytest.approx(0.5, rel=1e-5)
    sent = [*reply.content["personal"].to_numpy_ndarrays(),
            *reply.content["exchange"].to_numpy_ndarrays()]
    split = len(personal)
    for part in (slice(0, split), slice(split, None)):
        noise = np.concatenate([d.ravel() for d in difference(sent[part], clipped[part])])
        assert noise.std() == pytest.approx(2 * 0.05 * 0.5, rel=0.03)


def test_central_dp_clients_clip_with_flowers_mod_and_the_server_adds_the_noise():
    config = RunConfig.from_mapping({**SMALL, "privacy.mode": "central",
                                     "privacy.noise-multiplier": 0.8, "privacy.clip-norm": 0.5})
    received = model_arrays(config, seed=1)
    train_config = config_record(config, **{"server-round": 2})
    CentralNoise(config).ask_clients_to_clip(train_config)
    assert train_config[KEY_CLIPPING_NORM] == 0.5
    msg = message(RecordDict({"arrays": received, "config": train_config}), MessageType.TRAIN)
    replies = []
    for pid in range(3):
        trained = moved(received, distance=2.0 + pid, seed=pid)
        reply = privacy_mod(msg, context(pid, 3), lambda m, c, t=trained:
                            train_reply(m, {"arrays": t}))
        sent = reply.content["arrays"].to_numpy_ndarrays()
        assert norm(difference(sent, received.to_numpy_ndarrays())) == pytest.approx(0.5,
                                                                                      rel=1e-4)
        replies.append(reply)
    noised, sd = CentralNoise(config).noised_mean(2, replies)
    assert sd == pytest.approx(0.8 * 0.5 / 3)  # z C / m
    mean = np.mean([np.concatenate([a.ravel() for a in r.content["arrays"].to_numpy_ndarrays()])
                    for r in replies], axis=0)
    noise = np.concatenate([a.ravel() for a in noised.to_numpy_ndarrays()]) - mean
    assert noise.std() == pytest.approx(sd, rel=0.03)
    again, _ = CentralNoise(config).noised_mean(2, replies)
    assert all(np.array_equal(a, b) for a, b in
               zip(again.to_numpy_ndarrays(), noised.to_numpy_ndarrays()))


def test_the_averaging_server_hands_on_only_the_noised_average():
    """The async/sync schemes' hook (publishing to the distillation server) runs after the
    noise: it must never see the plain mean."""
    config = RunConfig.from_mapping({**SMALL, "method": "async-distill",
                                     "privacy.mode": "central", "privacy.noise-multiplier": 2.0})
    published = []
    strategy = HookedFedAvg({0: 1, 1: 2, 2: 3}, before=lambda r, arrays: arrays,
                            after=lambda r, arrays, info: published.append(arrays),
                            arch="cnn1", central_dp=central_noise(config))
    received = model_arrays(config, seed=1)
    messages = list(strategy.configure_train(1, received, config_record(config),
                                             InProcessGrid(3)))
    assert all(m.content["config"][KEY_CLIPPING_NORM] == 1.0 for m in messages)
    replies = [train_reply(m, {"arrays": moved(received, 0.5, seed=i)}) for i, m in
               enumerate(messages)]
    for pid, reply in enumerate(replies):
        reply.content["metrics"] = MetricRecord({"partition-id": pid, "num-examples": 10 + pid,
                                                 "train-loss": 1.0, "train-s": 0.1})
    strategy.aggregate_train(1, replies)
    expected, sd = CentralNoise(config).noised_mean(1, replies)
    [arrays] = published
    assert all(np.array_equal(a, b) for a, b in
               zip(arrays.to_numpy_ndarrays(), expected.to_numpy_ndarrays()))
    assert strategy.round_record()[privacy.NOISE_SD_KEY] == sd == pytest.approx(2.0 / 3)


# ------------------------------------------------------------------------------ accounting


def test_the_reported_epsilon_is_the_accountants():
    config = RunConfig.from_mapping({**SMALL, "num-clients": 20, "privacy.mode": "central",
                                     "privacy.noise-multiplier": 1.1, "privacy.delta": 1e-5})
    ledger = privacy.PrivacyLedger(config)
    for _ in range(40):
        ledger.record_round([0, 1, 2], {privacy.NOISE_SD_KEY: 0.1})
    ledger.record_round([0, 1, 2], {})  # a skipped round released nothing
    report = ledger.report()
    assert report["releases"] == 40
    assert report["epsilon"] == pytest.approx(library_epsilon(1.1, 40, 1e-5), rel=1e-9)
    # the classic RDP bound (Mironov 2017) is looser than the library's conversion, never tighter
    classic = min(40 * a / (2 * 1.1**2) + math.log(1 / 1e-5) / (a - 1) for a in range(2, 200))
    assert 10 < report["epsilon"] <= classic


def test_a_target_epsilon_is_met_by_the_calibrated_noise_and_local_dp_counts_each_client():
    config = RunConfig.from_mapping({**SMALL, "num-clients": 20, "num-rounds": 40,
                                     "privacy.mode": "local", "privacy.target-epsilon": 4.0})
    z = privacy.noise_multiplier(config)
    assert 3.99 < library_epsilon(z, 40, 1e-5) <= 4.0
    ledger = privacy.PrivacyLedger(config)
    for server_round in range(40):
        ledger.record_round([0, 1] if server_round % 2 else [0], {})
    report = ledger.report()
    assert report["releases"] == 40  # client 0, asked every round; client 1 only 20 times
    assert report["epsilon"] == pytest.approx(library_epsilon(z, 40, 1e-5), rel=1e-9)


# ------------------------------------------------------------------------------ refusals

BAD = [
    ({"method": "fedme", "privacy.mode": "central"},
     "privacy.mode='central' is not possible with method 'fedme'"),
    ({"method": "fedme", "privacy.secagg": 1}, "privacy.secagg=1 is not possible with method"),
    ({"method": "hypcluster", "privacy.mode": "local"}, "privacy.mode='local' is not possible"),
    ({"method": "local", "privacy.mode": "local"}, "privacy.mode='local' is not possible"),
    ({"method": "fedavg", "privacy.mode": "central", "privacy.noise-multiplier": 0.0},
     "privacy.noise-multiplier=0 with privacy.mode='central' adds no noise"),
    ({"method": "fedavg", "privacy.mode": "local", "privacy.delta": 1.0},
     "privacy.delta=1.0: must be < 1"),
    ({"method": "fedavg", "privacy.mode": "local", "privacy.delta": 0.2},
     "privacy.delta=0.2 >= 1/num-clients"),
    ({"method": "fedavg", "privacy.mode": "local", "privacy.clip-norm": 0.0},
     "privacy.clip-norm=0.0: must be > 0"),
    ({"method": "fedavg", "privacy.clip-norm": 2.0},
     "privacy.clip-norm=2.0 has no effect with privacy.mode='none'"),
    ({"method": "fedavg", "privacy.secagg-threshold": 0.9},
     "privacy.secagg-threshold=0.9 has no effect with privacy.secagg=0"),
    ({"method": "fedavg", "privacy.mode": "local", "privacy.target-epsilon": 4.0,
      "privacy.noise-multiplier": 3.0}, "privacy.noise-multiplier and privacy.target-epsilon"),
    ({"method": "fedavg", "privacy.secagg": 1, "num-clients": 4, "fraction-train": 0.25},
     "privacy.secagg=1 needs at least 2 clients in every round"),
    ({"method": "fedavg", "privacy.mode": "secret"}, "privacy.mode='secret' is not known"),
]


@pytest.mark.parametrize(("values", "message_start"), BAD)
def test_settings_that_cannot_protect_are_one_line_errors(values, message_start):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping(values)
    assert str(error.value).startswith(message_start)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("values", "message_start"), BAD[:2] + BAD[4:5])
def test_the_launcher_refuses_them_with_exit_2_before_flower_starts(values, message_start,
                                                                    monkeypatch, capsys):
    overrides = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    code, started = launch_in_process(overrides, monkeypatch)
    out, err = capsys.readouterr()
    assert (code, started) == (2, [])
    assert err.strip() == err.strip().splitlines()[0]
    assert err.startswith(f"error: {message_start}")
    assert out == ""


# ------------------------------------------------------------------------------ whole runs


def test_secagg_fedavg_equals_plain_fedavg_within_quantization(tmp_path):
    """In process; SecAgg+ through ``flwr run`` is
    test_exit_status::test_two_launches_side_by_side_..."""
    settings = {**SMALL, "num-rounds": 1, "checkpoint-every": 1, "results-dir": str(tmp_path)}
    plain = run_in_process(settings)
    secure = run_in_process({**settings, "privacy.secagg": 1})
    assert 0 < largest_difference(plain, secure) < SECAGG_TOLERANCE
    [plain_round], [secure_round] = read_rounds(plain), read_rounds(secure)
    assert secure_round["replies"] == 3
    assert secure_round["train-loss"] == pytest.approx(plain_round["train-loss"])
    summary = json.loads((secure / "summary.json").read_text())
    assert summary["privacy"] == {"mode": "none", "secagg": 1}


def test_fedavg_with_central_dp_end_to_end(tmp_path, capsys):
    """In process; the Flower path of central DP (Flower's strategy wrapper and clipping mod
    through ``flwr run``) is test_exit_status::test_two_launches_side_by_side_..."""
    folder = run_in_process({**SMALL, "num-rounds": 2, "results-dir": str(tmp_path),
                             "privacy.mode": "central", "privacy.noise-multiplier": 0.7})
    rows = read_rounds(folder)
    assert [row[privacy.NOISE_SD_KEY] for row in rows] == [pytest.approx(0.7 * 1.0 / 3)] * 2
    report = json.loads((folder / "privacy.json").read_text())
    assert report["releases"] == 2
    assert report["epsilon"] == pytest.approx(library_epsilon(0.7, 2, 1e-5), rel=1e-9)
    assert json.loads((folder / "summary.json").read_text())["privacy"] == report
    assert f"central DP: epsilon {report['epsilon']:.3g} at delta 1e-05" in capsys.readouterr().out


def test_fedme_with_local_dp_end_to_end(tmp_path):
    """FedMe's server and client halves with their mods, in-process (the Flower path of the
    mods is the central-DP test's)."""
    folder = run_in_process({**SMALL, "method": "fedme", "num-rounds": 2, "unlabeled-size": 100,
                       "fedme.init-arch": "cnn1,cnn2,cnn1", "results-dir": str(tmp_path),
                       "privacy.mode": "local", "privacy.target-epsilon": 8.0})
    report = json.loads((folder / "privacy.json").read_text())
    assert report["mode"] == "local" and report["releases"] == 2
    assert report["epsilon"] == pytest.approx(8.0, rel=1e-3)  # calibrated for num-rounds = 2
    assert [set(row["exchange"]) for row in read_rounds(folder)] == [{"0", "1", "2"}] * 2
