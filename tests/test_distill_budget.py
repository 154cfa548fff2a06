"""Time budgets, the growing snapshot grid, snapshot testing and the adoption check (no Flower)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from fedapps import training
from fedapps.config import ConfigError, RunConfig
from fedapps.methods.distill.adoption import AdoptionCheck, better
from fedapps.methods.distill.averaging import ForwardOffers
from fedapps.methods.distill.budget import TimeBudget, TimeUp, grid_index, stopped_by
from fedapps.methods.distill.channel import DirectoryChannel
from fedapps.methods.distill.distillation import (
    Distiller,
    GlobalLog,
    initial_small_state,
    read_log,
    reverse_pass,
    serve,
    server_data,
)
from fedapps.protocol.messages import from_arrays
from tests.test_distill import FakeClock, benchmark_module, config, trained_teacher

# ------------------------------------------------------------------------- budget and grid


def test_a_budget_is_spent_once_its_seconds_have_passed_since_the_origin():
    clock = FakeClock()
    budget = TimeBudget(5.0, origin=100.0, clock=clock)
    clock.now = 104.9
    assert not budget.spent()
    clock.now = 105.0
    assert budget.spent()
    clock.now = 1e9
    assert not TimeBudget(0.0, origin=100.0, clock=clock).spent()  # 0: no budget


def test_only_a_spent_budget_ends_the_rounds_early():
    assert stopped_by(40, 40) == "num-rounds"
    assert stopped_by(17, 1000) == "time-budget-s"


def test_a_fixed_grid_has_a_point_every_step():
    assert [grid_index(t, 1.0, 0.0) for t in (0.0, 0.99, 1.0, 2.5, 240.2)] == [0, 0, 1, 2, 240]
    assert grid_index(50.0, 0.0, 0.0) == 0  # no grid


def test_a_growing_grid_is_fixed_first_then_each_point_a_constant_share_later():
    every, growth = 1.0, 0.04
    assert [grid_index(t, every, growth) for t in (0.5, 1.0, 24.9)] == [0, 1, 24]
    indices = [grid_index(t / 100, every, growth) for t in range(30000)]  # 0-300 s
    points = [0.0] + [t / 100 for t in range(1, 30000) if indices[t] > indices[t - 1]]
    assert points[:26] == [float(n) for n in range(26)]  # the first 25 s: every second
    late = [(later - earlier) / later for earlier, later in zip(points[25:], points[26:])]
    # from then on each gap is 1 - 1/1.04 of the point it ends at (to the 0.01 s sampling)
    assert late and all(gap == pytest.approx(1 - 1 / 1.04, abs=1e-3) for gap in late)
    assert len(points) < 300 / 3  # a 300 s run: under a third of the fixed grid's points


# ---------------------------------------------------------------------- snapshots on a grid


def stepped(log: GlobalLog, clock: FakeClock, model, times, version=1, passes=1, budget=None):
    step = log.watcher(version, passes, budget)
    for t in times:
        clock.now = 100.0 + t
        step(model)


def test_a_rest_is_saved_only_when_a_grid_point_falls_in_it_and_stamped_at_its_start(tmp_path):
    distiller, clock = Distiller(config()), FakeClock()
    log = GlobalLog(tmp_path / "global.jsonl", t0=100.0, every=1.0, clock=clock)
    log.begin(distiller.model, 0, 0)
    stepped(log, clock, distiller.model, (0.2, 0.4))  # pass 1
    clock.now = 100.5
    log.settle(distiller.model, 1, 1)  # rests 0.5 -> 0.8: no grid point in it
    stepped(log, clock, distiller.model, (0.8, 0.9), 2, 2)  # pass 2
    clock.now = 100.95
    log.settle(distiller.model, 2, 2)  # rests 0.95 -> 1.3: grid point 1.0 sees this model
    stepped(log, clock, distiller.model, (1.3, 1.4), 3, 3)  # pass 3
    log.finish(distiller.model, 3, 3)  # the last step's model
    log.test_snapshots(distiller)
    rows = read_log(log.path)
    assert [(r["time"], r["version"]) for r in rows] == [(0.0, 0), (0.95, 2), (1.4, 3)]


def test_a_spent_budget_ends_the_pass_with_a_snapshot_of_the_model_then(tmp_path):
    distiller, clock = Distiller(config()), FakeClock()
    log = GlobalLog(tmp_path / "global.jsonl", t0=100.0, every=10.0, clock=clock)
    log.begin(distiller.model, 0, 0)
    budget = TimeBudget(3.0, origin=100.0, clock=clock)
    with pytest.raises(TimeUp):
        stepped(log, clock, distiller.model, (1.0, 2.0, 3.1, 4.0), budget=budget)
    assert clock.now == 103.1  # the step at 4.0 never ran
    log.finish(distiller.model, 1, 1)  # nothing changed since the budget's snapshot
    log.test_snapshots(distiller)
    assert [r["time"] for r in read_log(log.path)] == [0.0, 3.1]


def test_a_pass_cut_by_the_budget_is_logged_as_cut(tmp_path):
    cfg = config()
    distiller = Distiller(cfg)
    log = GlobalLog(tmp_path / "global.jsonl", every=1.0)
    origin = log.begin(distiller.model, 0, 0)
    reverse_pass(distiller, log, trained_teacher(cfg), 1, 1, TimeBudget(1e-9, origin))
    [row] = read_log(tmp_path / "passes.jsonl")
    assert row["cut"] is True and "kl" not in row


def test_distillation_server_stops_at_the_budget_without_a_stop_from_the_averaging_server(
    tmp_path,
):
    cfg = config(distill_mode="continuous", time_budget_s=2.0, channel_timeout=120.0,
                 channel_dir=str(tmp_path))
    channel = DirectoryChannel(tmp_path)
    channel.publish("distilled", trained_teacher(cfg), version=1)  # and never a "stop"
    log = GlobalLog(tmp_path / "global.jsonl", every=cfg.snapshot_every_s)
    result = serve(cfg, channel, log)
    assert result["distillation-stopped-by"] == "time-budget-s"
    assert result["snapshots-tested"] == len(read_log(log.path)) >= 2  # the start and the end


def test_snapshot_testing_gives_what_testing_each_snapshot_in_a_new_model_gave(tmp_path):
    cfg = config()
    distiller = Distiller(cfg)
    log = GlobalLog(tmp_path / "global.jsonl")
    log.begin(distiller.model, 0, 0)
    teacher = trained_teacher(cfg)
    for passes in (1, 2, 3):
        distiller.reverse(teacher, passes)
        log.snapshot(distiller.model, 1, passes)
    saved = [torch.load(f, weights_only=True) for f in sorted(log.folder.glob("*.pt"))]
    with training.torch_threads(training.available_cores()):  # as the tester runs
        expected = [training.evaluate(from_arrays(cfg.global_model, ArrayRecord(s["state"]), cfg),
                                      distiller.test_x, distiller.test_y, distiller.device)
                    for s in saved]
    log.test_snapshots(distiller)
    rows = read_log(log.path)
    assert len({r["accuracy"] for r in rows}) > 1  # different models, not one tested 4 times
    assert [(r["accuracy"], r["loss"]) for r in rows] == [(e.accuracy, e.loss) for e in expected]


# ------------------------------------------------------------------ the validation split


def test_the_validation_split_is_carved_from_the_held_out_set_and_disjoint_from_the_test():
    before = server_data(config(unlabeled_size=300))
    after = server_data(config(unlabeled_size=300, validation_fraction=0.2))
    assert (len(after.validation_y), len(after.test_y)) == (30, 120)
    assert torch.equal(after.distill, before.distill)  # U is untouched

    def rows(x: torch.Tensor) -> set[bytes]:
        return {sample.numpy().tobytes() for sample in x}

    assert rows(after.validation_x) | rows(after.test_x) == rows(before.test_x)
    assert not rows(after.validation_x) & rows(after.test_x)
    assert len(server_data(config()).validation_y) == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"distill.snapshot-every-s": 0, "distill.snapshot-growth": 0.05},
         "distill.snapshot-growth=0.05: needs distill.snapshot-every-s > 0"),
        ({"distill.snapshot-growth": 1.0}, "distill.snapshot-growth=1.0: must be < 1"),
        ({"distill.time-budget-s": -1}, "distill.time-budget-s=-1: must be >= 0"),
        ({"distill.validation-fraction": 0.2, "distill.global-test": "clients"},
         "carved from the server's held-out set"),
        ({"distill.adoption-check": "always"},
         "distill.adoption-check='always' is not known; allowed: none, validation"),
        ({"distill.adoption-check": "validation", "distill.validation-fraction": 0.2},
         "needs distill.forward-distill-every > 0"),
        ({"distill.adoption-check": "validation", "distill.forward-distill-every": 4},
         "needs distill.validation-fraction > 0"),
        ({"method": "sync-distill", "distill.adoption-check": "validation",
          "distill.forward-distill-every": 1, "distill.validation-fraction": 0.2},
         "method 'sync-distill' adopts every forward-distilled model"),
    ],
)
def test_bad_budget_grid_and_adoption_keys_are_rejected_with_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({"method": "async-distill", **changes})


# --------------------------------------------------------------------- the adoption check


def score(accuracy: float, loss: float) -> training.EvalResult:
    return training.EvalResult(loss, accuracy, 100)


@pytest.mark.parametrize(
    ("candidate", "current", "adopted"),
    [
        (score(0.62, 1.1), score(0.55, 0.9), True),  # more accurate
        (score(0.10, 2.2), score(0.31, 1.7), False),  # a lagging global model's copy
        (score(0.10, 2.1), score(0.10, 2.3), True),  # equally accurate, lower loss
        (score(0.10, 2.3), score(0.10, 2.3), False),  # no better: keep the clients' model
    ],
)
def test_an_offer_is_adopted_only_when_more_accurate_or_as_accurate_with_a_lower_loss(
    candidate, current, adopted
):
    assert better(candidate, current) is adopted


def fitted_to_validation(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """A small model fitted to the validation split: clearly better there than a fresh one."""
    data = server_data(cfg)
    torch.manual_seed(cfg.seed)
    model = from_arrays(cfg.model, ArrayRecord(initial_small_state(cfg)), cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(data.validation_x), data.validation_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CHECKED = {"forward_distill_every": 1, "adoption_check": "validation", "validation_fraction": 0.3}


def test_the_check_adopts_a_better_model_and_rejects_a_worse_one_on_the_validation_split():
    cfg = config(**CHECKED)
    check, good, fresh = AdoptionCheck(cfg), fitted_to_validation(cfg), initial_small_state(cfg)
    adopted, rejected = check(good, fresh), check(fresh, good)
    assert adopted.adopted and not rejected.adopted
    assert adopted.record() == {
        "adopted": True, "candidate-accuracy": adopted.candidate.accuracy,
        "candidate-loss": adopted.candidate.loss,
        "current-accuracy": adopted.current.accuracy,
        "current-loss": adopted.current.loss}
    assert adopted.candidate == rejected.current  # the same model scored the same


@pytest.mark.parametrize("offered_is_better", [True, False])
def test_the_averaging_server_takes_an_offer_only_if_the_check_passes_and_logs_it(
    tmp_path, offered_is_better
):
    cfg = config(**CHECKED, channel_dir=str(tmp_path))
    good, fresh = fitted_to_validation(cfg), initial_small_state(cfg)
    offered, current = (good, fresh) if offered_is_better else (fresh, good)
    channel = DirectoryChannel(tmp_path)
    channel.publish("forward", fresh, {"based-on": 0})  # the initial model, taken at start
    offers = ForwardOffers(cfg, channel, seen=0, check=AdoptionCheck(cfg))
    current_arrays = ArrayRecord(current)
    assert offers.before_round(3, current_arrays) is current_arrays  # nothing new yet
    assert offers.round_fields() == {"adoptions": 0}
    channel.publish("forward", offered, {"based-on": 2})
    sent = offers.before_round(4, current_arrays).to_torch_state_dict()
    chosen = offered if offered_is_better else current
    assert all(torch.equal(sent[k], chosen[k]) for k in chosen)
    fields = offers.round_fields()
    assert fields["adoptions"] == int(offered_is_better)
    assert fields["offer"]["adopted"] is offered_is_better
    assert (fields["offer"]["version"], fields["offer"]["based-on"]) == (1, 2)
    assert offers.summary() == {"adoptions": int(offered_is_better), "offers": 1}
    assert offers.before_round(5, current_arrays) is current_arrays  # each offer once


# ------------------------------------------------------------------------ the benchmark


def test_time_to_target_counts_from_the_first_change_after_the_snapshot_before():
    bench = benchmark_module()
    # snapshots at 5.5 (0.3) and 20 (0.6); the model rested from 5 to 8 s, then changed in
    # the passes 8-10 and 19-21 s; no grid point fell in the rest after 10 s, so the crossing
    # lies in 8-20 s, not in the last pass only
    run = {"points": [(0.0, 0.1), (5.5, 0.3), (20.0, 0.6)],
           "passes": [{"kind": "reverse", "start": 3.0, "end": 5.0},
                      {"kind": "forward", "start": 5.0, "end": 6.0},
                      {"kind": "reverse", "start": 8.0, "end": 10.0},
                      {"kind": "reverse", "start": 19.0, "end": 21.0}]}
    assert bench.time_to(run, 0.5) == (20.0, 12.0)
    assert bench.time_to(run, 0.2) == (5.5, 2.5)  # the pass 3-5 s was running after 0 s
    assert bench.time_to(run, 0.05) == (0.0, 0.0)


def test_equal_time_runs_get_the_baselines_duration_and_a_round_cap():
    bench = benchmark_module()
    baseline = {"points": [(0.0, 0.1), (233.7, 0.65)]}
    assert bench.budget_changes("baseline", bench.BASELINE, None, 1000) == {}
    assert bench.budget_changes("baseline", bench.FAST, baseline, 1000) == {
        "distill.time-budget-s": 233.7, "num-rounds": 1000}
    assert bench.budget_changes("120", bench.BASELINE, None, 500) == {
        "distill.time-budget-s": 120.0, "num-rounds": 500}
    assert bench.budget_changes("none", bench.OURS, baseline, 1000) == {}


def test_top_targets_are_shares_of_the_baselines_lowest_final_accuracy():
    bench = benchmark_module()
    runs = {bench.BASELINE: [{"points": [(0.0, 0.1), (9.0, 0.75), (10.0, 0.70)]},
                             {"points": [(0.0, 0.1), (9.0, 0.85), (10.0, 0.80)]}]}
    # whole percents, rounded down: sync+forward reaches each on every seed
    assert bench.choose_targets("top", runs) == [0.63, 0.66]  # of the lowest final, 0.70
    assert bench.choose_targets("auto", runs) == [0.44, 0.6, 0.71]  # of the lowest best, 0.75
