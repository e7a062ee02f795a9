"""Model-size-adaptive pruning (seed 000): the reference table, interpolation, the warp, and build_pruner."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib.pruning.adaptive import EARLY_POINT, adaptive_choice, warp_for
from lib.pruning.build import build_pruner
from lib.pruning.methods import SPT
from lib.pruning.registry import LAYER_ADAPTIVE_VARIANTS, VARIANT_NAMES
from lib.pruning.schedules import CURVES, Schedule
from lib.settings import Settings

# seed 000's table: params -> (SPT epsilon, update frequency, early share of the target)
REFERENCE = {9_000_000: (0.01, 100, 0.75), 28_000_000: (0.005, 200, 0.55),
             108_000_000: (0.0025, 400, 0.40), 333_000_000: (0.001, 800, 0.35)}
RISING_CURVES = ["zhu-gupta", "linear", "cubic-ramp"]


def _curve(kind, initial=0.0, final=0.7):
    return lambda p: CURVES[kind](p, initial, final)


@pytest.mark.parametrize("params", sorted(REFERENCE))
def test_reference_points_are_exactly_seed_000s_values(params):
    epsilon, frequency, share = REFERENCE[params]
    c = adaptive_choice(params)
    assert c.params == params
    assert c.frequency == frequency and isinstance(c.frequency, int)
    assert c.early_share == share
    assert c.spt_epsilon == epsilon  # recorded in summary.json: must be the table's value, not a rounding of it


@pytest.mark.parametrize("params", sorted(REFERENCE))
def test_reference_points_to_twelve_digits(params):
    epsilon, frequency, share = REFERENCE[params]
    c = adaptive_choice(params)
    assert c.spt_epsilon == pytest.approx(epsilon, rel=1e-12)
    assert c.early_share == pytest.approx(share, rel=1e-12)
    assert c.frequency == frequency


@pytest.mark.parametrize("params, ref", [(1, 9_000_000), (60_000, 9_000_000), (8_999_999, 9_000_000),
                                         (333_000_001, 333_000_000), (1_558_000_000, 333_000_000),
                                         (10 ** 12, 333_000_000)])
def test_clamped_outside_the_table(params, ref):
    c, r = adaptive_choice(params), adaptive_choice(ref)
    assert (c.spt_epsilon, c.frequency, c.early_share) == (r.spt_epsilon, r.frequency, r.early_share)


def test_monotone_between_the_reference_points():
    grid = [int(9e6 * (333 / 9) ** (i / 200)) for i in range(201)]
    choices = [adaptive_choice(n) for n in grid]
    for a, b in zip(choices, choices[1:]):
        assert b.spt_epsilon < a.spt_epsilon
        assert b.frequency >= a.frequency
        assert b.early_share <= a.early_share
    assert choices[0].frequency == 100 and choices[-1].frequency == 800
    # in between the reference points, strictly between their values
    mid = adaptive_choice(50_000_000)
    assert 0.0025 < mid.spt_epsilon < 0.005 and 200 < mid.frequency < 400 and 0.40 < mid.early_share < 0.55


def test_log_linear_interpolation_halfway():
    # geometric midpoint of 9M and 28M: epsilon and frequency are geometric means, the share the mean
    c = adaptive_choice(int(round(math.sqrt(9e6 * 28e6))))
    assert c.spt_epsilon == pytest.approx(math.sqrt(0.01 * 0.005), rel=1e-6)
    assert c.frequency == round(math.sqrt(100 * 200))
    assert c.early_share == pytest.approx((0.75 + 0.55) / 2, rel=1e-6)


@pytest.mark.parametrize("kind", RISING_CURVES)
def test_warp_is_one_at_9m(kind):
    assert adaptive_choice(9_000_000, _curve(kind)).warp == 1.0
    assert adaptive_choice(1_000_000, _curve(kind)).warp == 1.0
    assert warp_for(_curve(kind), 1.0) == 1.0


@pytest.mark.parametrize("kind", RISING_CURVES)
@pytest.mark.parametrize("params", [12_000_000, 28_000_000, 108_000_000, 333_000_000, 2_000_000_000])
def test_warp_gives_the_early_share_at_a_quarter(kind, params):
    initial = 0.0
    curve = _curve(kind, initial=initial)
    c = adaptive_choice(params, curve)
    share = c.early_share / 0.75
    assert c.warp > 1.0
    assert EARLY_POINT == 0.25
    assert curve(0.25 ** c.warp) == pytest.approx(share * curve(0.25), rel=1e-9)
    # and the warped schedule says the same
    sched = Schedule(kind, start=0, end=1000, final=0.7, initial=initial, warp=c.warp)
    assert sched.target(250) == pytest.approx(share * curve(0.25), rel=1e-9)


@pytest.mark.parametrize("kind", RISING_CURVES)
def test_warp_grows_with_model_size(kind):
    warps = [adaptive_choice(n, _curve(kind)).warp for n in (9e6, 20e6, 28e6, 60e6, 108e6, 200e6, 333e6)]
    assert warps == sorted(warps)
    assert len(set(warps)) == len(warps)


# --- build_pruner ---------------------------------------------------------------

def _settings(**kw) -> Settings:
    values = dict(pruning_method="spt", state_variant="bitter7", variant_budget=False, spt_epsilon=0.05,
                  spt_alpha=0.8, seed=7, adaptive_pruning=True, target_sparsity=0.6, schedule="linear",
                  schedule_start=0, schedule_end=10_000, initial_sparsity=0.0, schedule_frequency=50, beta1=0.9)
    values.update(kw)
    return Settings(**values)


def test_adaptive_warp_with_initial_sparsity_keeps_a_gradual_ramp():
    # INITIAL_SPARSITY = 0.1 with the default cubic-ramp for a 28M model: "early share" x curve(0.25) =
    # 0.733 * 0.109 = 0.080 is below s_i, so no warp reaches it. Larger models are meant to be pruned
    # *more gently*; the run must not turn into one that holds s_i for the whole ramp and then
    # prunes everything in its last steps. (A clear configuration error would also be acceptable.)
    from lib.errors import KpruneError

    _, pool, opt = _pool()
    s = _settings(schedule="cubic-ramp", initial_sparsity=0.1, target_sparsity=0.6, schedule_end=1000,
                  schedule_frequency=10)
    try:
        pruner, adaptive = build_pruner(s, pool, opt, 28_000_000)
    except KpruneError:
        return
    sched = pruner.schedule
    rise_at_90 = (sched.target(900) - 0.1) / (0.6 - 0.1)
    assert rise_at_90 >= 0.1, (f"warp {sched.warp:g}: only {rise_at_90:.2%} of the pruning is done at 90% of the "
                               f"ramp; sparsity goes {sched.target(990):.3f} -> {sched.target(1000):.3f} in the last "
                               "10 steps")


def _pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    pool = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    return model, pool, torch.optim.AdamW(model.parameters())


@pytest.mark.parametrize("kind", RISING_CURVES)
@pytest.mark.parametrize("params", [28_000_000, 108_000_000])
def test_build_pruner_uses_and_records_the_adaptive_values(kind, params):
    _, pool, opt = _pool()
    s = _settings(schedule=kind)
    pruner, adaptive = build_pruner(s, pool, opt, params)
    choice = adaptive_choice(params, _curve(kind, 0.0, 0.6))
    assert adaptive is not None
    assert adaptive["params"] == params
    assert adaptive["spt_epsilon"] == choice.spt_epsilon
    assert adaptive["frequency"] == choice.frequency == REFERENCE[params][1]
    assert adaptive["early_share"] == choice.early_share
    assert adaptive["warp"] == pytest.approx(choice.warp, rel=1e-12)
    # what the run really uses
    assert pruner.schedule.frequency == adaptive["frequency_used"] == REFERENCE[params][1]
    assert pruner.schedule.warp == adaptive["warp_used"] == adaptive["warp"] > 1.0
    assert (pruner.schedule.kind, pruner.schedule.start, pruner.schedule.end) == (kind, 0, 10_000)
    assert pruner.schedule.update_steps()[:3] == [1, REFERENCE[params][1], 2 * REFERENCE[params][1]]
    assert isinstance(pruner.method, SPT)
    assert pruner.method.epsilon == choice.spt_epsilon  # overrides SPT_EPSILON
    assert pruner.method.alpha == 0.8


def test_build_pruner_adaptive_frequency_fits_the_ramp():
    _, pool, opt = _pool()
    pruner, adaptive = build_pruner(_settings(schedule_end=150), pool, opt, 333_000_000)
    assert adaptive["frequency"] == 800
    assert pruner.schedule.frequency == adaptive["frequency_used"] == 150


def test_build_pruner_adaptive_milestones_warp():
    _, pool, opt = _pool()
    s = _settings(schedule="milestones", schedule_milestones="0:0.0,2000:0.2,10000:0.6")
    pruner, adaptive = build_pruner(s, pool, opt, 108_000_000)
    sched = pruner.schedule
    assert sched.warp == adaptive["warp_used"] > 1.0 and sched.frequency == 400
    plain = Schedule.milestones(sched.points, 400, 0.6)
    assert sched.target(2500) == pytest.approx(0.40 / 0.75 * plain.target(2500), rel=1e-9)


def test_build_pruner_without_adaptive_keeps_the_configuration():
    _, pool, opt = _pool()
    pruner, adaptive = build_pruner(_settings(adaptive_pruning=False), pool, opt, 108_000_000)
    assert adaptive is None
    assert pruner.schedule.frequency == 50 and pruner.schedule.warp == 1.0
    assert pruner.method.epsilon == 0.05


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_build_pruner_layer_adaptive_only_for_layer_adaptive_variants(variant):
    _, pool, opt = _pool()
    pruner, _ = build_pruner(_settings(pruning_method="state", state_variant=variant, adaptive_pruning=False),
                             pool, opt, 1000)
    assert pruner.layer_adaptive is (variant in LAYER_ADAPTIVE_VARIANTS)
    assert pruner.method.name == variant
