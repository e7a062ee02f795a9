"""Plan expansion: the product of the selected axes, invalid combinations dropped with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib.errors import ConfigError
from lib.kconfig import REPO_ROOT, apply_overrides, read_config
from lib.matrix.plan import Plan, build_plan, plan_hash, plan_table
from lib.cli import build_parser
from lib.settings import settings_from_namespace

RUNS = Path("results/matrix-x/runs")


def _plan(defconfig: str, *overrides: str) -> Plan:
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / defconfig)
    if overrides:
        apply_overrides(kconf, seen, list(overrides))
    return build_plan(kconf, RUNS)


def test_lenet5_matrix_is_the_full_product():
    plan = _plan("test-matrix-lenet5")
    assert len(plan.runs) == 13 * 3 * 3 and plan.dropped == []
    assert len({r.id for r in plan.runs}) == len(plan.runs)
    assert {r.axes["method"] for r in plan.runs} == {"magnitude", "movement", "spt"} | {f"bitter{i}" for i in range(10)}
    assert {r.axes["target_sparsity"] for r in plan.runs} == {0.5, 0.7, 0.9}
    assert {r.seed for r in plan.runs} == {1337, 1338, 1339}
    assert plan.baseline == "lenet5-adamwprune-magnitude-sp0.5-cubic-ramp"


def test_every_run_differs_from_its_arm_only_in_the_axes():
    """The flags of a run are the base configuration plus the axis values, nothing else."""
    plan = _plan("test-matrix-lenet5")
    parser = build_parser("lenet5", prog="x", description="")
    by_run = {r.id: settings_from_namespace(parser.parse_args(r.argv)) for r in plan.runs}
    reference = by_run[plan.runs[0].id]
    # bitter4 means layer-adaptive scope: its sparsity_scope axis (and setting) says so
    axis_fields = {"pruning_method", "state_variant", "target_sparsity", "seed", "run_name", "sparsity_scope"}
    for run in plan.runs:
        s = by_run[run.id]
        assert s.run_name == run.id and s.output_dir == str(RUNS)
        assert s.seed == run.seed and s.target_sparsity == run.axes["target_sparsity"]
        assert (s.state_variant if s.pruning_method == "state" else s.pruning_method) == run.axes["method"]
        assert s.sparsity_scope == run.axes["sparsity_scope"] == ("layer-adaptive" if run.axes["method"] == "bitter4"
                                                                  else "global")
        # bitter0-2 default to a linear schedule: the plan pins the base's schedule for every arm
        assert s.schedule == "cubic-ramp"
        for name, value in vars(s).items():
            if name not in axis_fields:
                assert value == getattr(reference, name), (run.id, name)


def test_invalid_combinations_are_dropped_with_a_reason():
    plan = _plan("gpt2-bitter7-vs-magnitude", "MATRIX_OPTIMIZER_ADAMW=y", "MATRIX_OPTIMIZER_ADAMWPRUNE=y",
                 "MATRIX_METHOD_NONE=y")
    assert [r.id for r in plan.runs] == [
        "gpt2-adamw-none-seed1337", "gpt2-adamw-magnitude-sp0.5-cubic-ramp-seed1337",
        "gpt2-adamwprune-none-seed1337", "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp-seed1337",
        "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-seed1337"]
    assert len(plan.dropped) == 1
    assert plan.dropped[0]["axes"]["optimizer"] == "adamw" and plan.dropped[0]["axes"]["method"] == "bitter7"
    assert "needs OPTIMIZER=adamwprune" in plan.dropped[0]["reason"]
    assert "needs OPTIMIZER=adamwprune" in plan_table(plan)


def test_a_combination_the_strict_rules_reject_is_dropped_not_run():
    # bitter4's layer-adaptive sparsity caps every layer at 95%
    plan = _plan("test-matrix-bitter-variants", "MATRIX_SPARSITY_LIST=0.97")
    assert not any(r.axes["method"] == "bitter4" and r.axes["target_sparsity"] == 0.97 for r in plan.runs)
    reasons = [d["reason"] for d in plan.dropped if d["axes"]["method"] == "bitter4"]
    assert reasons and "0.95" in reasons[0]


def test_unselected_axes_keep_the_base_value_and_seeds_count_up():
    plan = _plan("gpt2-bitter7-vs-magnitude", "MATRIX_SEEDS=2", "SEED=7")
    assert {r.axes["target_sparsity"] for r in plan.runs} == {0.5}
    assert sorted({r.seed for r in plan.runs}) == [7, 8]
    assert len(plan.runs) == 4


def test_bad_sparsity_list_is_an_error():
    with pytest.raises(ConfigError, match="MATRIX_SPARSITY_LIST: 1.5 is outside"):
        _plan("demo", "MATRIX_SPARSITY_LIST=0.6,1.5")


def test_plan_hash_ignores_where_the_runs_go_but_not_what_they_run():
    kconf, _ = read_config(REPO_ROOT / "defconfigs" / "demo")
    a, b = build_plan(kconf, Path("x/runs")), build_plan(kconf, Path("y/runs"))
    assert a.plan_hash == b.plan_hash
    assert _plan("demo", "MATRIX_SEEDS=2").plan_hash != a.plan_hash
    assert Plan.from_json(a.to_json()).runs == a.runs
    assert plan_hash(Plan.from_json(a.to_json())) == a.plan_hash


def test_dense_arms_are_not_multiplied_by_sparsity_or_schedule():
    plan = _plan("gpt2-bitter7-vs-magnitude", "MATRIX_METHOD_NONE=y", "MATRIX_SPARSITY_50=y", "MATRIX_SPARSITY_70=y")
    dense = [r for r in plan.runs if r.axes["method"] == "none"]
    assert len(dense) == 1 and "--target-sparsity" not in dense[0].argv
