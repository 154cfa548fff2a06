"""The round-time benchmark's arithmetic: generated data, FLOP counts, bounds, breakdowns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import round_time as rt
from fedapps.config import RunConfig, app_defaults


def test_generated_images_have_the_shape_labels_and_seed_asked_for():
    x, y = rt.generate_images((3, 8, 8), 5, 40, seed=1)
    again, _ = rt.generate_images((3, 8, 8), 5, 40, seed=1)
    assert x.shape == (40, 3, 8, 8) and x.dtype == np.float32
    assert y.dtype == np.int64 and set(y) <= set(range(5))
    assert np.array_equal(x, again)


def test_generated_images_are_learnable_class_means_differ():
    x, y = rt.generate_images((1, 4, 4), 2, 2000, seed=0)
    gap = np.abs(x[y == 0].mean(axis=0) - x[y == 1].mean(axis=0)).mean()
    assert gap > 0.5  # prototypes N(0, 1): about 1.1; noise of the means about 0.03


def test_count_flops_is_two_flops_per_multiply_add():
    layer = nn.Linear(10, 4, bias=False)
    assert rt.count_flops(lambda: layer(torch.randn(3, 10))) == 2 * 3 * 10 * 4


def test_mutual_step_costs_twice_a_training_step():
    costs, rates = rt.measure(rt.Workload("t", (1, 8, 8), 3, "cnn1", "cnn1"), 30,
                              torch.device("cpu"))
    assert costs.mutual == pytest.approx(2 * costs.train)
    assert costs.train > costs.forward > 0
    assert min(rates.train, rates.mutual, rates.forward, rates.pool, rates.pool_all_cores) > 0


COSTS = rt.Costs(train=3.0, mutual=6.0, forward=1.0)
RATES = rt.Rates(train=1.0, mutual=2.0, forward=1.0, pool=4.0, pool_all_cores=10.0)
COUNTS = rt.Counts(clients=2, train=100, val=10, test=20, pool=50)


def test_fedme_bound_adds_training_validation_evaluation_and_pool():
    bound = rt.round_bound("fedme", COUNTS, COSTS, RATES, workers=2, pool_inference=True)
    assert bound["train"] == 100 * rt.EPOCHS * 6.0 / (2.0 * 2)
    assert bound["validation"] == 2 * 10 * 1.0 / 2
    assert bound["evaluation"] == 20 / 2
    assert bound["pool"] == 2 * 50 / 10.0  # all cores beat 2 workers x 4.0
    assert bound["total"] == pytest.approx(sum(bound[k] for k in
                                               ("train", "validation", "evaluation", "pool")))
    flops = 100 * rt.EPOCHS * 6.0 + 20 + 20 + 100
    assert bound["gflop"] == pytest.approx(flops / 1e9)


def test_pool_bound_takes_the_faster_of_one_model_per_core_and_all_cores_per_model():
    bound = rt.round_bound("fedme", COUNTS, COSTS, RATES, workers=4, pool_inference=True)
    assert bound["pool"] == 2 * 50 / (4.0 * 4)


def test_bound_without_pool_inference_and_for_fedavg():
    k1 = rt.round_bound("fedme", COUNTS, COSTS, RATES, workers=1, pool_inference=False)
    fedavg = rt.round_bound("fedavg", COUNTS, COSTS, RATES, workers=1, pool_inference=True)
    assert k1["pool"] == 0.0
    assert fedavg["pool"] == 0.0 and fedavg["validation"] == 0.0
    assert fedavg["train"] == 100 * rt.EPOCHS * 3.0


def rows():
    base = {"client-train-s": 4.0, "server-outputs-s": 0.0, "server-kmeans-s": 0.0,
            "server-messages-s": 0.1, "server-aggregate-s": 0.2}
    return [{**base, "round": 1, "k": 1, "round-s": 9.0},
            {**base, "round": 2, "k": 1, "round-s": 3.0},
            {**base, "round": 3, "k": 2, "round-s": 5.0, "server-outputs-s": 1.5,
             "server-kmeans-s": 0.5}]


def test_phases_leave_out_the_warm_up_round_and_split_by_k():
    phases = rt.by_phase(rows(), parallel=2)
    assert phases["k1"]["round-s"] == 3.0
    assert phases["k2"]["round-s"] == 5.0
    assert phases["k2"]["client-train-wall-s"] == 2.0
    assert phases["k2"]["flower-and-evaluation-s"] == pytest.approx(5.0 - 2.0 - 2.3)


def test_summary_averages_k_phases_as_the_papers_schedule():
    bound = {"total": 2.0}
    run = {"method": "fedme", "phases": rt.by_phase(rows(), 2),
           "bound": {"k1": bound, "k2": {"total": 3.0}}}
    summary = rt.summarize(run)
    assert summary["round-s"] == 4.0
    assert summary["bound-s"] == 2.5
    assert summary["ratio"] == pytest.approx(4.0 / 2.5)
    assert summary["clustering-share"] == pytest.approx(1.0 / 4.0)


def test_partition_counts_read_the_runs_partition_file(tmp_path):
    partition = {"unlabeled": [0, 1, 2], "clients": [
        {"train": [3, 4, 5], "val": [6], "test": [7]},
        {"train": [8, 9], "val": [10], "test": [11, 12]}]}
    (tmp_path / "partition.json").write_text(json.dumps(partition))
    assert rt.partition_counts(tmp_path) == rt.Counts(2, 5, 2, 3, 3)


def test_partial_rounds_train_a_fraction_and_sampled_pools_shrink_the_pool_pass():
    many = rt.Counts(clients=10, train=100, val=10, test=20, pool=50)
    counts = rt.participating(rt.clustered(many, 20), 0.5)
    assert counts == rt.Counts(clients=5, train=50, val=5, test=20, pool=20)
    assert rt.clustered(many, 0) == many and rt.clustered(many, 80) == many
    assert rt.participating(many, 1.0) == many
    bound = rt.round_bound("fedme", counts, COSTS, RATES, workers=2, pool_inference=True)
    assert bound["pool"] == 5 * 20 / 10.0 and bound["evaluation"] == 20 / 2


def test_quick_mode_is_one_small_workload():
    args = rt.parse(["--quick"])
    assert (args.shapes, args.clients, args.pools, args.rounds) == (["28"], [20], [500], 3)


@pytest.mark.parametrize("method", ["fedme", "fedavg"])
def test_every_suite_run_has_a_valid_config(method, tmp_path):
    """One settings dict per workload serves both methods; each run keeps only its own keys."""
    data = rt.write_images(tmp_path, rt.WORKLOADS["28"], clients=4, pool=50)
    for settings in (rt.image_settings(rt.WORKLOADS["28"], method, 4, 50, data, 2, "cpu",
                                       cluster_pool=20, fraction_train=0.5),
                     {**rt.DIGITS, "method": method, "num-clients": 4}):
        RunConfig.from_mapping({**app_defaults(), **rt.own_keys(settings)})
