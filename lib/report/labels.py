"""Short names and fixed colours for arms, shared by every plot and the report."""

from __future__ import annotations

from typing import Any

from matplotlib import colormaps

from lib.report.runs import Arm, Matrix

# Axes whose values read on their own ("bitter7", "adamw"); the rest are shown as name=value.
_BARE = ("model", "optimizer", "method", "schedule")


def varying_axes(arms: list[Arm], axis_names: list[str]) -> list[str]:
    """The axes on which `arms` take more than one value, in plan order."""
    return [a for a in axis_names if len({repr(arm.axes.get(a)) for arm in arms}) > 1]


def format_axis(name: str, value: Any) -> str:
    if name == "target_sparsity":
        return f"sp{value:g}" if isinstance(value, (int, float)) else f"sp{value}"
    return str(value) if name in _BARE else f"{name}={value}"


def arm_label(matrix: Matrix, arm: Arm, leave_out: tuple[str, ...] = ()) -> str:
    """The arm by the axes that tell it from the other arms (e.g. "bitter7" or "adamw bitter7 sp0.7")."""
    axes = [a for a in varying_axes(matrix.arms, matrix.axis_names) if a not in leave_out]
    label = " ".join(format_axis(a, arm.axes.get(a)) for a in axes) or arm.method
    return f"{label} [{arm.source}]" if arm.source else label


def arm_colors(matrix: Matrix) -> dict[str, Any]:
    """One colour per arm in plan order, the same in every plot."""
    cmap = colormaps["tab10" if len(matrix.arms) <= 10 else "tab20"]
    return {arm.id: cmap(i % cmap.N) for i, arm in enumerate(matrix.arms)}
