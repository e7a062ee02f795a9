"""One run fanned out to several trackers; a tracker that fails is switched off, never the run."""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Protocol


class Tracker(Protocol):
    name: str

    def start(self, config: dict, run_name: str, group: str | None) -> None: ...

    def log(self, row: dict, step: int) -> None: ...

    def finish(self, summary: dict) -> None: ...


class Trackers:
    """The selected trackers of one run.

    `log_row` is MetricsLog's sink: it receives each row as written to
    metrics.jsonl. Any exception inside a tracker is reported once on stderr,
    naming the tracker, and that tracker gets nothing more; the run goes on.
    Trackers print to stderr, so a trainer's stdout keeps ending with its
    `results: <dir>` line.
    """

    def __init__(self, trackers: list[Tracker]):
        self.live: list[Tracker] = list(trackers)

    def start(self, config: dict, run_name: str, group: str | None) -> None:
        for tracker in list(self.live):
            self._call(tracker, "start", lambda t=tracker: t.start(config, run_name, group))

    def log_row(self, row: dict) -> None:
        step = int(row["step"])
        values = {k: v for k, v in row.items() if k != "step" and v is not None}
        for tracker in list(self.live):
            self._call(tracker, "log", lambda t=tracker: t.log(values, step))

    def finish(self, summary: dict) -> None:
        for tracker in list(self.live):
            self._call(tracker, "finish", lambda t=tracker: t.finish(summary))
        self.live = []

    def _call(self, tracker: Tracker, what: str, call) -> None:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                call()
        except Exception as exc:  # a tracker must never fail the run
            self.live.remove(tracker)
            print(f"warning: tracker {tracker.name} failed in {what} ({type(exc).__name__}: {exc}); "
                  f"it is off for the rest of this run, which goes on", file=sys.stderr, flush=True)


def numeric_items(data: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers (bools as 0/1) of a nested dict, keys joined with '/': what a scalar plot can show."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_items(value, name + "/"))
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[name] = float(value)
    return out

