"""The pruning methods and the state variants: one table each, one row per name.

Everything that lists methods or variants is derived from these two tables:
the score lookup and the non-negative set (lib/pruning/scores.py), the budget
multipliers and layer-adaptive selection (lib/pruning/build.py), the scope a
method or variant means and the ones it refuses (IMPLIED_SCOPE, FIXED_SCOPE,
method_problem), the methods that may run prune-only, the matrix
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
    scope: str | None = None  # the SPARSITY_SCOPE it uses when none is set (Kconfig's default with it)
    fixed_scope: bool = False  # ... and it refuses any other scope
    structures: tuple[str, ...] = ()  # the only SPARSITY_STRUCTUREs it accepts (empty: every one)
    why: str = ""  # why it refuses other scopes or structures, for the configuration error
    temporaries: int = 0  # float32 score-chunk-sized temporaries its score holds at once (TEMPORARIES)


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
    temporaries: int = 0           # as MethodRow.temporaries; checked against torch.profiler by the tests

    @property
    def layer_adaptive(self) -> bool:
        """Depth-scaled per-layer sparsity instead of one global threshold."""
        return self.scope == "layer-adaptive"


METHODS: tuple[MethodRow, ...] = (
    MethodRow("none", "dense training, no pruning"),
    MethodRow("magnitude", "score |w|", nonnegative=True, prune_only=True),
    MethodRow("movement", "score -sum(grad * w) (Sanh et al. 2020)"),
    MethodRow("spt", "explored loss change when a weight is removed (seed 000)"),
    MethodRow("wanda", "|W|·‖X‖ per output row, calibration inputs (Sun et al. 2023)", nonnegative=True,
              prune_only=True, scope="row"),
    MethodRow("sparsegpt", "layer-wise reconstruction with the inverse Hessian of the calibration inputs "
              "(Frantar & Alistarh 2023)", prune_only=True, scope="layer", fixed_scope=True,
              structures=("unstructured", "nm"),
              why="SparseGPT reconstructs each layer from its own inputs, so it prunes every layer to the "
                  "same fraction (scope layer), and it chooses single weights (unstructured, or N:M as in its "
                  "paper): whole tiles or units would need another reconstruction"),
    MethodRow("state", "score from the optimizer's Adam moments (bitter variants)"),
)

VARIANTS: tuple[Variant, ...] = (
    Variant("bitter0", "bitter0", True, "|w| * |m| * |w| / (sqrt(v) + eps)", schedule="linear", temporaries=1),
    Variant("bitter1", "magnitude", True, "|w|", schedule="linear"),
    Variant("bitter2", "magnitude", True, "|w|, budget x1.21", budget=1.21, schedule="linear"),
    Variant("bitter3", "bitter3", True, "|w| * sqrt(|m| + eps), budget x1.30", budget=1.30),
    Variant("bitter4", "bitter3", True, "bitter3 score, layer-adaptive sparsity, budget x1.30", budget=1.30,
            scope="layer-adaptive"),
    Variant("bitter5", "bitter5", False, "-mtz + 0.1 * |w|", temporaries=2),
    Variant("bitter6", "bitter6", True, "|w| * sqrt(|m| + eps) * sqrt(m^2 / (v + eps))", temporaries=2),
    Variant("bitter7", "bitter7", True, "|w| * (|v| + eps)^0.25, budget x1.70", budget=1.70),
    Variant("bitter8", "bitter8", True, "|w| * sqrt(|m / (1 - beta1^t)| + eps)"),
    Variant("bitter9", "bitter9", False, "|w| * sqrt(|m| + eps) - 0.1 * mtz", temporaries=2),
)

LAYER_CAP = 0.95  # under layer-adaptive sparsity no layer is pruned beyond this fraction

METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
PRUNE_ONLY_METHODS: frozenset[str] = frozenset(m.name for m in METHODS if m.prune_only)
BY_METHOD: dict[str, MethodRow] = {m.name: m for m in METHODS}
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in VARIANTS)
BY_VARIANT: dict[str, Variant] = {v.name: v for v in VARIANTS}
BUDGET_MULTIPLIERS: dict[str, float] = {v.name: v.budget for v in VARIANTS if v.budget != 1.0}
LAYER_ADAPTIVE_VARIANTS: frozenset[str] = frozenset(v.name for v in VARIANTS if v.layer_adaptive)
# The scope a method or variant (as the matrix's method axis names them) means when SPARSITY_SCOPE is not set:
# bitter4 layer-adaptive, wanda row, sparsegpt layer. FIXED_SCOPE: those that refuse any other.
IMPLIED_SCOPE: dict[str, str] = ({v.name: v.scope for v in VARIANTS if v.scope}
                                 | {m.name: m.scope for m in METHODS if m.scope})
FIXED_SCOPE: dict[str, str] = ({v.name: v.scope for v in VARIANTS if v.scope}
                               | {m.name: m.scope for m in METHODS if m.scope and m.fixed_scope})
# Per method or variant name: how many float32 temporaries, each the size of one score chunk
# (lib/pruning/scores.py, score_chunk), its score holds at once; a mask update's recorded peak adds them.
TEMPORARIES: dict[str, int] = {row.name: row.temporaries for row in (*METHODS, *VARIANTS)}

# Sparsity structures (SPARSITY_STRUCTURE) and selection scopes (SPARSITY_SCOPE), in menu order.
STRUCTURES: tuple[str, ...] = ("unstructured", "nm", "block", "channel")
SCOPES: tuple[str, ...] = ("global", "layer", "layer-adaptive", "row")
NM_GROUP_LENGTHS: tuple[int, ...] = (4, 8)  # the M of N:M that kprune accepts
# Structure x scope pairs that make no sense, with the reason a configuration error gives.
REFUSED_SCOPES: dict[tuple[str, str], str] = {
    ("channel", "row"): "a channel unit is itself a whole row (and its inputs): there is no row to share "
                        "the fraction within; use SPARSITY_SCOPE=global, layer or layer-adaptive",
}


def scope_in_use(scope: str | None, method: str | None, variant: str | None) -> str:
    """SPARSITY_SCOPE as set, else the scope the variant or method means, else global."""
    return scope or IMPLIED_SCOPE.get(variant or "") or IMPLIED_SCOPE.get(method or "") or "global"


def method_problem(method: str | None, structure: str, scope: str) -> tuple[str, str] | None:
    """(symbol, why) if `method` (a METHODS name) refuses `structure` or `scope`; None when it accepts them."""
    row = BY_METHOD.get(method or "")
    if row is None:
        return None
    if row.structures and structure not in row.structures:
        return ("SPARSITY_STRUCTURE", f"{structure} cannot be used with PRUNING_METHOD={method}: {row.why}; set "
                f"SPARSITY_STRUCTURE to {' or '.join(row.structures)}")
    if row.fixed_scope and scope != row.scope:
        return ("SPARSITY_SCOPE", f"{scope} cannot be used with PRUNING_METHOD={method}: {row.why}; set "
                f"SPARSITY_SCOPE={row.scope}")
    return None


# What the test matrix sweeps on its method axis: every method but "state", then every variant by name.
MATRIX_METHODS: tuple[str, ...] = tuple(m for m in METHOD_NAMES if m != "state") + VARIANT_NAMES
