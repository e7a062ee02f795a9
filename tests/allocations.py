"""A real allocation instrument for tests: torch.profiler's memory events.

With profile_memory=True the CPU allocator reports every allocation and free
made while profiling, each with its running total of live bytes, so the most
memory a call (or a marked stretch of it) held at once is read off the
events, not estimated. Only memory allocated inside the call counts: what was
allocated before it and freed during it is not subtracted.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

from torch._C._profiler import _ExtraFields_Allocation
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Peaks:
    """Most bytes the call held at once, overall and at moments inside the marked regions."""

    overall: int
    in_regions: int
    regions: int  # how many marked regions ran (0: nothing was measured there)


def allocation_peaks(fn: Callable[[], object], region: str | None = None) -> Peaks:
    """Run fn under the profiler; `region` names the torch.profiler.record_function blocks to read."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, spans = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if isinstance(e.extra_fields, _ExtraFields_Allocation):
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
        elif region is not None and e.name == region:
            spans.append((e.start_time_ns, e.end_time_ns))
        stack.extend(e.children)
    if not events:
        raise AssertionError("the profiler recorded no allocation: the instrument is not measuring")
    events.sort()
    times = [t for t, _, _ in events]
    base = events[0][2] - events[0][1]  # live bytes the allocator counted before the first event
    overall = max(total for _, _, total in events) - base
    in_regions = 0
    for start, end in spans:
        before = bisect.bisect_left(times, start)  # live at the start: the total after the last earlier event
        live = events[before - 1][2] if before else base
        inside = [total for _, _, total in events[before:bisect.bisect_right(times, end)]]
        in_regions = max(in_regions, live - base, *(total - base for total in inside))
    return Peaks(overall, in_regions, len(spans))
