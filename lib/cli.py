"""The entry point every trainer's `main` goes through, and its command line.

`build_parser` makes one flag per row of lib/settings.py's table, with the
defaults and help text read from the Kconfig tree (so it lives here, beside
lib/kconfig.py's reader, and lib/settings.py needs no Kconfig at all).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from lib.errors import KpruneError
from lib.kconfig import choice_values, kconfig_defaults, load_kconfig, settings_errors
from lib.settings import Option, options_for, settings_from_namespace


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


def build_parser(model: str, prog: str, description: str) -> argparse.ArgumentParser:
    """The trainer's command line: one flag per option, defaults from Kconfig."""
    kconf = load_kconfig()
    defaults = kconfig_defaults(kconf, model)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for opt in options_for(model):
        sym = kconf.syms.get(opt.symbol) or kconf.named_choices[opt.symbol]
        help_text = (_first_line_of_help(sym) + f" [Kconfig: {opt.symbol}]").replace("%", "%%")
        default = defaults[opt.name]
        if opt.kind is bool:
            parser.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        choices = None
        if opt.name == "model":
            choices = [model]
        elif opt.symbol in kconf.named_choices:
            choices = list(choice_values(kconf.named_choices[opt.symbol]))
        parser.add_argument(opt.flag, dest=opt.name, type=_argparse_type(opt), default=default,
                            choices=choices, help=help_text)
    return parser


def _argparse_type(opt: Option):
    def convert(text: str):
        try:
            return opt.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{opt.flag} (Kconfig {opt.symbol}): {exc}") from None
    convert.__name__ = opt.kind.__name__
    return convert


def _first_line_of_help(item) -> str:
    for node in item.nodes:
        if node.help:
            return node.help.strip().split("\n\n")[0].replace("\n", " ")
        if node.prompt:
            return node.prompt[0]
    return ""
