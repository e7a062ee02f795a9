"""bench-pruning's ratios pair two arms timed back to back in one round and take the median round."""

from __future__ import annotations

from bench.pruning import median_round, rounds


def test_the_median_round_is_a_round_not_the_best_of_each_arm():
    times = [[1.0, 10.0], [2.0, 1.0], [3.0, 3.0], [0.4, 0.5], [9.0, 1.0]]
    # Ratios 0.1, 2, 1, 0.8, 9: the median is round 2's (the best of each arm, round 3's, has ratio 0.8).
    assert median_round(times, lambda a, b: a / b) == [3.0, 3.0]
    assert median_round(times[:4], lambda a, b: a / b) == [3.0, 3.0]  # even count: the upper of the two middle


def test_rounds_time_every_arm_once_per_round_in_order():
    calls = []
    times = rounds([lambda: calls.append("a"), lambda: calls.append("b")], 3)
    assert calls == ["a", "b"] * 3
    assert len(times) == 3 and all(len(r) == 2 and all(t >= 0 for t in r) for r in times)
