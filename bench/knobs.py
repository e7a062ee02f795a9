"""The benchmarks' environment knobs (BENCH_*), read with a clear error for a bad value."""

from __future__ import annotations

import os


class KnobError(SystemExit):
    """A BENCH_* variable is malformed or out of range; exits with its message."""


def knob(name: str, default: int | float, minimum: int | float, maximum: int | float | None = None):
    """The value of environment variable `name` as the type of `default`, within [minimum, maximum]."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        raise KnobError(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}; "
                        f"unset it for the default ({default})") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise KnobError(f"{name}={raw} is out of range: it must be {bounds} (default {default})")
    return value


def choice_knob(name: str, default: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable `name`, one of `choices`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in choices:
        raise KnobError(f"{name}={raw!r} is not one of: {', '.join(choices)}; unset it for the default ({default})")
    return raw
