"""Student-t intervals and paired differences: checked against published quantiles and sums worked by hand."""

from __future__ import annotations

import math

import pytest

from lib.report.stats import ONE_SEED, estimate, paired, t_quantile, t_within, verdict

# Two-sided 95% (p = 0.975) and 99% (p = 0.995) quantiles from the standard t tables.
T_TABLE = {(0.975, 1): 12.706205, (0.975, 2): 4.302653, (0.975, 3): 3.182446, (0.975, 4): 2.776445,
           (0.975, 5): 2.570582, (0.975, 9): 2.262157, (0.975, 10): 2.228139, (0.975, 29): 2.045230,
           (0.975, 30): 2.042272, (0.975, 100): 1.983972, (0.975, 1000): 1.962339,
           (0.995, 4): 4.604095, (0.995, 10): 3.169273, (0.95, 7): 1.894579}


@pytest.mark.parametrize("p, df", sorted(T_TABLE))
def test_t_quantile_matches_the_tables(p, df):
    assert t_quantile(p, df) == pytest.approx(T_TABLE[(p, df)], abs=5e-7)


def test_t_within_closed_forms():
    # df 1 is Cauchy: P(|T| <= 1) = 1/2; df 2: P(|T| <= t) = t / sqrt(2 + t^2).
    assert t_within(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    assert t_within(3.0, 2) == pytest.approx(3 / math.sqrt(11), abs=1e-15)
    # Large df tends to the normal: P(|Z| <= 1.959964) = 0.95.
    assert t_within(1.959964, 100_000) == pytest.approx(0.95, abs=1e-5)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_estimate_worked_by_hand():
    # 10, 12, 14, 16: mean 13, std sqrt(20 / 3) = 2.581989, standard error 1.290994,
    # half-width t(0.975, 3) * 1.290994 = 3.182446 * 1.290994 = 4.108521.
    e = estimate([10.0, 12.0, 14.0, 16.0])
    assert (e.mean, e.n) == (13.0, 4)
    assert e.std == pytest.approx(2.581989, abs=1e-6)
    assert e.low == pytest.approx(13 - 4.108521, abs=1e-6) and e.high == pytest.approx(13 + 4.108521, abs=1e-6)
    one = estimate([5.0, float("nan")])  # non-finite values are not seeds that ran
    assert one.n == 1 and not one.has_interval and one.low is None
    assert estimate([]) is None


def test_paired_difference_over_matching_seeds():
    arm = {1: 9.0, 2: 11.5, 3: 10.0, 5: 1.0}
    base = {1: 10.0, 2: 12.0, 3: 11.5, 4: 3.0}
    p = paired(arm, base)
    assert p.seeds == [1, 2, 3] and p.only_arm == [5] and p.only_base == [4]
    # differences -1.0, -0.5, -1.5: mean -1.0, std 0.5, half-width 4.302653 * 0.5 / sqrt(3) = 1.242069
    d = p.difference
    assert d.mean == pytest.approx(-1.0) and d.std == pytest.approx(0.5)
    assert (d.low, d.high) == (pytest.approx(-2.242069, abs=1e-6), pytest.approx(0.242069, abs=1e-6))
    assert verdict(d, lower_is_better=True) == "not significant"
    assert paired({1: 2.0}, {2: 1.0}).difference is None


def test_verdict_follows_the_metrics_direction():
    lower = estimate([-1.0, -1.2, -0.9])  # interval below 0
    assert verdict(lower, lower_is_better=True) == "better"  # perplexity fell
    assert verdict(lower, lower_is_better=False) == "worse"  # accuracy fell
    higher = estimate([0.01, 0.012, 0.011])
    assert verdict(higher, lower_is_better=False) == "better"
    assert verdict(higher, lower_is_better=True) == "worse"
    assert verdict(estimate([0.3]), lower_is_better=True) == ONE_SEED == "one seed: no interval, run more seeds"
    assert verdict(estimate([-1.0, 1.0, 0.5]), lower_is_better=True) == "not significant"
