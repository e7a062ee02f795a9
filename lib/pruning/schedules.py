"""Sparsity schedules: how much is pruned, and when masks are updated.

One `Schedule` object serves every pruning method, so two methods given the
same settings prune the same number of weights at the same steps. With start
a, end b, initial s_i, final s_f and p = (t - a) / (b - a) clipped to [0, 1]:

    one-shot    0 before a, s_f from a
    linear      s_i + (s_f - s_i) * p
    zhu-gupta   s_f + (s_i - s_f) * (1 - p)^3   (front-loaded, Zhu & Gupta 2017)
    cubic-ramp  s_i + (s_f - s_i) * p^3         (back-loaded, AdamWPrune's "cubic")

    milestones  piecewise-linear through a table of (step, sparsity) points;
                a and b are the first and last points' steps
    steps       a list of sparsities, the j-th held from a + j * frequency
                (seed 000's per-epoch `sparsity_steps`, with frequency = one epoch)

Before a nothing is pruned. Masks update at a, every `frequency` steps after
it, and at b; the target never decreases, because pruned weights never revive.
Step t is the t-th optimizer step, so an update placed at a = 0 (before any
training) happens after step 1, with the target of step 1.
`warp` >= 1 (model-size-adaptive pruning) slows any curve down: p -> p^warp.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from lib.errors import KpruneError


class ScheduleError(KpruneError):
    """An invalid schedule; `symbol` names the Kconfig option to fix."""

    def __init__(self, symbol: str, message: str):
        super().__init__(message)
        self.symbol = symbol


def _one_shot(p: float, s_i: float, s_f: float) -> float:
    return s_f


def _linear(p: float, s_i: float, s_f: float) -> float:
    return s_i + (s_f - s_i) * p


def _zhu_gupta(p: float, s_i: float, s_f: float) -> float:
    return s_f + (s_i - s_f) * (1.0 - p) ** 3


def _cubic_ramp(p: float, s_i: float, s_f: float) -> float:
    return s_i + (s_f - s_i) * p ** 3


CURVES: dict[str, Callable[[float, float, float], float]] = {
    "one-shot": _one_shot,
    "linear": _linear,
    "zhu-gupta": _zhu_gupta,
    "cubic-ramp": _cubic_ramp,
}
TABLE_KINDS = ("milestones", "steps")  # schedules given as a table of points
KINDS = tuple(CURVES) + TABLE_KINDS


def parse_points(text: str) -> tuple[tuple[int, float], ...]:
    """'100:0.0, 500:0.1, 3000:0.5' -> ((100, 0.0), (500, 0.1), (3000, 0.5))."""
    points = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        step, sep, value = item.partition(":")
        try:
            points.append((int(step), float(value)))
        except ValueError:
            raise ScheduleError("SCHEDULE_MILESTONE_TABLE", f"'{item}' is not step:sparsity (e.g. 500:0.1)") from None
        if not sep:
            raise ScheduleError("SCHEDULE_MILESTONE_TABLE", f"'{item}' is not step:sparsity (e.g. 500:0.1)")
    return tuple(points)


def parse_levels(text: str) -> tuple[float, ...]:
    """'0.1, 0.25, 0.5' -> (0.1, 0.25, 0.5)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ScheduleError("SCHEDULE_STEP_LEVELS", f"'{text}' is not a comma-separated list of sparsities") from None


@dataclass(frozen=True)
class Schedule:
    """A validated sparsity schedule over training steps."""

    kind: str
    start: int
    end: int
    final: float
    initial: float = 0.0
    frequency: int = 1
    points: tuple[tuple[int, float], ...] = ()   # milestones: (step, sparsity); steps: (step, level)
    warp: float = 1.0

    @classmethod
    def milestones(cls, points: tuple[tuple[int, float], ...], frequency: int, final: float) -> "Schedule":
        """Piecewise-linear through `points`; the last point's sparsity must be `final`."""
        if len(points) < 2:
            raise ScheduleError("SCHEDULE_MILESTONE_TABLE", "give at least two step:sparsity points")
        return cls("milestones", points[0][0], points[-1][0], final, points[0][1], frequency, tuple(points))

    @classmethod
    def steps(cls, levels: tuple[float, ...], start: int, frequency: int, final: float) -> "Schedule":
        """Level j held from start + j * frequency; the last level must be `final`."""
        if not levels:
            raise ScheduleError("SCHEDULE_STEP_LEVELS", "give at least one sparsity level")
        points = tuple((start + j * frequency, level) for j, level in enumerate(levels))
        end = points[-1][0] if len(points) > 1 else start + frequency
        return cls("steps", start, end, final, levels[0], frequency, points)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError("SCHEDULE", f"unknown schedule '{self.kind}' (one of: {', '.join(KINDS)})")
        if not self.warp >= 1.0:
            raise ScheduleError("ADAPTIVE_PRUNING", f"warp {self.warp} must be >= 1")
        if self.kind in TABLE_KINDS:
            self._validate_points()
        if not 0.0 <= self.final < 1.0:
            raise ScheduleError("TARGET_SPARSITY", f"final sparsity {self.final:g} is outside [0, 1)")
        if not 0.0 <= self.initial < 1.0:
            raise ScheduleError("INITIAL_SPARSITY", f"initial sparsity {self.initial:g} is outside [0, 1)")
        if self.start < 0:
            raise ScheduleError("SCHEDULE_START", f"start step {self.start} is negative")
        if self.kind == "one-shot":
            return
        if self.initial > self.final:
            raise ScheduleError("INITIAL_SPARSITY", f"initial sparsity {self.initial:g} is above the final "
                                f"sparsity {self.final:g}; sparsity never decreases")
        if self.end <= self.start:
            raise ScheduleError("SCHEDULE_END", f"end step {self.end} must be after the start step {self.start}")
        if not 1 <= self.frequency <= self.end - self.start:
            raise ScheduleError("SCHEDULE_FREQUENCY", f"update frequency {self.frequency} must be between 1 "
                                f"and end - start = {self.end - self.start} steps")

    def _validate_points(self) -> None:
        symbol = "SCHEDULE_MILESTONE_TABLE" if self.kind == "milestones" else "SCHEDULE_STEP_LEVELS"
        for (s0, v0), (s1, v1) in zip(self.points, self.points[1:]):
            if s1 <= s0:
                raise ScheduleError(symbol, f"milestone steps must increase: {s1} comes after {s0}")
            if v1 < v0:
                raise ScheduleError(symbol, f"sparsity must not decrease ({v0:g} then {v1:g}): pruned "
                                    "weights never revive, so a later point cannot be lower")
        for _, v in self.points:
            if not 0.0 <= v < 1.0:
                raise ScheduleError(symbol, f"sparsity {v:g} is outside [0, 1)")
        if abs(self.points[-1][1] - self.final) > 1e-12:
            raise ScheduleError(symbol, f"the last point's sparsity {self.points[-1][1]:g} must equal "
                                f"TARGET_SPARSITY ({self.final:g})")

    @property
    def last_update(self) -> int:
        return max(1, self.start if self.kind == "one-shot" else self.end)

    def target(self, step: int) -> float:
        """The sparsity the schedule asks for at `step`."""
        if step < self.start:
            return 0.0
        if self.kind == "one-shot":
            return self.final
        if self.kind == "steps":
            return max(v for s, v in self.points if s <= step)
        p = min(1.0, (step - self.start) / (self.end - self.start)) ** self.warp
        if self.kind == "milestones":
            return self.interpolate(self.start + p * (self.end - self.start))
        return CURVES[self.kind](p, self.initial, self.final)

    def interpolate(self, t: float) -> float:
        """The milestone table's piecewise-linear value at (fractional) step t."""
        for (s0, v0), (s1, v1) in zip(self.points, self.points[1:]):
            if t <= s1:
                return v0 + (v1 - v0) * (t - s0) / (s1 - s0)
        return self.points[-1][1]

    def is_update(self, step: int) -> bool:
        """Whether masks are recomputed after optimizer step `step`.

        Steps count from 1: there is no optimizer step 0, so an update the
        schedule places at step 0 happens after step 1.
        """
        if step < max(1, self.start) or step > self.last_update:
            return False
        if step == 1 and self.start == 0:
            return True
        if self.kind in TABLE_KINDS and any(s == step for s, _ in self.points):
            return True  # every table point is a mask update
        if self.kind == "steps":
            return False
        return step == self.last_update or (step - self.start) % self.frequency == 0

    def update_steps(self) -> list[int]:
        """Every step at which masks are recomputed, in order."""
        if self.kind == "one-shot":
            return [self.last_update]
        if self.kind == "steps":
            steps = {s for s, _ in self.points}
        else:
            steps = set(range(self.start, self.end + 1, self.frequency)) | {self.end}
        if self.kind == "milestones":
            steps |= {s for s, _ in self.points}
        return sorted({max(1, s) for s in steps})  # an update at step 0 happens after step 1


def schedule_from_settings(settings, frequency: int | None = None, warp: float = 1.0) -> Schedule:
    """Build (and so validate) the schedule that `settings` describes.

    `frequency` and `warp` override the configured update frequency and add
    a slow-down, as model-size-adaptive pruning derives them.
    """
    s = settings
    frequency = s.schedule_frequency if frequency is None else frequency
    if s.schedule == "milestones":
        sched = Schedule.milestones(parse_points(s.schedule_milestones), frequency, s.target_sparsity)
    elif s.schedule == "steps":
        sched = Schedule.steps(parse_levels(s.schedule_steps), s.schedule_start, frequency, s.target_sparsity)
    else:  # one-shot has no end, initial sparsity or frequency (None): it uses none of them
        sched = Schedule(kind=s.schedule, start=s.schedule_start,
                         end=s.schedule_start if s.schedule_end is None or s.schedule == "one-shot"
                         else s.schedule_end,
                         final=s.target_sparsity, initial=0.0 if s.initial_sparsity is None else s.initial_sparsity,
                         frequency=1 if frequency is None else frequency)
    return replace(sched, warp=warp) if warp != 1.0 else sched
