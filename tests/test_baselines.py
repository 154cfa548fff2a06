"""The FedMe paper's baselines: strategy logic without Flower, then one short run each."""

from __future__ import annotations

import json

import pytest
import torch

from fedapps.config import ConfigError, RunConfig, app_defaults
from fedapps.data.federated import client_data
from fedapps.inprocess import run_in_process
from fedapps.methods.fml import train_fml
from fedapps.methods.hypcluster import aggregate_clusters, choose_model
from fedapps.methods.mapper import mixed_state, train_mapper
from fedapps.methods.pfedme import train_pfedme
from fedapps.protocol.messages import new_model
from fedapps.protocol.results import read_rounds
from fedapps.training import Optim, evaluate, train

BASELINE_KEYS = ("hypcluster.k", "fml.alpha", "fml.beta", "pfedme.lambda", "pfedme.inner-steps",
                 "pfedme.personal-lr", "pfedme.beta", "mapper.lambda-init")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return RunConfig(method="fedavg", num_clients=3, seed=0)


@pytest.fixture(scope="module")
def data(config):
    return client_data(config, 0)


def _trained(config, data, seed: int = 0, epochs: int = 3):
    torch.manual_seed(seed)
    model = new_model(config.model, config)
    train(model, data.train.x, data.train.y, epochs, Optim(), torch.Generator().manual_seed(0),
          CPU)
    return model


def test_baseline_keys_match_pyproject():
    app = app_defaults()
    defaults = RunConfig().to_dict()
    for key in BASELINE_KEYS:
        assert app[key] == defaults[key], key


@pytest.mark.parametrize("key, value", [("hypcluster.k", 0), ("fml.alpha", 1.5),
                                        ("pfedme.lambda", 0), ("pfedme.inner-steps", 0),
                                        ("mapper.lambda-init", 1.0)])
def test_bad_baseline_values_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping({key: value})


def test_hypcluster_assigns_the_lower_loss_model(config, data):
    torch.manual_seed(1)
    untrained = new_model(config.model, config)
    trained = _trained(config, data)
    for models, expected in (([untrained, trained], 1), ([trained, untrained], 0)):
        chosen, losses = choose_model(models, data.train.x, data.train.y, CPU)
        assert chosen == expected
        assert losses[chosen] == min(losses)


def test_hypcluster_averages_each_model_with_its_clients_only():
    models = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}, {"w": torch.full((2,), 5.0)}]
    updates = [(0, {"w": torch.full((2,), 2.0)}, 1.0), (0, {"w": torch.full((2,), 4.0)}, 3.0),
               (1, {"w": torch.full((2,), 7.0)}, 2.0)]
    merged = aggregate_clusters(models, updates)
    assert torch.allclose(merged[0]["w"], torch.full((2,), 3.5))  # weighted by examples
    assert torch.allclose(merged[1]["w"], torch.full((2,), 7.0))
    assert merged[2] is models[2]  # nobody chose it: unchanged


def test_pfedme_personal_model_differs_from_global_and_fits_better(config, data):
    torch.manual_seed(0)
    start = new_model(config.model, config)
    local = new_model(config.model, config)
    local.load_state_dict(start.state_dict())
    personal = new_model(config.model, config)
    personal.load_state_dict(start.state_dict())
    train_pfedme(local, personal, data.train.x, data.train.y, 2, Optim(),
                    torch.Generator().manual_seed(0), CPU, lam=15.0, inner_steps=3,
                    personal_lr=0.05)
    def distance(a, b):
        return sum((p - q).abs().sum() for p, q in zip(a.parameters(), b.parameters(), strict=True))

    gap, moved = distance(personal, local), distance(local, start)
    assert gap > 1e-3 and moved > 1e-3
    assert (evaluate(personal, data.train.x, data.train.y, CPU).loss
            < evaluate(start, data.train.x, data.train.y, CPU).loss)


def test_mapper_mixes_parameters_and_learns_the_weight(config, data):
    torch.manual_seed(0)
    shared_model = new_model(config.model, config)
    shared = {k: v.detach().clone() for k, v in shared_model.named_parameters()}
    local = {k: v.clone() + 0.01 for k, v in shared.items()}
    one = mixed_state(local, shared, torch.tensor(1.0))
    assert all(torch.equal(one[k], local[k]) for k in shared)
    logit = torch.tensor(0.0)
    before = evaluate(shared_model, data.train.x, data.train.y, CPU).loss
    loss = train_mapper(shared_model, local, logit, shared, data.train.x, data.train.y, 2,
                           Optim(), torch.Generator().manual_seed(0), CPU)
    assert logit.item() != 0.0 and loss < before


def test_fml_trains_both_models(config, data):
    torch.manual_seed(0)
    local, meme = new_model(config.model, config), new_model(config.model, config)
    first = train_fml(local, meme, data.train.x, data.train.y, 1, Optim(),
                         torch.Generator().manual_seed(0), CPU, 0.5, 0.5)
    last = train_fml(local, meme, data.train.x, data.train.y, 3, Optim(),
                        torch.Generator().manual_seed(1), CPU, 0.5, 0.5)
    assert last[0] < first[0] and last[1] < first[1]


# --------------------------------------------------------------------- one short run each

METHODS = ("hypcluster", "fml", "pfedme", "mapper", "centralized")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short run of a baseline, on first use: the real server and client halves, in this
    process (the Flower path is the same for every method and has its own tests). Each run is
    made where a test needs it: parallel workers do not all run every baseline."""
    folder = tmp_path_factory.mktemp("baselines")
    runs = {}

    def run(method: str) -> tuple[dict, list[dict]]:
        if method not in runs:
            done = run_in_process({"method": method, "num-clients": 3, "num-rounds": 3,
                                   "local-epochs": 1, "results-dir": str(folder)})
            runs[method] = (json.loads((done / "summary.json").read_text()), read_rounds(done))
        return runs[method]

    return run


@pytest.mark.parametrize("method", METHODS)
def test_each_baseline_improves_on_its_initial_accuracy(short_run, method):
    summary, rounds = short_run(method)
    reported = summary.get("reported", "after-finetune")
    assert summary["status"] == "completed"
    assert summary[reported]["mean"] > 0.3  # untrained, a model is at chance: 10 % on digits
    assert rounds and rounds[-1]["round"] == 3
    assert set(summary["clients"]) == {"0", "1", "2"}


def test_hypcluster_final_models_follow_the_clients_choice(short_run):
    summary, _ = short_run("hypcluster")
    assert set(summary["clusters"]) == {"0", "1", "2"}
    assert set(summary["clusters"].values()) <= {0, 1}
