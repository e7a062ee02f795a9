"""The audit on a one-shot matrix: prune-only against fine-tuned is confounded; prune-only methods compare fairly.

The matrix records every run's MAX_ITERS as the axis `max_iters`
(lib/matrix/plan.py); a prune-only run has 0 and the one-shot schedule at
step 0.
"""

from __future__ import annotations

from lib.report.audit import audit_matrix
from lib.report.runs import load_matrix

SEEDS = (1337, 1338)
PRUNE_ONLY = {"max_iters": 0, "schedule_start": 0, "schedule_end": 1}  # the fixture's ramp needs an end
MAG = "gpt2-adamwprune-magnitude-sp0.5-one-shot-0"


def _prune_only(builder, method: str, seed: int, **kw):
    builder.add(method=method, schedule="one-shot", seed=seed, settings=PRUNE_ONLY, axes={"max_iters": 0}, **kw)


def _pair(audit, a: str, b: str):
    [c] = [c for c in audit.comparisons if {c.a, c.b} == {a, b}]
    return c


def test_a_prune_only_arm_against_a_fine_tuned_arm_is_confounded_by_iterations(builder):
    for seed in SEEDS:
        _prune_only(builder, "magnitude", seed, quality=400.0)
        builder.add(method="bitter7", seed=seed, axes={"max_iters": 200}, quality=60.0)
    audit = audit_matrix(load_matrix(builder.write()))
    c = _pair(audit, MAG, "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-200")
    assert c.reason == "baseline" and c.axes == ("method", "schedule", "max_iters")
    assert c.confounded and not c.fair and c in audit.unfair
    assert c.verdict.startswith("confounded: differs in 3 axes (method, schedule, max_iters)")
    assert "iterations: 0 vs 200" in [str(d) for d in c.intended]  # what the axis really changed


def test_prune_only_methods_at_the_same_structure_compare_fairly(builder):
    for seed in SEEDS:
        _prune_only(builder, "magnitude", seed, quality=400.0)
        _prune_only(builder, "wanda", seed, quality=300.0)
    audit = audit_matrix(load_matrix(builder.write()))
    c = _pair(audit, MAG, "gpt2-adamwprune-wanda-sp0.5-one-shot-0")
    assert c.axes == ("method",) and c.differences == [] and c.fair and c.verdict == "fair"


def test_iterations_are_what_the_max_iters_axis_changes(builder):
    """Two arms apart only in MAX_ITERS: the setting and the iterations run are the axis, not a difference."""
    for seed in SEEDS:
        _prune_only(builder, "magnitude", seed)
        builder.add(method="magnitude", schedule="one-shot", seed=seed, axes={"max_iters": 200},
                    settings={"schedule_start": 0, "schedule_end": 1})
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert c.axes == ("max_iters",) and c.differences == [] and c.fair
    assert [str(d) for d in c.intended] == ["iterations: 0 vs 200"]


def _scoped(builder, method: str, scope: str, seed: int):
    """A run whose plan axes record its scope, as the matrix plan does for every run."""
    builder.add(method=method, seed=seed, axes={"sparsity_scope": scope},
                settings={"sparsity_scope": scope}, summary={"sparsity_structure": {"kind": "unstructured",
                                                                                   "scope": scope}})


def test_the_scope_a_method_means_comes_with_the_method(builder):
    """bitter4 (and the one-shot methods) mean their own scope: against magnitude at global, one axis, fair."""
    for seed in SEEDS:
        _scoped(builder, "magnitude", "global", seed)
        _scoped(builder, "bitter4", "layer-adaptive", seed)
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert c.axes == ("method",) and c.differences == [] and c.fair


def test_a_scope_no_method_means_is_still_an_axis_of_its_own(builder):
    for seed in SEEDS:
        _scoped(builder, "magnitude", "layer", seed)
        _scoped(builder, "bitter7", "global", seed)
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert c.axes == ("method", "sparsity_scope") and c.confounded and not c.fair
