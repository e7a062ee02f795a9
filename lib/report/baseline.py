"""Which arm each arm's delta is taken against.

The plan names one baseline arm. An arm of another model or target sparsity
is compared with the arm that has the baseline's settings at its own model,
sparsity and sparsity structure (a perplexity is never compared with an
accuracy, 70% sparsity with 50%, nor a 2:4 arm with an unstructured one);
without such an arm, with the baseline itself if the
model is the same, else with nothing.
"""

from __future__ import annotations

from lib.report.runs import Arm, Matrix

CONTEXT_AXES = ("model", "target_sparsity", "sparsity_structure")


def baseline_for(matrix: Matrix, arm: Arm) -> Arm | None:
    """The arm `arm` is measured against (the baseline itself for the baseline arm), or None."""
    base = matrix.baseline
    if base is None or arm is base:
        return base
    wanted = {k: (arm.axes.get(k) if k in CONTEXT_AXES else v) for k, v in base.axes.items()}
    counterpart = next((a for a in matrix.arms if a.axes == wanted), None)
    if counterpart is not None:
        return counterpart
    return base if arm.model == base.model else None
