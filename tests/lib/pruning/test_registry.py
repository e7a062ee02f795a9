"""The method and variant tables against everything that lists them: Kconfig, the matrix, the scores."""

from __future__ import annotations

import pytest

from lib.kconfig import load_kconfig
from lib.matrix.plan import SELECTORS
from lib.pruning import registry, scores
from lib.pruning.methods import build_method
from lib.pruning.registry import METHODS, VARIANTS


@pytest.fixture(scope="module")
def kconf():
    return load_kconfig()


def _members(kconf, choice: str) -> list[tuple[str, str]]:
    """(value, prompt) of each member of a named choice, in menu order."""
    prefix = choice + "_"
    return [(sym.name[len(prefix):].lower(), sym.nodes[0].prompt[0]) for sym in kconf.named_choices[choice].syms]


def test_pruning_method_members_are_the_method_table(kconf):
    assert _members(kconf, "PRUNING_METHOD") == [(m.name, f"{m.name}: {m.help}") for m in METHODS]


def test_state_variant_members_are_the_variant_table(kconf):
    assert _members(kconf, "STATE_VARIANT") == [(v.name, f"{v.name}: {v.help}") for v in VARIANTS]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_prompt_states_budget_and_layer_adaptive_selection(variant):
    # The prompt is what a user choosing a variant reads: it must not hide a budget or a per-layer selection.
    assert (f"budget x{variant.budget:.2f}" in variant.help) == (variant.budget != 1.0)
    assert ("layer-adaptive" in variant.help) == variant.layer_adaptive


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_kconfig_default_schedule_per_variant(kconf, variant):
    kconf.syms["OPTIMIZER_ADAMWPRUNE"].set_value(2)
    kconf.syms["PRUNING_METHOD_STATE"].set_value(2)
    kconf.syms[f"STATE_VARIANT_{variant.name.upper()}"].set_value(2)
    assert kconf.named_choices["STATE_VARIANT"].selection.name == f"STATE_VARIANT_{variant.name.upper()}"
    schedule = kconf.named_choices["SCHEDULE"].selection.name
    assert schedule == "SCHEDULE_" + variant.schedule.upper().replace("-", "_")


def test_matrix_selectors_are_the_tables(kconf):
    method_symbols = {name for name in kconf.syms
                      if name.startswith(("MATRIX_METHOD_", "MATRIX_VARIANT_")) and kconf.syms[name].nodes}
    selected = {sym: value for sym, (axis, value) in SELECTORS.items() if axis == "method"}
    assert set(selected) == method_symbols
    assert list(selected.values()) == list(registry.MATRIX_METHODS)
    assert registry.MATRIX_METHODS == ("none", "magnitude", "movement", "spt", "wanda", "sparsegpt") + \
        registry.VARIANT_NAMES
    for v in VARIANTS:
        assert selected[f"MATRIX_VARIANT_{v.name.upper()}"] == v.name


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_row_builds_its_own_score(variant):
    method = build_method("state", variant.name)
    assert method.fn is getattr(scores, variant.score) is scores.STATE_VARIANTS[variant.name]
    # A function shared by two rows must be non-negative for both or neither: the pruner reads the flag from it.
    assert method.nonnegative == variant.nonnegative
    assert callable(method.fn) and method.fn.__module__ == "lib.pruning.scores"


def test_derived_tables():
    assert registry.BUDGET_MULTIPLIERS == {"bitter2": 1.21, "bitter3": 1.30, "bitter4": 1.30, "bitter7": 1.70}
    assert registry.LAYER_ADAPTIVE_VARIANTS == {"bitter4"}
    assert build_method("magnitude").nonnegative is True
    assert build_method("movement").nonnegative is False and build_method("spt").nonnegative is False


@pytest.mark.parametrize("row", [m for m in METHODS if m.name not in ("none", "state")], ids=lambda m: m.name)
def test_every_method_is_as_nonnegative_as_its_row_says(row):
    assert build_method(row.name).nonnegative == row.nonnegative


def test_prune_only_methods_are_those_that_need_no_training():
    assert registry.PRUNE_ONLY_METHODS == {"magnitude", "wanda", "sparsegpt"}


@pytest.mark.parametrize("method, scope", [("none", "global"), ("magnitude", "global"), ("wanda", "row"),
                                           ("sparsegpt", "layer")])
def test_kconfig_default_scope_per_method_is_the_table(kconf, method, scope):
    kconf.syms[f"PRUNING_METHOD_{method.upper()}"].set_value(2)
    if method != "none":
        assert kconf.named_choices["SPARSITY_SCOPE"].selection.name == f"SPARSITY_SCOPE_{scope.upper()}"
    assert registry.scope_in_use(None, method, None) == scope


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown state variant 'bitter-x'"):
        build_method("state", "bitter-x")
