"""FedMe's structure tuning: the local-best choice, the adoption rules and what a round logs."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedapps import training
from fedapps.config import ConfigError, RunConfig
from fedapps.data.federated import Split
from fedapps.methods.fedme.strategy import FedMe
from fedapps.training import EvalResult, Optim
from fedapps.tuning import (
    AdoptionRule,
    CandidateResult,
    best_candidate,
    choose_local_best,
    pair_gains,
    pooled_choice,
    smooth_evidence,
    train_with_early_stopping,
)
from tests.helpers import as_server_task, reply_from

SMALL_BUT_WORSE = EvalResult(loss=0.9, accuracy=0.70, num_examples=100)
LARGE_AND_BETTER = EvalResult(loss=0.4, accuracy=0.90, num_examples=100)


@pytest.mark.parametrize("rule", ["loss", "accuracy"])
def test_a_clearly_better_model_is_adopted(rule):
    assert AdoptionRule(rule).adopt(SMALL_BUT_WORSE, LARGE_AND_BETTER, False, server_round=1)
    assert not AdoptionRule(rule).adopt(LARGE_AND_BETTER, SMALL_BUT_WORSE, False, 1)


@pytest.mark.parametrize("rule", ["loss", "accuracy"])
def test_ties_keep_the_current_model(rule):
    assert not AdoptionRule(rule).adopt(LARGE_AND_BETTER, LARGE_AND_BETTER, False, 1)


def test_accuracy_rule_ignores_a_lower_loss_at_equal_accuracy():
    """Larger models are often less calibrated: same accuracy, higher loss must not lose."""
    confident = EvalResult(loss=0.3, accuracy=0.8, num_examples=100)
    calibrated_less = EvalResult(loss=0.6, accuracy=0.8, num_examples=100)
    assert not AdoptionRule("accuracy").adopt(calibrated_less, confident, False, 1)
    assert AdoptionRule("loss").adopt(calibrated_less, confident, False, 1)


def test_margin_demands_a_clear_difference():
    slightly = EvalResult(loss=0.85, accuracy=0.72, num_examples=100)
    assert not AdoptionRule("loss", margin=0.1).adopt(SMALL_BUT_WORSE, slightly, False, 1)
    assert AdoptionRule("loss", margin=0.1).adopt(SMALL_BUT_WORSE, LARGE_AND_BETTER, False, 1)
    assert not AdoptionRule("accuracy", margin=0.05).adopt(SMALL_BUT_WORSE, slightly, False, 1)


def test_warmup_blocks_structure_changes_only():
    rule = AdoptionRule("loss", warmup=5)
    assert not rule.adopt(SMALL_BUT_WORSE, LARGE_AND_BETTER, same_arch=False, server_round=5)
    assert rule.adopt(SMALL_BUT_WORSE, LARGE_AND_BETTER, same_arch=True, server_round=5)
    assert rule.adopt(SMALL_BUT_WORSE, LARGE_AND_BETTER, same_arch=False, server_round=6)


@pytest.mark.parametrize(("share", "num_rounds", "rounds"),
                         [(0.25, 100, 25), (0.25, 40, 10), (0.25, 20, 5), (0.0, 100, 0)])
def test_the_warmup_is_a_share_of_the_run(share, num_rounds, rounds):
    config = RunConfig.from_mapping({"num-rounds": num_rounds, "fedme.adoption-warmup": share})
    assert AdoptionRule.of(config).warmup == rounds


def test_a_warmup_in_rounds_is_refused_with_the_share_it_means():
    with pytest.raises(ConfigError, match=r"fedme.adoption-warmup=25: must be < 1"):
        RunConfig.from_mapping({"fedme.adoption-warmup": 25})


def test_population_evidence_cancels_the_home_advantage():
    """Every client prefers its own model by 0.2; cnn2 is truly 0.1 better than cnn1."""
    comparisons = [("cnn1", "cnn2", -0.2 + 0.1)] * 3 + [("cnn2", "cnn1", -0.2 - 0.1)] * 2
    comparisons += [("cnn2", "cnn2", 0.5), ("cnn1", "cnn3", 0.4)]  # no evidence: same / one-way
    assert pair_gains(comparisons) == pytest.approx({("cnn1", "cnn2"): 0.1})


def test_evidence_is_smoothed_over_rounds():
    first = smooth_evidence({}, {("cnn1", "cnn2"): 0.1})
    assert first == {("cnn1", "cnn2"): 0.1}
    later = smooth_evidence(first, {("cnn1", "cnn2"): -0.4, ("cnn2", "cnn3"): 0.2})
    assert later[("cnn1", "cnn2")] == pytest.approx(0.8 * 0.1 + 0.2 * -0.4)
    assert later[("cnn2", "cnn3")] == 0.2


def test_population_rule_lets_structure_change_only_toward_the_better_architecture():
    rule = AdoptionRule("population", margin=0.02)
    evidence = {("cnn1", "cnn2"): 0.05}  # cnn2 better than cnn1 by 5 points
    assert rule.allows_structure_change(evidence, "cnn1", "cnn2")
    assert not rule.allows_structure_change(evidence, "cnn2", "cnn1")
    assert not rule.allows_structure_change(evidence, "cnn1", "cnn3")  # no evidence yet
    assert rule.allows_structure_change(evidence, "cnn3", "cnn3")  # same architecture
    assert not AdoptionRule("population", margin=0.1).allows_structure_change(
        evidence, "cnn1", "cnn2")
    assert AdoptionRule("loss").allows_structure_change({}, "cnn1", "cnn3")


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="fedme.adoption-rule='median'"):
        AdoptionRule("median")
    with pytest.raises(ConfigError, match="fedme.adoption-rule='median'"):
        RunConfig(adoption_rule="median")
    with pytest.raises(ConfigError, match="fedme.local-best-patience=0"):
        RunConfig(local_best_patience=0)


def test_best_candidate_is_the_highest_accuracy_then_the_lowest_loss_then_the_first():
    results = [CandidateResult("cnn1", 0.8, 0.5, 8), CandidateResult("cnn2", 0.9, 0.6, 9),
               CandidateResult("cnn3", 0.9, 0.4, 7), CandidateResult("cnn4", 0.9, 0.4, 7)]
    assert best_candidate(results).name == "cnn3"
    with pytest.raises(ValueError, match="no candidate"):
        best_candidate([])


def results_of(accuracies: dict[str, float]) -> list[CandidateResult]:
    return [CandidateResult(name, acc, 1.0 - acc, 5) for name, acc in accuracies.items()]


def test_pooling_zero_is_each_clients_own_choice():
    results = {0: results_of({"cnn1": 0.9, "cnn2": 0.8}), 1: results_of({"cnn1": 0.7, "cnn2": 0.8})}
    assert pooled_choice(results, {0: 10, 1: 10}, pseudo_count=0) == {0: "cnn1", 1: "cnn2"}


def test_pooling_overrules_a_lucky_small_validation_set_but_not_a_large_one():
    """Client 0 (10 samples) saw cnn1 win by one sample; 8 others saw cnn2 win clearly."""
    results = {0: results_of({"cnn1": 0.9, "cnn2": 0.8})}
    results |= {c: results_of({"cnn1": 0.7, "cnn2": 0.9}) for c in range(1, 9)}
    sizes = {c: 10 for c in results}
    assert pooled_choice(results, sizes, pseudo_count=50)[0] == "cnn2"
    sizes[0] = 5000  # the same figures from 5,000 samples are evidence: the client keeps cnn1
    assert pooled_choice(results, sizes, pseudo_count=50)[0] == "cnn1"


# ----------------------------------------------------------- local-best on constructed data


class Linear(nn.Module):
    """A model that can only draw a straight line through 2-D points."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Hidden(nn.Module):
    """A model with a hidden layer: it can learn XOR."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def xor_split(count: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(count, 2)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)
    return Split(torch.from_numpy(x), torch.from_numpy(y))


def test_local_best_picks_the_larger_model_when_it_is_clearly_better():
    train, val = xor_split(400, 0), xor_split(200, 1)
    models = {"linear": Linear, "hidden": Hidden}
    lines: list[str] = []

    def build(name: str) -> nn.Module:
        torch.manual_seed(0)
        return models[name]()

    chosen, results = choose_local_best(
        ["linear", "hidden"], build, train, val, max_epochs=40, patience=10,
        optim=Optim(lr=0.1, batch_size=20), generator_of=lambda n: torch.Generator().manual_seed(0),
        device=torch.device("cpu"), progress=lines.append,
    )
    assert chosen == "hidden"
    accuracy = {r.name: r.accuracy for r in results}
    assert accuracy["hidden"] > accuracy["linear"] + 0.2
    assert len(lines) == 2 and lines[0].startswith("linear: val accuracy")


def test_early_stopping_stops_after_patience_without_improvement():
    train, val = xor_split(100, 0), xor_split(50, 1)
    torch.manual_seed(0)
    model = Linear()
    optim = Optim(lr=0.0, momentum=0.0, weight_decay=0.0)  # nothing changes: no new best
    best, best_epoch, epochs = train_with_early_stopping(
        model, train, val, max_epochs=50, patience=3, optim=optim,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
    )
    assert (best_epoch, epochs) == (1, 4)
    assert best == training.evaluate(model, val.x, val.y, torch.device("cpu"))


# --------------------------------------------------------------------- what a round logs


def make_strategy(archs, schedule="1:1"):
    as_server_task()
    config = RunConfig(num_clients=len(archs), cluster_schedule=schedule)
    nodes = {pid: 100 + pid for pid in range(len(archs))}
    return FedMe(config, nodes, dict(enumerate(archs)), torch.rand(20, 1, 8, 8))


def tuning_reply(strategy, pid, adopted):
    own, other = strategy.models[pid], strategy.models[strategy.partner[pid]]
    return reply_from(100 + pid, RecordDict({
        "metrics": MetricRecord({"partition-id": pid, "num-examples": 10, "train-loss": 0.5,
                                 "adopted": int(adopted), "val-loss": 1.0,
                                 "exchange-val-loss": 0.5, "val-accuracy": 0.5,
                                 "exchange-val-accuracy": 0.75}),
        "personal": ArrayRecord(own.model.state_dict()),
        "exchange": ArrayRecord(other.model.state_dict()),
    }))


def test_round_log_counts_adoptions_by_architecture_pair():
    strategy = make_strategy(["cnn1", "cnn3", "cnn3"])
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None))
    strategy.partner = {0: 1, 1: 0, 2: 0}  # clients 1 and 2 both receive client 0's cnn1
    replies = [tuning_reply(strategy, pid, adopted=pid > 0) for pid in range(3)]
    strategy.aggregate_train(1, replies)
    assert strategy.round_info["adoption-pairs"] == {"cnn3>cnn1": 2}
    logged = strategy.round_info["validation"]["1"]
    assert logged["arch"] == "cnn3" and logged["exchange-arch"] == "cnn1"
    assert logged["exchange-val-accuracy"] == 0.75
    assert [m.arch for m in strategy.models.values()] == ["cnn1", "cnn1", "cnn1"]


def test_k_one_rounds_run_no_pool_inference(monkeypatch):
    strategy = make_strategy(["cnn1", "cnn2", "cnn1", "cnn2"], schedule="1:1,3:2")
    calls = []
    monkeypatch.setattr(training, "predict", lambda *args, **kw: calls.append(1) or None)
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None))
    assert calls == [] and strategy.round_info["server-outputs-s"] == 0
    monkeypatch.undo()
    list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), grid=None))
    assert strategy.round_info["k"] == 2 and strategy.round_info["server-outputs-s"] > 0


def test_local_best_query_reports_every_candidate_and_the_server_pools_them(capsys):
    from fedapps import client
    from fedapps.methods.fedme.server import candidate_results, initial_architectures
    from fedapps.protocol.messages import config_record
    from tests.helpers import context, message

    config = RunConfig(num_clients=3, init_arch="local-best", local_best_epochs=2,
                       candidate_models="cnn1,cnn2", local_best_pooling=1000.0)
    query = message(RecordDict({"config": config_record(config)}), "query")
    clients = {}
    for pid in range(3):
        reply = client.describe(query, context(pid, 3))
        metrics = reply.content["metrics"]
        clients[pid] = {"num-val": int(metrics["num-val"]), "info": reply.content["info"]}
        assert [r.name for r in candidate_results(clients[pid]["info"])] == ["cnn1", "cnn2"]
    printed = capsys.readouterr().out
    assert "client 2 local-best cnn2: val accuracy" in printed and "chose" in printed
    archs = initial_architectures(config, clients)
    assert len(set(archs.values())) == 1  # a huge pseudo-count: the population decides for all


def test_population_rule_vetoes_a_structure_change_the_population_does_not_support():
    strategy = make_strategy(["cnn1", "cnn3", "cnn3"])
    strategy.rule = AdoptionRule("population")
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None))
    strategy.partner = {0: 1, 1: 0, 2: 1}
    # Every client saw the exchange model win by 0.25: for cnn1 <-> cnn3 that is home-advantage
    # noise in both directions, so no structure change; client 2's same-architecture swap stays.
    replies = [tuning_reply(strategy, pid, adopted=True) for pid in range(3)]
    strategy.aggregate_train(1, replies)
    assert strategy.round_info["adoptions"] == {"2": 1}
    assert strategy.round_info["structure-evidence"] == {"cnn1<cnn3": 0.0}
    assert [m.arch for m in strategy.models.values()] == ["cnn1", "cnn3", "cnn3"]


def test_spread_gives_every_candidate_an_equal_share_same_seed_same_split():
    from fedapps.methods.fedme.server import initial_architectures

    config = RunConfig(num_clients=10, candidate_models="cnn1,cnn2,cnn3", init_arch="spread")
    clients = dict.fromkeys(range(10), {})
    archs = initial_architectures(config, clients)
    assert sorted(archs) == list(range(10))
    assert sorted(np.unique(list(archs.values()), return_counts=True)[1]) == [3, 3, 4]
    assert initial_architectures(config, clients) == archs
    other = initial_architectures(config.replace(seed=1), clients)
    assert other != archs
