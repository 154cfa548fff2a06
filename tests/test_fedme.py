"""FedMe pieces without Flower: clustering, exchange, eq. 8, DML loss, adoption."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedapps import training
from fedapps.config import RunConfig
from fedapps.data.federated import client_data
from fedapps.methods.fedme.client import train_mutual
from fedapps.methods.fedme.strategy import (
    Contribution,
    FedMe,
    aggregate_models,
    assign_exchange,
    cluster_inputs,
    cluster_models,
)
from fedapps.protocol.messages import config_record, new_model, to_arrays
from fedapps.training import Optim, mutual_learning_losses, train
from tests.helpers import as_server_task, context, message, reply_from


def test_well_separated_groups_are_found():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0] * 5, [10.0] * 5, [-10.0] * 5])
    features = np.concatenate([c + rng.normal(scale=0.1, size=(4, 5)) for c in centres])
    result = cluster_models(features, k=3, seed=0)
    assert result.used_k == 3 and not result.note
    groups = [set(result.labels[i * 4:(i + 1) * 4]) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_identical_models_cap_k_and_say_so():
    features = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    result = cluster_models(features, k=4, seed=0)
    assert result.used_k == 2  # never collapses to one cluster, never leaves one empty
    assert "capped to 2" in result.note
    assert len(set(result.labels[:3])) == 1 and result.labels[0] != result.labels[3]


def test_k_one_is_a_single_cluster():
    result = cluster_models(np.random.default_rng(0).normal(size=(5, 3)), k=1, seed=0)
    assert set(result.labels) == {0} and result.used_k == 1


def test_cluster_inputs_are_the_whole_pool_unless_a_smaller_sample_is_asked():
    pool = torch.arange(40.0).reshape(20, 2)
    assert cluster_inputs(pool, 0, seed=1) is pool
    assert cluster_inputs(pool, 20, seed=1) is pool and cluster_inputs(pool, 50, seed=1) is pool
    sample = cluster_inputs(pool, 5, seed=1)
    rows = {tuple(row.tolist()) for row in sample}
    assert sample.shape == (5, 2) and len(rows) == 5
    assert rows <= {tuple(row.tolist()) for row in pool}
    assert torch.equal(cluster_inputs(pool, 5, seed=1), sample)  # drawn from the seed alone
    assert not torch.equal(cluster_inputs(pool, 5, seed=2), sample)


def recording_pool_passes(monkeypatch, num_clients: int, **settings):
    """A FedMe strategy whose pool passes are recorded as (models, inputs) instead of run."""
    as_server_task()
    config = RunConfig(num_clients=num_clients, cluster_schedule="1:2", **settings)
    strategy = FedMe(config, {pid: 100 + pid for pid in range(num_clients)},
                     dict.fromkeys(range(num_clients), "cnn1"), torch.rand(20, 1, 8, 8))
    passes = []

    def predict_all(models, x, device):
        passes.append((len(models), len(x)))
        return [torch.randn(len(x), 10) for _ in models]

    monkeypatch.setattr(training, "predict_all", predict_all)
    return strategy, passes


def test_strategy_runs_the_models_on_the_sample_only(monkeypatch):
    strategy, passes = recording_pool_passes(monkeypatch, 4, cluster_pool_size=6)
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None))
    assert passes == [(4, 6)] and strategy.round_info["k"] == 2


def test_only_the_rounds_participants_are_clustered_and_paired(monkeypatch):
    strategy, passes = recording_pool_passes(monkeypatch, 10, fraction_train=0.3)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None))
    participants = sorted(m.metadata.dst_node_id - 100 for m in messages)
    assert passes == [(3, 20)] and len(participants) == 3
    assert sorted(int(p) for p in strategy.round_info["clusters"]) == participants
    assert set(strategy.partner) == set(participants)
    assert set(strategy.partner.values()) <= set(participants)


def test_exchange_stays_in_cluster_and_never_self():
    labels = np.array([0, 0, 0, 1, 1, 2])
    rng = np.random.default_rng(0)
    for _ in range(50):
        partners = assign_exchange(labels, rng)
        for i, j in enumerate(partners):
            assert i != j
            if i < 5:
                assert labels[i] == labels[j]
        assert labels[partners[5]] != 2  # the singleton gets a model from another cluster


def test_exchange_needs_two_clients():
    with pytest.raises(ValueError, match="at least two clients"):
        assign_exchange(np.array([0]), np.random.default_rng(0))


def test_eq8_is_the_exact_mean_per_model_across_architectures():
    a = {"w": torch.tensor([1.0, 2.0])}
    a_copy = {"w": torch.tensor([3.0, 6.0])}
    b = {"w": torch.tensor([[1.0, 1.0, 1.0]]), "b": torch.tensor([0.0])}
    b_copy1 = {"w": torch.tensor([[4.0, 4.0, 4.0]]), "b": torch.tensor([3.0])}
    b_copy2 = {"w": torch.tensor([[7.0, 7.0, 7.0]]), "b": torch.tensor([6.0])}
    merged = aggregate_models([
        Contribution(0, 0, a, 10), Contribution(0, 1, a_copy, 30),
        Contribution(1, 1, b, 1), Contribution(1, 0, b_copy1, 1), Contribution(1, 2, b_copy2, 1),
    ])
    assert torch.equal(merged[0]["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(merged[1]["w"], torch.tensor([[4.0, 4.0, 4.0]]))
    assert torch.equal(merged[1]["b"], torch.tensor([3.0]))
    weighted = aggregate_models([Contribution(0, 0, a, 10), Contribution(0, 1, a_copy, 30)],
                                weighting="samples")
    assert torch.allclose(weighted[0]["w"], torch.tensor([2.5, 5.0]))


def test_dml_loss_matches_the_formula():
    logits_p = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    logits_ex = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    labels = torch.tensor([0, 2])
    loss_p, loss_ex = mutual_learning_losses(logits_p, logits_ex, labels)
    p, q = logits_p.softmax(1), logits_ex.softmax(1)
    kl_q_p = (q * (q.log() - p.log())).sum(1).mean()  # KL(p_ex || p_p), per sample
    kl_p_q = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.isclose(loss_p, F.cross_entropy(logits_p, labels) + kl_q_p)
    assert torch.isclose(loss_ex, F.cross_entropy(logits_ex, labels) + kl_p_q)


def test_dml_peer_prediction_is_detached():
    logits_p = torch.randn(4, 3, requires_grad=True)
    logits_ex = torch.randn(4, 3, requires_grad=True)
    loss_p, _ = mutual_learning_losses(logits_p, logits_ex, torch.tensor([0, 1, 2, 0]))
    loss_p.backward()
    assert logits_ex.grad is None and logits_p.grad is not None


# ------------------------------------------------------------------- adoption rule


def mutual_message(config, personal, exchange, personal_arch, exchange_arch):
    content = RecordDict({
        "config": config_record(config),
        "fedme": ConfigRecord({"server-round": 1, "personal-arch": personal_arch,
                               "exchange-arch": exchange_arch}),
        "personal": to_arrays(personal),
        "exchange": to_arrays(exchange),
    })
    return message(content, "train.mutual")


def trained(config, arch, epochs):
    torch.manual_seed(0)
    model = new_model(arch, config)
    data = client_data(config, 0)
    train(model, data.train.x, data.train.y, epochs, Optim(lr=0.05),
          torch.Generator().manual_seed(0), torch.device("cpu"))
    return model


def test_client_adopts_a_strictly_better_exchange_model():
    # no DML steps: losses stay as given; no warm-up: the paper's rule from round 1
    config = RunConfig(num_clients=3, local_epochs=0, adoption_warmup=0.0)
    weak, strong = new_model("cnn1", config), trained(config, "cnn2", epochs=15)
    reply = train_mutual(mutual_message(config, weak, strong, "cnn1", "cnn2"),
                                context(0, 3))
    metrics = reply.content["metrics"]
    assert metrics["adopted"] == 1
    assert metrics["exchange-val-loss"] < metrics["val-loss"]


def test_client_keeps_its_model_on_a_tie():
    config = RunConfig(num_clients=3, local_epochs=0)
    model = trained(config, "cnn1", epochs=2)
    reply = train_mutual(mutual_message(config, model, model, "cnn1", "cnn1"),
                                context(0, 3))
    assert reply.content["metrics"]["adopted"] == 0


def fedme_reply(node, strategy, pid, adopted, scale, loss=0.5):
    """A reply carrying the client's two models multiplied by ``scale``."""
    own, other = strategy.models[pid], strategy.models[strategy.partner[pid]]
    return reply_from(node, RecordDict({
        "metrics": MetricRecord({"partition-id": pid, "num-examples": 10, "train-loss": loss,
                                 "adopted": int(adopted)}),
        "personal": ArrayRecord({k: v * scale for k, v in own.model.state_dict().items()}),
        "exchange": ArrayRecord({k: v * scale for k, v in other.model.state_dict().items()}),
    }))


def make_strategy(archs):
    as_server_task()
    config = RunConfig(num_clients=len(archs), cluster_schedule="1:1")
    nodes = {pid: 100 + pid for pid in range(len(archs))}
    strategy = FedMe(config, nodes, dict(enumerate(archs)),
                     torch.rand(20, 1, 8, 8))
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None))
    return strategy


def test_adopting_client_receives_the_aggregated_exchange_model():
    strategy = make_strategy(["cnn1", "cnn2", "cnn1"])
    partner = strategy.partner[0]
    before = {p: {k: v.clone() for k, v in m.model.state_dict().items()}
              for p, m in strategy.models.items()}
    replies = [fedme_reply(100 + p, strategy, p, adopted=(p == 0), scale=1.0) for p in range(3)]
    strategy.aggregate_train(1, replies)
    assert strategy.models[0].arch == strategy.models[partner].arch
    for name, value in strategy.models[0].model.state_dict().items():
        assert torch.allclose(value, strategy.models[partner].model.state_dict()[name])
    # the partner's model is the mean of identical copies, i.e. unchanged
    for name, value in strategy.models[partner].model.state_dict().items():
        assert torch.allclose(value, before[partner][name])
    assert strategy.round_info["adoptions"] == {"0": partner}


def test_missing_and_poisoned_replies_are_left_out():
    strategy = make_strategy(["cnn1", "cnn1", "cnn2"])
    before = {p: {k: v.clone() for k, v in m.model.state_dict().items()}
              for p, m in strategy.models.items()}
    bad = fedme_reply(101, strategy, 1, adopted=False, scale=1.0)
    bad.content["personal"] = to_arrays(new_model("cnn2", strategy.config))  # wrong shapes
    replies = [fedme_reply(100, strategy, 0, False, 3.0), bad]  # client 2 never replied
    strategy.aggregate_train(1, replies)
    assert "1" not in strategy.round_info["adoptions"]
    assert "do not match" in strategy.round_info["rejected"]["1"]
    for pid in (1, 2):  # no usable reply: the model is kept as it was
        for name, value in strategy.models[pid].model.state_dict().items():
            assert torch.equal(value, before[pid][name])
    assert not torch.equal(strategy.models[0].model.state_dict()["classifier.3.bias"],
                           before[0]["classifier.3.bias"])


def test_aggregation_does_not_depend_on_reply_order():
    """Same seed, same run: replies arriving in another order must give identical bits."""
    results = []
    for order in ([0, 1, 2], [2, 1, 0]):
        torch.manual_seed(0)
        strategy = make_strategy(["cnn1", "cnn1", "cnn1"])
        replies = [fedme_reply(100 + p, strategy, p, False, scale=1.0 + 0.1 * p,
                               loss=0.1 * (p + 1)) for p in order]
        strategy.aggregate_train(1, replies)
        results.append((strategy.round_info["train-loss"],
                        {p: m.model.state_dict() for p, m in strategy.models.items()}))
    (loss_a, models_a), (loss_b, models_b) = results
    assert loss_a == loss_b  # 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1 in floating point
    for pid, state in models_a.items():
        for name, value in state.items():
            assert torch.equal(value, models_b[pid][name]), (pid, name)
