"""The pruning methods and the state variants: one table each, one row per name.

Everything that lists methods or variants is derived from these two tables:
the score lookup and the non-negative set (lib/pruning/scores.py), the budget
multipliers and layer-adaptive selection (lib/pruning/build.py), the matrix
selectors and plan expansion (lib/matrix/plan.py) and the tests' parameter
lists. The Kconfig choice members (PRUNING_METHOD_*, STATE_VARIANT_*), their
prompts, the default schedule per variant and the MATRIX_* bools are checked
against the tables by tests/lib/pruning/test_registry.py.

The tables name their score functions instead of holding them, so that the
matrix planner can read them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodRow:
    """A value of PRUNING_METHOD."""

    name: str
    help: str          # the Kconfig prompt reads "<name>: <help>"
    nonnegative: bool = False  # scores are never negative (nor -0.0): their float bits are the selection keys
    prune_only: bool = False  # scores without training: may run prune-only (MAX_ITERS=0)


@dataclass(frozen=True)
class Variant:
    """A value of STATE_VARIANT: a score over the weight and AdamWPrune's moments."""

    name: str
    score: str         # the score function's name in lib/pruning/scores.py
    nonnegative: bool  # as MethodRow.nonnegative; checked on random inputs by the tests
    help: str          # the Kconfig prompt reads "<name>: <help>"
    budget: float = 1.0            # extra iterations the variant was published with (VARIANT_BUDGET)
    scope: str | None = None       # the SPARSITY_SCOPE the variant means (and refuses any other), if any
    schedule: str = "cubic-ramp"   # the SCHEDULE Kconfig defaults to when this variant is chosen

    @property
    def layer_adaptive(self) -> bool:
        """Depth-scaled per-layer sparsity instead of one global threshold."""
        return self.scope == "layer-adaptive"


METHODS: tuple[MethodRow, ...] = (
    MethodRow("none", "dense training, no pruning"),
    MethodRow("magnitude", "score |w|", nonnegative=True, prune_only=True),
    MethodRow("movement", "score -sum(grad * w) (Sanh et al. 2020)"),
    MethodRow("spt", "explored loss change when a weight is removed (seed 000)"),
    MethodRow("state", "score from the optimizer's Adam moments (bitter variants)"),
)

VARIANTS: tuple[Variant, ...] = (
    Variant("bitter0", "bitter0", True, "|w| * |m| * |w| / (sqrt(v) + eps)", schedule="linear"),
    Variant("bitter1", "magnitude", True, "|w|", schedule="linear"),
    Variant("bitter2", "magnitude", True, "|w|, budget x1.21", budget=1.21, schedule="linear"),
    Variant("bitter3", "bitter3", True, "|w| * sqrt(|m| + eps), budget x1.30", budget=1.30),
    Variant("bitter4", "bitter3", True, "bitter3 score, layer-adaptive sparsity, budget x1.30", budget=1.30,
            scope="layer-adaptive"),
    Variant("bitter5", "bitter5", False, "-mtz + 0.1 * |w|"),
    Variant("bitter6", "bitter6", True, "|w| * sqrt(|m| + eps) * sqrt(m^2 / (v + eps))"),
    Variant("bitter7", "bitter7", True, "|w| * (|v| + eps)^0.25, budget x1.70", budget=1.70),
    Variant("bitter8", "bitter8", True, "|w| * sqrt(|m / (1 - beta1^t)| + eps)"),
    Variant("bitter9", "bitter9", False, "|w| * sqrt(|m| + eps) - 0.1 * mtz"),
)

LAYER_CAP = 0.95  # under layer-adaptive sparsity no layer is pruned beyond this fraction

METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
PRUNE_ONLY_METHODS: frozenset[str] = frozenset(m.name for m in METHODS if m.prune_only)
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in VARIANTS)
BY_VARIANT: dict[str, Variant] = {v.name: v for v in VARIANTS}
BUDGET_MULTIPLIERS: dict[str, float] = {v.name: v.budget for v in VARIANTS if v.budget != 1.0}
LAYER_ADAPTIVE_VARIANTS: frozenset[str] = frozenset(v.name for v in VARIANTS if v.layer_adaptive)
IMPLIED_SCOPE: dict[str, str] = {v.name: v.scope for v in VARIANTS if v.scope}

# Sparsity structures (SPARSITY_STRUCTURE) and selection scopes (SPARSITY_SCOPE), in menu order.
STRUCTURES: tuple[str, ...] = ("unstructured", "nm", "block", "channel")
SCOPES: tuple[str, ...] = ("global", "layer", "layer-adaptive", "row")
NM_GROUP_LENGTHS: tuple[int, ...] = (4, 8)  # the M of N:M that kprune accepts
# Structure x scope pairs that make no sense, with the reason a configuration error gives.
REFUSED_SCOPES: dict[tuple[str, str], str] = {
    ("channel", "row"): "a channel unit is itself a whole row (and its inputs): there is no row to share "
                        "the fraction within; use SPARSITY_SCOPE=global, layer or layer-adaptive",
}
# What the test matrix sweeps on its method axis: every method but "state", then every variant by name.
MATRIX_METHODS: tuple[str, ...] = tuple(m for m in METHOD_NAMES if m != "state") + VARIANT_NAMES
