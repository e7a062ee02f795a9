"""SIGINT and SIGTERM: stop after the step in progress, and never half-way through a save.

A signal asks the loop to stop after the current step, so the checkpoint it
then writes is of a whole step. A second, different request (Ctrl-C pressed
again) means "stop now" — but a copy of the first one does not: GNU make and
job schedulers signal a whole process group, and make forwards what it got
to its child, so one request can arrive twice within milliseconds. While a
checkpoint or the final summary is being written, signals are noted and
never interrupt the write.
"""

from __future__ import annotations

import contextlib
import signal
import time

REPEAT_WINDOW_S = 1.0  # the same signal again within this window is a copy of the first request


class Interrupted(Exception):
    pass


class Diverged(Exception):
    """A non-finite loss: the run stops, recorded as `diverged` at `step`."""

    def __init__(self, step: int, loss: float, grad_clip: float):
        clip = f"lower LR or GRAD_CLIP (now {grad_clip:g})" if grad_clip > 0 else "lower LR or enable GRAD_CLIP"
        super().__init__(f"loss became {loss} at step {step}; {clip}")
        self.step = step


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._saving = False
        self._finishing = False
        self._stop_now = False  # a "stop now" that came while saving, raised once the save is done
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = name, now
            return
        if name == self.signal_name and now - self._first_at < REPEAT_WINDOW_S:
            return  # the same request delivered twice (make forwards what the process group got)
        if self._saving or self._finishing:
            self._stop_now = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving(self):
        """A block no signal interrupts (a checkpoint); a "stop now" during it is raised after it."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._stop_now and not self._finishing:
            raise KeyboardInterrupt

    def finishing(self) -> None:
        """From here to the end of the run (final checkpoint, summary), signals only get noted."""
        self._finishing = True

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def check(self, anywhere: bool | None = None) -> None:
        """Raise Interrupted once a signal came.

        Under DDP, ranks may see a signal at different steps: `anywhere` is then whether any rank
        saw one, agreed on by all (the training loop reduces it with the step's loss).
        """
        if self.requested if anywhere is None else anywhere:
            raise Interrupted(self.signal_name or "a signal to another rank")

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
