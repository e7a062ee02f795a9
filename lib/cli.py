"""The entry point every trainer's `main` goes through."""

from __future__ import annotations

import os
import sys
from typing import Callable

from lib.errors import KpruneError
from lib.kconfig import settings_errors
from lib.settings import build_parser, settings_from_namespace


def trainer_main(model: str, build_task: Callable, argv: list[str] | None, prog: str, description: str) -> int:
    """Parse flags into Settings, validate them, and run the shared loop.

    Bad input (flags, data) ends with a one-paragraph message and status 2,
    not a traceback.
    """
    from lib.train_loop import run

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(model, prog=prog, description=description)
    settings = settings_from_namespace(parser.parse_args(argv))
    problems = settings_errors(settings)  # the very checks `make` ran on .config
    if problems:
        parser.error("; ".join(problems))
    try:
        return run(settings, build_task, command=[sys.executable, "-m", f"{model}.train", *argv])
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def make_variable(name: str, default: str | None = None) -> str | None:
    """The make variable `name` (SET, RESULTS, ...) as the Makefile hands it over, or `default`.

    The Makefile exports each user value as KPRUNE_<name> instead of writing
    it into a shell command, so it arrives byte for byte; empty means unset.
    Programs use it as the default of the matching flag.
    """
    return os.environ.get(f"KPRUNE_{name}") or default
