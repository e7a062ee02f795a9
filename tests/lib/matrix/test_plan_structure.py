"""The structure and scope axes of the test matrix: expanded, named, and invalid pairs dropped with the reason."""

from __future__ import annotations

from lib.cli import build_parser
from lib.matrix.plan import plan_table
from lib.settings import settings_from_namespace
from tests.lib.matrix.test_plan import _plan


def _settings(run):
    return settings_from_namespace(build_parser(run.model, prog="x", description="").parse_args(run.argv))


def test_structure_ab_is_three_structures_by_two_methods():
    plan = _plan("structure-ab")
    assert plan.dropped == []
    assert [r.id for r in plan.runs] == [
        "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp-seed1337",
        "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp-nm-seed1337",
        "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp-channel-seed1337",
        "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-seed1337",
        "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-nm-seed1337",
        "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-channel-seed1337"]
    for run in plan.runs:
        s = _settings(run)
        assert s.sparsity_structure == run.axes["sparsity_structure"]
        assert s.sparsity_scope == run.axes["sparsity_scope"] == "global"
        assert ("--nm-n" in run.argv) == (s.sparsity_structure == "nm")
    assert "| nm | global |" in plan_table(plan)


def test_nm_above_its_pattern_and_channel_by_row_are_dropped_with_the_reason():
    plan = _plan("structure-ab", "MATRIX_SPARSITY_50=y", "MATRIX_SPARSITY_70=y", "MATRIX_SCOPE_GLOBAL=y",
                 "MATRIX_SCOPE_ROW=y", "MATRIX_VARIANT_BITTER7=n")
    kept = {(r.axes["sparsity_structure"], r.axes["target_sparsity"], r.axes["sparsity_scope"]) for r in plan.runs}
    assert kept == {(st, sp, sc) for st in ("unstructured", "nm", "channel") for sp in (0.5, 0.7)
                    for sc in ("global", "row")} - {("nm", 0.7, "global"), ("nm", 0.7, "row"),
                                                   ("channel", 0.5, "row"), ("channel", 0.7, "row")}
    reasons = {(d["axes"]["sparsity_structure"], d["axes"]["target_sparsity"], d["axes"]["sparsity_scope"]):
               d["reason"] for d in plan.dropped}
    assert set(reasons) == {("nm", 0.7, "global"), ("nm", 0.7, "row"), ("channel", 0.5, "row"),
                            ("channel", 0.7, "row")}
    assert "0.7 is above 0.5 = (M-N)/M" in reasons[("nm", 0.7, "global")]
    assert "row cannot be used with SPARSITY_STRUCTURE=channel" in reasons[("channel", 0.5, "row")]
    assert "-row-seed" in next(r.id for r in plan.runs if r.axes["sparsity_scope"] == "row")


def test_bitter4_keeps_its_scope_unless_a_scope_is_swept_that_contradicts_it():
    plan = _plan("test-matrix-bitter-variants")
    bitter4 = next(r for r in plan.runs if r.axes["method"] == "bitter4")
    assert bitter4.axes["sparsity_scope"] == "layer-adaptive" == _settings(bitter4).sparsity_scope
    assert bitter4.id == "lenet5-adamwprune-bitter4-sp0.7-cubic-ramp-seed1337"  # its own scope is not named
    plan = _plan("test-matrix-bitter-variants", "MATRIX_SCOPE_GLOBAL=y", "MATRIX_SCOPE_LAYER_ADAPTIVE=y")
    assert [r.axes["sparsity_scope"] for r in plan.runs if r.axes["method"] == "bitter4"] == ["layer-adaptive"]
    dropped = [d for d in plan.dropped if d["axes"]["method"] == "bitter4"]
    assert len(dropped) == 1 and "conflicts with bitter4" in dropped[0]["reason"]
    assert any(r.id.endswith("bitter3-sp0.7-cubic-ramp-layer-adaptive-seed1337") for r in plan.runs)


def test_dense_arms_have_no_structure():
    plan = _plan("structure-ab", "MATRIX_METHOD_NONE=y")
    dense = [r for r in plan.runs if r.axes["method"] == "none"]
    assert len(dense) == 1 and dense[0].axes["sparsity_structure"] == "none"
    assert "--sparsity-structure" not in dense[0].argv
