"""Per-step curves of one arm, aggregated over its seeds from metrics.jsonl rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lib.report.runs import Run
from lib.report.stats import estimate, spread


@dataclass(frozen=True)
class Curve:
    """A metric by step: mean, min and max over the runs that logged that step, and how many did."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    n: list[int]


def _by_step(run: Run, key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for row in run.metrics:
        value, step = row.get(key), row.get("step")
        if isinstance(step, int) and isinstance(value, (int, float)) and math.isfinite(value):
            out[step] = float(value)  # training and eval rows of one step agree; the later one wins
    return out


def arm_curve(runs: list[Run], key: str) -> Curve | None:
    """`key` by step over `runs` (a step missing from some runs averages the others), or None if never logged."""
    per_run = [_by_step(r, key) for r in runs]
    steps = sorted(set().union(*per_run)) if per_run else []
    if not steps:
        return None
    curve = Curve([], [], [], [], [])
    for step in steps:
        s = spread([values[step] for values in per_run if step in values])
        curve.steps.append(step)
        curve.mean.append(s.mean)
        curve.low.append(s.low)
        curve.high.append(s.high)
        curve.n.append(s.n)
    return curve


@dataclass(frozen=True)
class DifferenceCurve:
    """Arm minus baseline by step, paired by seed: mean, 95% interval (NaN where one pair) and pairs per step."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    n: list[int]


def paired_curve(runs: list[Run], base_runs: list[Run], key: str) -> DifferenceCurve | None:
    """`key` of each run minus its baseline run with the same seed, by step; None when no step pairs up."""
    base = {r.seed: _by_step(r, key) for r in base_runs}
    pairs = [(_by_step(r, key), base[r.seed]) for r in runs if r.seed in base]
    steps = sorted({step for mine, theirs in pairs for step in mine if step in theirs})
    if not steps:
        return None
    curve = DifferenceCurve([], [], [], [], [])
    for step in steps:
        e = estimate([mine[step] - theirs[step] for mine, theirs in pairs if step in mine and step in theirs])
        curve.steps.append(step)
        curve.mean.append(e.mean)
        curve.low.append(e.low if e.has_interval else math.nan)
        curve.high.append(e.high if e.has_interval else math.nan)
        curve.n.append(e.n)
    return curve
