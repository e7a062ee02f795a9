"""Mean, spread and 95% confidence intervals over seeds, the one way the plots and the report aggregate.

Intervals use Student's t distribution with n − 1 degrees of freedom. Its
quantile is computed here, exactly, rather than taken from scipy (not a
dependency): for a whole number of degrees of freedom the two-sided
probability P(|T| ≤ t) is a finite trigonometric sum (Abramowitz & Stegun
26.7.3–4), which bisection inverts to full double precision.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

LEVEL = 0.95  # every interval in the report and the plots
ONE_SEED = "one seed: no interval, run more seeds"


@dataclass(frozen=True)
class Spread:
    """Values over seeds: mean, sample standard deviation (n - 1; 0 for one value), min, max and n."""

    mean: float
    std: float
    low: float
    high: float
    n: int


def spread(values: list[float]) -> Spread | None:
    """The spread of the finite `values`, or None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return Spread(mean=statistics.fmean(finite), std=std, low=min(finite), high=max(finite), n=len(finite))


def t_within(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with a whole number `df` ≥ 1 of degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, not {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin θ · Σ_k (1·3···(2k−1))/(2·4···2k) cos^2k θ, k = 0 … df/2 − 1
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    # (2/π)(θ + sin θ cos θ · Σ_k (2·4···2k)/(3·5···(2k+1)) cos^2k θ), k = 0 … (df − 3)/2
    if df == 1:
        return 2 * theta / math.pi
    term = total = 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = p, for 0.5 ≤ p < 1 (t(0.975, 2) = 4.302653)."""
    if not 0.5 <= p < 1.0:
        raise ValueError(f"p must lie in [0.5, 1), not {p}")
    within = 2 * p - 1
    low, high = 0.0, 1.0
    while t_within(high, df) < within:
        high *= 2
    for _ in range(200):  # bisection: P(|T| ≤ t) rises with t
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if t_within(mid, df) < within else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with its sample standard deviation and 95% interval (none for one value)."""

    mean: float
    std: float
    n: int
    low: float | None
    high: float | None

    @property
    def has_interval(self) -> bool:
        return self.low is not None


def estimate(values: list[float], level: float = LEVEL) -> Estimate | None:
    """Mean ± t(1 − α/2, n − 1) · std / √n over the finite `values`; None when there are none."""
    s = spread(values)
    if s is None:
        return None
    if s.n < 2:
        return Estimate(s.mean, 0.0, 1, None, None)
    half = t_quantile((1 + level) / 2, s.n - 1) * s.std / math.sqrt(s.n)
    return Estimate(s.mean, s.std, s.n, s.mean - half, s.mean + half)


@dataclass(frozen=True)
class Paired:
    """An arm minus its baseline, seed by seed over the seeds both completed."""

    difference: Estimate | None  # None when no seed is shared
    seeds: list[Any]
    only_arm: list[Any] = field(default_factory=list)  # seeds without a baseline run to pair with
    only_base: list[Any] = field(default_factory=list)


def _seed_order(seeds) -> list[Any]:
    return sorted(seeds, key=lambda s: (str(type(s)), s))


def paired(arm: dict[Any, float], base: dict[Any, float], level: float = LEVEL) -> Paired:
    """The paired difference `arm[seed] − base[seed]` over the seeds both hold a finite value for."""
    arm = {k: v for k, v in arm.items() if v is not None and math.isfinite(v)}
    base = {k: v for k, v in base.items() if v is not None and math.isfinite(v)}
    shared = _seed_order(set(arm) & set(base))
    return Paired(difference=estimate([arm[s] - base[s] for s in shared], level), seeds=shared,
                  only_arm=_seed_order(set(arm) - set(base)), only_base=_seed_order(set(base) - set(arm)))


def verdict(difference: Estimate | None, lower_is_better: bool | None) -> str:
    """"better", "worse" or "not significant" from the interval of arm − baseline; one seed says so."""
    if difference is None:
        return "no seed in common"
    if not difference.has_interval:
        return ONE_SEED
    if difference.low <= 0.0 <= difference.high:
        return "not significant"
    if lower_is_better is None:  # a metric whose direction the report does not know
        return "significant, higher" if difference.mean > 0 else "significant, lower"
    return "better" if (difference.mean < 0) == lower_is_better else "worse"
