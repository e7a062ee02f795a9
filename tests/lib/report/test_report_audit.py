"""The fairness audit finds what differs besides the intended axis, and nothing in a fair pair."""

from __future__ import annotations

from lib.report.audit import audit_matrix
from lib.report.baseline import baseline_for
from lib.report.runs import load_matrix

SEEDS = (1337, 1338, 1339)
MAG = "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp"
BIT = "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp"


def _ab(builder, bitter7: dict | None = None, seeds_bitter7=SEEDS, **bitter_kw):
    """Magnitude (baseline) vs bitter7, 3 seeds; `bitter7` settings/summary overrides tamper with one arm."""
    for seed in SEEDS:
        builder.add(method="magnitude", seed=seed, quality=50.0)
    for seed in seeds_bitter7:
        builder.add(method="bitter7", seed=seed, quality=48.0, **(bitter7 or {}), **bitter_kw)
    return audit_matrix(load_matrix(builder.write()))


def _only(audit, a=MAG, b=BIT):
    [c] = [c for c in audit.comparisons if {c.a, c.b} == {a, b}]
    return c


def test_fair_pair_has_no_differences(builder):
    c = _only(_ab(builder))
    assert c.axes == ("method",) and c.reason == "baseline"
    assert c.differences == [] and c.fair and c.verdict == "fair"


def test_fair_matrix_with_failed_and_diverged_runs(ab_builder):
    audit = audit_matrix(load_matrix(ab_builder.write()))
    assert len(audit.comparisons) == 2  # bitter7 and adamw-magnitude, each against the baseline
    assert all(c.fair for c in audit.comparisons), [str(d) for c in audit.comparisons for d in c.differences]
    assert audit.inconsistencies == []


def test_schedule_frequency(builder):
    c = _only(_ab(builder, {"settings": {"schedule_frequency": 10}}))
    assert [str(d) for d in c.differences] == [
        "schedule.frequency: 20 vs 10 (setting schedule_frequency: 20 vs 10)"]
    assert c.verdict == "1 difference"


def test_schedule_kind_and_end(builder):
    c = _only(_ab(builder, {"settings": {"schedule": "linear", "schedule_end": 180}}))
    assert {str(d) for d in c.differences} == {
        "schedule.kind: cubic-ramp vs linear (setting schedule: cubic-ramp vs linear)",
        "schedule.end: 160 vs 180 (setting schedule_end: 160 vs 180)"}


def test_iterations_actually_run(builder):
    """A variant that silently got more steps (VARIANT_BUDGET) shows up though max_iters is the same."""
    c = _only(_ab(builder, {"summary": {"iterations": 340, "iterations_planned": 340, "budget_multiplier": 1.7}}))
    assert {str(d) for d in c.differences} == {"iterations: 200 vs 340", "budget_multiplier: 1.0 vs 1.7"}


def test_weight_decay_as_built(builder):
    c = _only(_ab(builder, {"settings": {"weight_decay": 0.1}}))
    assert [str(d) for d in c.differences] == ["optimizer.weight_decay: 0.0 vs 0.1 (setting weight_decay: 0.0 vs 0.1)"]


def test_optimizer_as_built_without_a_setting_difference(builder):
    """The optimizer description disagrees though the settings agree: the built optimizer is what ran."""
    c = _only(_ab(builder, {"summary": {"optimizer": {"name": "adamwprune", "class": "AdamW", "base": "adamw",
                                                      "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.0,
                                                      "amsgrad": True}}}))
    assert [str(d) for d in c.differences] == ["optimizer.amsgrad: false vs true"]


def test_seed_sets(builder):
    c = _only(_ab(builder, seeds_bitter7=(1337, 1338)))
    assert [str(d) for d in c.differences] == ["seeds: {1337, 1338, 1339} vs {1337, 1338}"]


def test_a_failed_seed_changes_the_seed_set(builder):
    for seed in SEEDS:
        builder.add(method="magnitude", seed=seed)
        builder.add(method="bitter7", seed=seed, status="diverged" if seed == 1339 else "complete")
    c = _only(audit_matrix(load_matrix(builder.write())))
    assert [str(d) for d in c.differences] == ["seeds: {1337, 1338, 1339} vs {1337, 1338}"]


def test_adaptive_warp(builder):
    adaptive = {"params": 7240448, "spt_epsilon": 0.01, "frequency": 100, "early_share": 0.75, "warp": 1.0,
                "frequency_used": 100, "warp_used": 1.0}
    for seed in SEEDS:
        builder.add(method="magnitude", seed=seed, summary={"adaptive": adaptive})
        builder.add(method="bitter7", seed=seed, summary={"adaptive": {**adaptive, "warp_used": 1.6}})
    c = _only(audit_matrix(load_matrix(builder.write())))
    assert [str(d) for d in c.differences] == ["adaptive.warp_used: 1.0 vs 1.6"]


def test_dataset_and_model_size(builder):
    c = _only(_ab(builder, {"summary": {"dataset": "fineweb", "params": 124_000_000}}))
    assert {str(d) for d in c.differences} == {"dataset: shakespeare vs fineweb", "params: 7240448 vs 124000000"}


def test_per_run_settings_are_ignored(builder):
    c = _only(_ab(builder, {"settings": {"threads": 4, "output_dir": "elsewhere"}, "summary": {"device": "cuda:1"}},
                  ))
    assert [str(d) for d in c.differences] == ["device: cpu vs cuda"]  # the device kind matters, threads do not


def test_tracker_settings_are_not_differences(builder):
    """Where a run reports (W&B, trackio, TensorBoard) says nothing about what it ran."""
    c = _only(_ab(builder, {"settings": {"track_tensorboard": True, "track_group": "mine"}}))
    assert c.differences == [] and c.fair


def _structure_run(builder, method: str, structure: str, seed: int, scope: str = "global", **kw):
    """A run with the settings and summary facts a real run of that structure and scope records."""
    nm = {"n": 2, "m": 4} if structure == "nm" else {}
    builder.add(method=method, seed=seed, axes={"sparsity_structure": structure},
                settings={"sparsity_structure": structure, "sparsity_scope": scope,
                          "nm_n": 2 if structure == "nm" else None, "nm_m": 4 if structure == "nm" else None},
                summary={"sparsity_structure": {"kind": structure, "group": "weight", "scope": scope, **nm,
                                                "groups": 100}, **kw.pop("summary", {})}, **kw)


def test_structure_axis_explains_its_own_settings_and_facts(builder):
    """Unstructured vs 2:4: N, M and the structure facts differ by design; another scope would not."""
    for seed in SEEDS:
        _structure_run(builder, "magnitude", "unstructured", seed)
        _structure_run(builder, "magnitude", "nm", seed, summary={"prunable_params": 7})
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert c.axes == ("sparsity_structure",) and c.differences == [] and c.fair


def test_a_scope_the_axes_do_not_explain_is_reported(builder):
    for seed in SEEDS:
        _structure_run(builder, "magnitude", "nm", seed)
        _structure_run(builder, "bitter7", "nm", seed, scope="layer")
    c = _only(audit_matrix(load_matrix(builder.write())), a="gpt2-adamwprune-magnitude-sp0.5-cubic-ramp-nm",
              b="gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-nm")
    assert not c.fair
    assert "sparsity_structure.scope: global vs layer" in [str(d).split(" (")[0] for d in c.differences]


def test_a_method_that_implies_its_scope_is_fair_on_the_method_axis(builder):
    """bitter4 means bitter3's score with layer-adaptive scope: that scope is part of the method."""
    for seed in SEEDS:
        _structure_run(builder, "magnitude", "unstructured", seed)
        _structure_run(builder, "bitter4", "unstructured", seed, scope="layer-adaptive")
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert c.axes == ("method",) and c.differences == [] and c.fair


def test_an_arm_of_another_structure_is_measured_against_the_baseline_method_at_that_structure(builder):
    for seed in SEEDS:
        for structure in ("unstructured", "nm"):
            _structure_run(builder, "magnitude", structure, seed)
            _structure_run(builder, "bitter7", structure, seed)
    matrix = load_matrix(builder.write())
    arm = next(a for a in matrix.arms if a.id.endswith("bitter7-sp0.5-cubic-ramp-nm"))
    assert baseline_for(matrix, arm).id.endswith("magnitude-sp0.5-cubic-ramp-nm")


def test_intended_axis_is_not_a_difference(builder):
    """Sparsity sweep: target, schedule.final and the setting differ by design; the frequency does not."""
    for seed in SEEDS:
        builder.add(method="magnitude", target_sparsity=0.5, seed=seed)
        builder.add(method="magnitude", target_sparsity=0.7, seed=seed, settings={"schedule_frequency": 5})
    audit = audit_matrix(load_matrix(builder.write()))
    [c] = audit.comparisons
    assert c.axes == ("target_sparsity",) and c.reason == "one axis"
    assert [str(d) for d in c.differences] == ["schedule.frequency: 20 vs 5 (setting schedule_frequency: 20 vs 5)"]


def test_optimizer_axis_still_checks_shared_hyper_parameters(builder):
    for seed in SEEDS:
        builder.add(method="magnitude", optimizer="adamwprune", seed=seed)
        builder.add(method="magnitude", optimizer="adamw", seed=seed, settings={"weight_decay": 0.1})
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert c.axes == ("optimizer",)
    assert [str(d) for d in c.differences] == ["optimizer.weight_decay: 0.0 vs 0.1 (setting weight_decay: 0.0 vs 0.1)"]


def test_dense_arm_has_no_schedule_to_compare(builder):
    for seed in SEEDS:
        builder.add(method="magnitude", seed=seed)
        builder.add(method="none", seed=seed)
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert c.fair, [str(d) for d in c.differences]


def test_arms_of_different_models_are_not_compared(builder):
    for model in ("gpt2", "lenet5"):
        for method in ("magnitude", "bitter7"):
            builder.add(model=model, method=method, seed=1)
    audit = audit_matrix(load_matrix(builder.write()))
    pairs = {frozenset((c.a, c.b)) for c in audit.comparisons}
    assert pairs == {frozenset((f"{m}-adamwprune-magnitude-sp0.5-cubic-ramp",
                                f"{m}-adamwprune-bitter7-sp0.5-cubic-ramp")) for m in ("gpt2", "lenet5")}
    assert all(c.fair for c in audit.comparisons)


def test_seeds_of_one_arm_that_ran_differently(builder):
    for seed in SEEDS:
        builder.add(method="magnitude", seed=seed, settings={"max_iters": 300} if seed == 1339 else None)
        builder.add(method="bitter7", seed=seed)
    audit = audit_matrix(load_matrix(builder.write()))
    assert [str(i) for i in audit.inconsistencies] == ["iterations: 200 (seeds 1337, 1338) vs 300 (seeds 1339)"]
    assert [str(d) for d in _only(audit).differences] == [
        "iterations: {200, 300} vs 200 (setting max_iters: {200, 300} vs 200)"]


def test_arm_without_completed_run_is_not_audited(builder):
    for seed in SEEDS:
        builder.add(method="magnitude", seed=seed)
        builder.add(method="bitter7", seed=seed, status="failed", error="boom")
    c = _only(audit_matrix(load_matrix(builder.write())))
    assert not c.fair and c.verdict == f"not audited: no completed run in {BIT}"


SPAM_MAG = "gpt2-adamwspam-magnitude-sp0.5-cubic-ramp"
PRUNE_MAG = "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp"
PRUNE_BIT = "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp"


def _spam_vs_prune(builder):
    """OPTIMIZER {adamwspam, adamwprune} x {magnitude, bitter7}, ADAMWPRUNE_BASE at its default (adamw);
    adamwspam/bitter7 is dropped (state pruning needs adamwprune), adamwspam/magnitude is the baseline."""
    for seed in SEEDS:
        builder.add(optimizer="adamwspam", method="magnitude", seed=seed)
        builder.add(optimizer="adamwprune", method="magnitude", seed=seed)
        builder.add(optimizer="adamwprune", method="bitter7", seed=seed)
    return audit_matrix(load_matrix(builder.write()))


def test_arm_on_another_optimizer_than_its_baseline_is_confounded_not_fair(builder):
    audit = _spam_vs_prune(builder)
    c = _only(audit, SPAM_MAG, PRUNE_BIT)
    assert c.reason == "baseline" and c.axes == ("optimizer", "method")
    assert c.confounded and not c.fair and c in audit.unfair
    assert c.verdict == "confounded: differs in 2 axes (optimizer, method)"
    ran = {str(d) for d in c.intended}  # what AdamWSPAM vs "adamwprune" really meant
    assert {"optimizer.class: AdamWSPAM vs AdamW", "optimizer.base: adamwspam vs adamw",
            "optimizer.theta: 5000.0 vs (absent)", "optimizer.interval: 500 vs (absent)",
            "optimizer.warmup: 150 vs (absent)"} <= ran
    # One axis apart, each pair is fair: the optimizer axis alone, and the method axis alone.
    assert _only(audit, SPAM_MAG, PRUNE_MAG).fair and _only(audit, SPAM_MAG, PRUNE_MAG).axes == ("optimizer",)
    assert _only(audit, PRUNE_MAG, PRUNE_BIT).fair and _only(audit, PRUNE_MAG, PRUNE_BIT).axes == ("method",)


def test_spam_hyper_parameters_are_compared(builder):
    for seed in SEEDS:
        builder.add(optimizer="adamwspam", method="magnitude", seed=seed)
        builder.add(optimizer="adamwspam", method="movement", seed=seed,
                    settings={"spam_theta": 1000.0, "spam_interval": 200})
    [c] = audit_matrix(load_matrix(builder.write())).comparisons
    assert {str(d) for d in c.differences} == {
        "optimizer.theta: 5000.0 vs 1000.0 (setting spam_theta: 5000.0 vs 1000.0)",
        "optimizer.interval: 500 vs 200 (setting spam_interval: 500 vs 200)"}


def test_another_adamwprune_base_on_the_method_axis(builder):
    """Both arms say adamwprune, but one runs AdamWSPAM underneath: every fact of it is a difference."""
    for seed in SEEDS:
        builder.add(method="magnitude", seed=seed, settings={"adamwprune_base": "adamwspam"})
        builder.add(method="bitter7", seed=seed)
    c = _only(audit_matrix(load_matrix(builder.write())))
    assert c.axes == ("method",)
    assert {str(d) for d in c.differences} == {
        "optimizer.base: adamwspam vs adamw (setting adamwprune_base: adamwspam vs adamw)",
        "optimizer.class: AdamWSPAM vs AdamW",
        "optimizer.theta: 5000.0 vs (absent) (setting spam_theta: 5000.0 vs null)",
        "optimizer.interval: 500 vs (absent) (setting spam_interval: 500 vs null)",
        "optimizer.warmup: 150 vs (absent) (setting spam_warmup: 150 vs null)"}
