"""Sparsity schedules: golden values from SPEC §5, update steps, validation."""

from __future__ import annotations

import math

import pytest

from lib.pruning.schedules import CURVES, Schedule, ScheduleError

EXACT = 1e-12  # golden values are the formula's own numbers, not a band a neighbouring curve fits in


def _printed(value: float, percent: float, decimals: int) -> bool:
    """Whether `value` shows as `percent` % when printed with `decimals` decimals (half up, or truncated)."""
    scaled = value * 100 * 10 ** decimals
    return round(percent * 10 ** decimals) in (math.floor(scaled + 0.5 + 1e-9), math.floor(scaled + 1e-9))


# --- golden values ---------------------------------------------------------

# SPEC §5: zhu-gupta with s_f = 0.7 over 10,000 steps gives 40.5 / 61.3 / 68.9 % at 2500 / 5000 / 7500
# (seed 004's printed 48.8 % at 2500 is wrong: its own formula gives 40.5 %).
ZHU_GUPTA_SPEC = [(2500, 40.5), (5000, 61.3), (7500, 68.9)]
# SPEC §5: cubic-ramp with warmup 100 and target 50 %: ramp end 3000 -> 0.13 / 1.49 / 5.63 / 14.06 % at
# 500 / 1000 / 1500 / 2000 and 49.4 % at 2990; ramp end 10000 -> 0.5 % at 2270.
CUBIC_RAMP_SPEC = [(3000, 500, 0.13, 2), (3000, 1000, 1.49, 2), (3000, 1500, 5.63, 2), (3000, 2000, 14.06, 2),
                   (3000, 2990, 49.4, 1), (10000, 2270, 0.5, 1)]


def _zhu_gupta_matches_spec(target) -> bool:
    return all(_printed(target(step), percent, 1) for step, percent in ZHU_GUPTA_SPEC)


def _cubic_ramp_matches_spec(target) -> bool:
    """`target(end, step)`: the sparsity with start 100, the given ramp end and final 0.5."""
    return all(_printed(target(end, step), percent, decimals) for end, step, percent, decimals in CUBIC_RAMP_SPEC)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),
    (2500, 0.7 * (1 - 0.75 ** 3)),   # 0.4046875
    (5000, 0.7 * (1 - 0.5 ** 3)),    # 0.6125
    (7500, 0.7 * (1 - 0.25 ** 3)),   # 0.6890625
    (10000, 0.7),
    (10001, 0.7),
    (25000, 0.7),
])
def test_zhu_gupta_golden_values(step, expected):
    s = Schedule("zhu-gupta", start=0, end=10000, final=0.7)
    assert s.target(step) == pytest.approx(expected, abs=EXACT)


def test_zhu_gupta_prints_as_spec_says():
    s = Schedule("zhu-gupta", start=0, end=10000, final=0.7)
    assert _zhu_gupta_matches_spec(s.target)


def test_zhu_gupta_is_front_loaded_cubic_ramp_back_loaded():
    zg = Schedule("zhu-gupta", start=0, end=10000, final=0.7)
    cr = Schedule("cubic-ramp", start=0, end=10000, final=0.7)
    # The two "cubic" curves are different: at a quarter, zhu-gupta is far ahead.
    assert zg.target(2500) > 0.5 * 0.7
    assert cr.target(2500) < 0.05 * 0.7
    assert cr.target(2500) == pytest.approx(0.7 * 0.25 ** 3, abs=EXACT)


@pytest.mark.parametrize("end, step, percent, decimals", CUBIC_RAMP_SPEC)
def test_cubic_ramp_golden_values(end, step, percent, decimals):
    s = Schedule("cubic-ramp", start=100, end=end, final=0.5)
    assert s.target(step) == pytest.approx(0.5 * ((step - 100) / (end - 100)) ** 3, abs=EXACT)
    assert _printed(s.target(step), percent, decimals)


def test_cubic_ramp_2990_is_49_4_percent_truncated():
    # 0.5 * (2890/2900)^3 = 0.49485: SPEC prints "49.4%" (truncated to 0.1 %).
    value = Schedule("cubic-ramp", start=100, end=3000, final=0.5).target(2990)
    assert value == pytest.approx(0.5 * (2890 / 2900) ** 3, abs=EXACT)
    assert math.floor(value * 1000) == 494


@pytest.mark.parametrize("exponent", [2.9, 3.1])
def test_the_golden_checks_reject_a_slightly_wrong_curve(exponent):
    # Guards the checks above: a ramp p^2.9 or p^3.1 (a plausible typo) must not pass them.
    def wrong_cubic(end, step):
        return 0.5 * (min(1.0, max(0.0, (step - 100) / (end - 100))) ** exponent)

    def wrong_zhu_gupta(step):
        return 0.7 * (1 - (1 - step / 10000) ** exponent)

    assert _cubic_ramp_matches_spec(lambda end, step: Schedule("cubic-ramp", start=100, end=end, final=0.5)
                                    .target(step))
    assert not _cubic_ramp_matches_spec(wrong_cubic)
    assert not _zhu_gupta_matches_spec(wrong_zhu_gupta)


def test_cubic_ramp_reaches_final_at_end_and_after():
    s = Schedule("cubic-ramp", start=100, end=3000, final=0.5)
    assert s.target(100) == 0.0
    assert s.target(3000) == pytest.approx(0.5, abs=1e-12)
    assert s.target(9000) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("initial, final", [(0.0, 0.8), (0.2, 0.6), (0.1, 0.1)])
def test_linear_midpoint_is_halfway(initial, final):
    s = Schedule("linear", start=100, end=1100, final=final, initial=initial)
    assert s.target(600) == pytest.approx((initial + final) / 2, abs=1e-12)
    assert s.target(100) == pytest.approx(initial, abs=1e-12)
    assert s.target(1100) == pytest.approx(final, abs=1e-12)
    assert s.target(350) == pytest.approx(initial + 0.25 * (final - initial), abs=1e-12)


def test_one_shot():
    s = Schedule("one-shot", start=50, end=1000, final=0.6, frequency=10)
    assert s.target(0) == 0.0
    assert s.target(49) == 0.0
    assert s.target(50) == 0.6
    assert s.target(51) == 0.6
    assert s.target(5000) == 0.6
    assert s.update_steps() == [50]
    assert [t for t in range(0, 1100) if s.is_update(t)] == [50]


def test_zhu_gupta_with_initial_sparsity():
    s = Schedule("zhu-gupta", start=0, end=1000, final=0.8, initial=0.2)
    assert s.target(0) == pytest.approx(0.2, abs=1e-12)
    assert s.target(500) == pytest.approx(0.8 + (0.2 - 0.8) * 0.125, abs=1e-12)
    assert s.target(1000) == pytest.approx(0.8, abs=1e-12)


# --- properties for every kind ----------------------------------------------

KINDS = sorted(CURVES)


def _schedule(kind, start=30, end=230, final=0.75, initial=0.0, frequency=7):
    return Schedule(kind, start=start, end=end, final=final, initial=initial, frequency=frequency)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("initial", [0.0, 0.3])
def test_nothing_pruned_before_start(kind, initial):
    s = _schedule(kind, initial=initial)
    assert all(s.target(t) == 0.0 for t in range(0, s.start))
    assert not any(s.is_update(t) for t in range(0, s.start))
    expected_at_start = s.final if kind == "one-shot" else initial
    assert s.target(s.start) == pytest.approx(expected_at_start, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("initial", [0.0, 0.3])
def test_target_never_decreases(kind, initial):
    s = _schedule(kind, initial=initial)
    values = [s.target(t) for t in range(0, s.end + 100)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(s.final, abs=1e-12)
    assert all(0.0 <= v <= s.final + 1e-12 for v in values)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("start, end, frequency", [
    (30, 230, 7),     # end not on the frequency grid
    (0, 100, 10),     # end on the grid
    (5, 6, 1),        # shortest schedule
    (10, 60, 50),     # frequency == end - start
    (0, 99, 1),
])
def test_update_steps_match_is_update(kind, start, end, frequency):
    s = _schedule(kind, start=start, end=end, frequency=frequency)
    steps = s.update_steps()
    assert steps == [t for t in range(0, end + 50) if s.is_update(t)]
    assert steps[0] == max(start, 1)  # there is no step 0: its update comes after step 1
    if kind == "one-shot":
        assert steps == [max(start, 1)]
        return
    assert steps[-1] == end
    assert steps == sorted(set(steps))
    # every step lies on the grid start + i*frequency, except possibly the final `end`
    grid = steps if (end - start) % frequency == 0 else steps[:-1]
    assert grid == sorted({max(t, 1) for t in range(start, end + 1, frequency)})
    assert all(b - a == frequency for a, b in zip(grid[1:], grid[2:]))


def test_update_steps_explicit():
    s = Schedule("linear", start=10, end=45, final=0.5, frequency=10)
    assert s.update_steps() == [10, 20, 30, 40, 45]
    s = Schedule("linear", start=10, end=40, final=0.5, frequency=10)
    assert s.update_steps() == [10, 20, 30, 40]


# --- validation ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, symbol", [
    (dict(kind="linear", start=100, end=100, final=0.5), "SCHEDULE_END"),
    (dict(kind="linear", start=100, end=50, final=0.5), "SCHEDULE_END"),
    (dict(kind="zhu-gupta", start=10, end=9, final=0.5), "SCHEDULE_END"),
    (dict(kind="linear", start=0, end=100, final=1.0), "TARGET_SPARSITY"),
    (dict(kind="linear", start=0, end=100, final=-0.1), "TARGET_SPARSITY"),
    (dict(kind="linear", start=0, end=100, final=1.5), "TARGET_SPARSITY"),
    (dict(kind="one-shot", start=0, end=100, final=1.0), "TARGET_SPARSITY"),
    (dict(kind="linear", start=0, end=100, final=0.5, initial=1.0), "INITIAL_SPARSITY"),
    (dict(kind="linear", start=0, end=100, final=0.5, initial=-0.1), "INITIAL_SPARSITY"),
    (dict(kind="linear", start=0, end=100, final=0.5, initial=1.5), "INITIAL_SPARSITY"),
    (dict(kind="linear", start=0, end=100, final=0.3, initial=0.4), "INITIAL_SPARSITY"),
    (dict(kind="cubic-ramp", start=0, end=100, final=0.3, initial=0.31), "INITIAL_SPARSITY"),
    (dict(kind="linear", start=0, end=100, final=0.5, frequency=0), "SCHEDULE_FREQUENCY"),
    (dict(kind="linear", start=0, end=100, final=0.5, frequency=-3), "SCHEDULE_FREQUENCY"),
    (dict(kind="linear", start=0, end=100, final=0.5, frequency=101), "SCHEDULE_FREQUENCY"),
    (dict(kind="linear", start=20, end=100, final=0.5, frequency=81), "SCHEDULE_FREQUENCY"),
    (dict(kind="cubic", start=0, end=100, final=0.5), "SCHEDULE"),
    (dict(kind="gradual", start=0, end=100, final=0.5), "SCHEDULE"),
    (dict(kind="", start=0, end=100, final=0.5), "SCHEDULE"),
    (dict(kind="linear", start=-1, end=100, final=0.5), "SCHEDULE_START"),
    (dict(kind="one-shot", start=-5, end=100, final=0.5), "SCHEDULE_START"),
])
def test_validation_errors_name_the_symbol(kwargs, symbol):
    with pytest.raises(ScheduleError) as info:
        Schedule(**kwargs)
    assert info.value.symbol == symbol
    assert str(info.value)  # a message meant for the user


@pytest.mark.parametrize("kwargs", [
    dict(kind="linear", start=0, end=100, final=0.0),
    dict(kind="linear", start=0, end=100, final=0.999),
    dict(kind="linear", start=0, end=100, final=0.5, initial=0.5),
    dict(kind="linear", start=0, end=100, final=0.5, frequency=100),
    dict(kind="linear", start=0, end=1, final=0.5, frequency=1),
])
def test_valid_boundaries_are_accepted(kwargs):
    Schedule(**kwargs)


# --- milestones ---------------------------------------------------------------

from lib.pruning.schedules import parse_levels, parse_points  # noqa: E402

MILESTONES = ((10, 0.0), (23, 0.2), (50, 0.6))


def _milestones(points=MILESTONES, frequency=7, final=0.6):
    return Schedule.milestones(points, frequency, final)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (9, 0.0),
    (10, 0.0),
    (17, 0.2 * 7 / 13),          # 0.10769...
    (23, 0.2),
    (24, 0.2 + 0.4 / 27),        # 0.21481...
    (41, 0.2 + 0.4 * 18 / 27),   # 0.46667
    (45, 0.2 + 0.4 * 22 / 27),   # 0.52593
    (50, 0.6), (51, 0.6), (1000, 0.6),
])
def test_milestones_golden_values(step, expected):
    s = _milestones()
    assert s.kind == "milestones" and s.start == 10 and s.end == 50
    assert s.target(step) == pytest.approx(expected, abs=1e-12)


def test_milestones_hand_values():
    s = _milestones()
    assert s.target(17) == pytest.approx(0.10769, abs=1e-5)
    assert s.target(24) == pytest.approx(0.21481, abs=1e-5)
    assert s.target(45) == pytest.approx(0.52593, abs=1e-5)
    assert s.target(36) == pytest.approx(0.39259, abs=1e-5)  # 0.2 + 0.4 * 13 / 27


def test_milestones_nothing_before_the_first_point_even_if_it_is_not_zero():
    s = Schedule.milestones(((100, 0.1), (200, 0.3), (300, 0.5)), 50, 0.5)
    assert [s.target(t) for t in (0, 50, 99)] == [0.0, 0.0, 0.0]
    assert s.target(100) == pytest.approx(0.1, abs=1e-12)
    assert s.target(150) == pytest.approx(0.2, abs=1e-12)
    assert s.target(250) == pytest.approx(0.4, abs=1e-12)
    assert not any(s.is_update(t) for t in range(100))


def test_milestones_update_at_every_point_every_frequency_and_the_end():
    s = _milestones()
    expected = [10, 17, 23, 24, 31, 38, 45, 50]  # grid from 10 every 7, plus the point 23, plus the end 50
    assert s.update_steps() == expected
    assert [t for t in range(0, 200) if s.is_update(t)] == expected


def test_milestones_are_non_decreasing_and_end_at_final():
    s = Schedule.milestones(parse_points("100:0.0,500:0.01,1000:0.08,1500:0.19,2000:0.35,3000:0.5"), 100, 0.5)
    values = [s.target(t) for t in range(0, 3200, 5)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    for step, sparsity in s.points:
        assert s.target(step) == pytest.approx(sparsity, abs=1e-12)
    assert s.target(3100) == 0.5


@pytest.mark.parametrize("points, final", [
    ((), 0.5),
    (((10, 0.5),), 0.5),                              # fewer than two points
    (((10, 0.0), (10, 0.5)), 0.5),                    # steps not increasing
    (((20, 0.0), (10, 0.5)), 0.5),
    (((10, 0.0), (30, 0.2), (20, 0.5)), 0.5),
    (((10, 0.3), (20, 0.2), (30, 0.5)), 0.5),         # sparsity decreases
    (((10, 0.0), (20, 1.0)), 0.5),                    # sparsity >= 1
    (((10, 0.0), (20, 1.0)), 1.0),
    (((10, 0.0), (20, 0.5), (30, 1.2)), 0.5),
    (((10, -0.1), (20, 0.5)), 0.5),                   # below 0
    (((10, 0.0), (20, 0.4)), 0.5),                    # last point != final
    (((10, 0.0), (20, 0.5), (30, 0.6)), 0.5),
])
def test_milestone_validation_errors(points, final):
    with pytest.raises(ScheduleError) as info:
        Schedule.milestones(points, 5, final)
    assert info.value.symbol == "SCHEDULE_MILESTONE_TABLE"
    assert str(info.value)


def test_parse_points():
    assert parse_points("100:0.0, 500:0.1,3000:0.5") == ((100, 0.0), (500, 0.1), (3000, 0.5))
    assert parse_points(" 7:0.25 ,") == ((7, 0.25),)


@pytest.mark.parametrize("text", ["100-0.5", "x:0.1", "100:", "100:abc", "1.5:0.1", "100:0.1,200"])
def test_parse_points_errors(text):
    with pytest.raises(ScheduleError) as info:
        parse_points(text)
    assert info.value.symbol == "SCHEDULE_MILESTONE_TABLE"
    assert "step:sparsity" in str(info.value)


# --- steps --------------------------------------------------------------------

def test_steps_levels_held_from_start_plus_j_frequency():
    s = Schedule.steps((0.1, 0.3, 0.5), start=10, frequency=5, final=0.5)
    expected = {**{t: 0.0 for t in range(10)}, **{t: 0.1 for t in range(10, 15)},
                **{t: 0.3 for t in range(15, 20)}, **{t: 0.5 for t in range(20, 60)}}
    assert {t: s.target(t) for t in range(60)} == expected


def test_steps_update_exactly_at_each_level():
    s = Schedule.steps((0.1, 0.3, 0.5), start=10, frequency=5, final=0.5)
    assert s.update_steps() == [10, 15, 20]
    assert [t for t in range(100) if s.is_update(t)] == [10, 15, 20]


def test_steps_with_equal_levels_and_a_single_level():
    s = Schedule.steps((0.2, 0.2, 0.4), start=0, frequency=3, final=0.4)
    assert [s.target(t) for t in range(8)] == [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.4, 0.4]
    one = Schedule.steps((0.3,), start=4, frequency=10, final=0.3)
    assert [one.target(t) for t in (3, 4, 50)] == [0.0, 0.3, 0.3]
    assert [t for t in range(100) if one.is_update(t)] == [4] == one.update_steps()


@pytest.mark.parametrize("levels, final", [
    ((), 0.5),
    ((0.3, 0.2, 0.5), 0.5),      # decreasing
    ((0.1, 0.3), 0.5),           # last level != final
    ((0.1, 0.6), 0.5),
    ((0.1, 1.0), 1.0),           # a level of 1
    ((-0.1, 0.5), 0.5),
])
def test_steps_validation_errors(levels, final):
    with pytest.raises(ScheduleError) as info:
        Schedule.steps(levels, start=0, frequency=10, final=final)
    assert info.value.symbol == "SCHEDULE_STEP_LEVELS"
    assert str(info.value)


def test_parse_levels():
    assert parse_levels("0.1, 0.25,0.4,0.5") == (0.1, 0.25, 0.4, 0.5)
    assert parse_levels("") == ()
    with pytest.raises(ScheduleError) as info:
        parse_levels("0.1,half")
    assert info.value.symbol == "SCHEDULE_STEP_LEVELS"


def test_schedules_from_settings_tables():
    from lib.pruning.schedules import schedule_from_settings
    from lib.settings import Settings

    s = Settings(schedule="milestones", schedule_milestones="10:0.0,23:0.2,50:0.6", schedule_frequency=7,
                 target_sparsity=0.6, schedule_start=999, schedule_end=5)  # start/end come from the table
    sched = schedule_from_settings(s)
    assert (sched.start, sched.end, sched.points) == (10, 50, MILESTONES)
    assert sched.update_steps() == [10, 17, 23, 24, 31, 38, 45, 50]
    s = Settings(schedule="steps", schedule_steps="0.1,0.3,0.5", schedule_start=10, schedule_frequency=5,
                 target_sparsity=0.5)
    assert schedule_from_settings(s).update_steps() == [10, 15, 20]
    with pytest.raises(ScheduleError) as info:
        schedule_from_settings(Settings(schedule="steps", schedule_steps="0.1,0.3", schedule_start=10,
                                        schedule_frequency=5, target_sparsity=0.5))
    assert info.value.symbol == "SCHEDULE_STEP_LEVELS"


# --- warp -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "zhu-gupta", "cubic-ramp"])
@pytest.mark.parametrize("initial", [0.0, 0.2])
def test_warp_2_squares_the_progress(kind, initial):
    plain = Schedule(kind, start=100, end=300, final=0.8, initial=initial, frequency=10)
    warped = Schedule(kind, start=100, end=300, final=0.8, initial=initial, frequency=10, warp=2.0)
    for t in range(100, 400, 7):
        p = min(1.0, (t - 100) / 200)
        assert warped.target(t) == pytest.approx(CURVES[kind](p ** 2, initial, 0.8), abs=1e-12)
    assert [warped.target(t) for t in range(100)] == [0.0] * 100
    assert warped.target(300) == pytest.approx(0.8, abs=1e-12)
    assert warped.target(200) < plain.target(200)  # slower
    assert warped.update_steps() == plain.update_steps()  # the warp does not move the mask updates


def test_warp_2_linear_golden_value():
    s = Schedule("linear", start=0, end=100, final=0.8, warp=2.0)
    assert s.target(50) == pytest.approx(0.2, abs=1e-12)
    assert s.target(25) == pytest.approx(0.05, abs=1e-12)


def test_warp_applies_to_milestones():
    s = Schedule.milestones(((0, 0.0), (100, 0.4), (200, 0.6)), 10, 0.6)
    from dataclasses import replace
    w = replace(s, warp=2.0)
    # p = 0.5 -> 0.25: the table's value at step 50
    assert w.target(100) == pytest.approx(s.target(50), abs=1e-12) == pytest.approx(0.2, abs=1e-12)
    assert w.target(200) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize("warp", [0.5, 0.999, 0.0, -1.0, float("nan")])
def test_warp_below_one_is_an_error(warp):
    with pytest.raises(ScheduleError) as info:
        Schedule("linear", start=0, end=100, final=0.5, warp=warp)
    assert info.value.symbol == "ADAPTIVE_PRUNING"


@pytest.mark.parametrize("schedule", [
    Schedule("one-shot", start=0, end=0, final=0.5),
    Schedule("linear", start=0, end=40, final=0.5, frequency=10),
    Schedule.milestones(((0, 0.0), (20, 0.25), (40, 0.5)), frequency=10, final=0.5),
    Schedule.steps((0.25, 0.5), start=0, frequency=20, final=0.5),
])
def test_an_update_at_step_zero_happens_after_the_first_step(schedule):
    # Training calls is_update(t) for t = 1, 2, ...: an update at step 0 must not be lost.
    updates = [t for t in range(1, 60) if schedule.is_update(t)]
    assert updates[0] == 1 and updates == schedule.update_steps()
    assert schedule.target(updates[-1]) == 0.5
