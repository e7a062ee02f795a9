"""Strict Kconfig handling: .config and defconfigs in, Settings and flags out.

kconfiglib only warns about a defconfig that assigns an undefined symbol, an
out-of-range value or a value its dependencies do not allow, and then goes
on without it. Here every such case is an error that names the file, the
line and the symbol, and nothing is written (Zephyr's kconfig.py takes the
same stance). A `.config` is only ever replaced atomically.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kconfiglib

from lib.errors import ConfigError
from lib.results import make_shareable
from lib.settings import BY_SYMBOL, OPTIONS, Settings, options_for, parse_decimal, validate

REPO_ROOT = Path(__file__).resolve().parent.parent
_ASSIGN = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


def load_kconfig(root: Path = REPO_ROOT) -> kconfiglib.Kconfig:
    """Parse the Kconfig tree under `root` (warnings in the tree are errors too)."""
    old = os.environ.get("srctree")
    os.environ["srctree"] = str(root)
    try:
        kconf = kconfiglib.Kconfig("Kconfig", warn_to_stderr=False)
    finally:
        if old is None:
            del os.environ["srctree"]
        else:
            os.environ["srctree"] = old
    if kconf.warnings:
        raise ConfigError("the Kconfig tree itself has problems:\n  " + "\n  ".join(kconf.warnings))
    kconf.warn_assign_undef = False  # reported by the line scanner below, with a suggestion
    return kconf


# ---------------------------------------------------------------- choices

def choice_values(choice: kconfiglib.Choice) -> dict[str, kconfiglib.Symbol]:
    """Map the user-facing value of each choice member to its symbol.

    The value is the member's name without the choice's name, lower-cased,
    with '_' as '-': SCHEDULE_CUBIC_RAMP -> "cubic-ramp".
    """
    prefix = choice.name + "_"
    return {s.name[len(prefix):].lower().replace("_", "-"): s for s in choice.syms}


def _choice_item(kconf: kconfiglib.Kconfig, symbol: str):
    return kconf.named_choices.get(symbol)


def is_active(item) -> bool:
    """True when the item's dependencies are met (it is in .config)."""
    return kconfiglib.expr_value(item.direct_dep) > 0


def _choice_default(choice: kconfiglib.Choice) -> kconfiglib.Symbol:
    for sym, cond in choice.orig_defaults:
        if kconfiglib.expr_value(cond):
            return sym
    return choice.syms[0]


def option_value(kconf: kconfiglib.Kconfig, symbol: str) -> Any:
    """The typed value of an active option in the loaded configuration."""
    opt = BY_SYMBOL[symbol]
    choice = _choice_item(kconf, symbol)
    if choice is not None:
        sel = choice.selection or _choice_default(choice)
        return {s: v for v, s in choice_values(choice).items()}[sel]
    sym = kconf.syms[symbol]
    if opt.kind is bool:
        return sym.tri_value == 2
    if opt.kind is int:
        return int(sym.str_value, 0)
    return opt.parse(sym.str_value)


def _default_value(kconf: kconfiglib.Kconfig, symbol: str) -> Any:
    """The value an option would default to if its dependencies were met."""
    choice = _choice_item(kconf, symbol)
    sym = None if choice is not None else kconf.syms[symbol]
    item = choice if choice is not None else sym
    if is_active(item):
        return option_value(kconf, symbol)
    if choice is not None:
        return {s: v for v, s in choice_values(choice).items()}[_choice_default(choice)]
    opt = BY_SYMBOL[symbol]
    for value, cond in sym.orig_defaults:
        if kconfiglib.expr_value(cond):
            text = value.str_value
            break
    else:
        text = {bool: "n", int: "0", float: "0", str: ""}[opt.kind]
    if opt.kind is bool:
        return text == "y"
    return int(text, 0) if opt.kind is int else opt.parse(text)


def kconfig_defaults(kconf: kconfiglib.Kconfig, model: str) -> dict[str, Any]:
    """Default of every option for `model`, as `make defconfig` would give."""
    kconf.unset_values()
    choice_values(kconf.named_choices["MODEL"])[model].set_value(2)
    return {o.name: _default_value(kconf, o.symbol) for o in options_for(model)}


# ---------------------------------------------------------------- strict loading

@dataclass
class Assignments:
    """Where each symbol got its value, for error messages."""

    where: dict[str, str] = field(default_factory=dict)   # symbol -> "file:line" or "SET"
    value: dict[str, str] = field(default_factory=dict)   # symbol -> assigned text

    def locate(self, symbol: str) -> str:
        return self.where.get(symbol, "(default)")


def _suggest(kconf: kconfiglib.Kconfig, name: str) -> str:
    names = [s.name for s in kconf.unique_defined_syms] + list(kconf.named_choices)
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return kconfiglib.unescape(text[1:-1])
    return text


def _deps_text(sym: kconfiglib.Symbol) -> str:
    """A symbol's dependencies as the user wrote them (without kconfiglib's implicit choice term)."""
    return re.sub(r"\s*&&\s*<choice \w+>|<choice \w+>\s*&&\s*", "", kconfiglib.expr_str(sym.direct_dep))


def _not_taken(kconf: kconfiglib.Kconfig, sym: kconfiglib.Symbol, assigned: str) -> str | None:
    """Why `assigned` did not become `sym`'s value, or None when it did."""
    if not is_active(sym):
        deps = _deps_text(sym)
        return f"has unmet dependencies ({deps}): the assignment would have no effect; satisfy them first"
    if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
        want = assigned[:1]
        got = kconfiglib.TRI_TO_STR[sym.tri_value]
        if want == got:
            return None
        if sym.choice is not None:
            sel = sym.choice.selection
            if want == "y":
                return f"is overridden: {sel.name} is the selected member of choice {sym.choice.name}"
            return (f"cannot be 'n' unless another member of choice {sym.choice.name} is set to y")
        return f"was assigned '{want}' but is '{got}'"
    if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX):
        try:
            want_n = parse_decimal(assigned) if sym.orig_type == kconfiglib.INT else int(assigned, 16)
        except ValueError as exc:
            return str(exc) if sym.orig_type == kconfiglib.INT else f"'{assigned}' is not a hex number"
        got = sym.str_value
        if got and int(got, 0) == want_n:
            return None
        for low, high, cond in sym.ranges:
            if kconfiglib.expr_value(cond):
                return f"{assigned} is out of range [{low.str_value}, {high.str_value}]"
        return f"was assigned {assigned} but is {got}"
    if sym.str_value != _unquote(assigned):
        return f"was assigned '{assigned}' but is '{sym.str_value}'"
    return None


def read_config(path: Path, kconf: kconfiglib.Kconfig | None = None) -> tuple[kconfiglib.Kconfig, Assignments]:
    """Load a .config or defconfig strictly. Raises ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    kconf = kconf or load_kconfig()
    errors: list[str] = []
    seen = Assignments()
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.rstrip()
        where = f"{path}:{lineno}"
        m = _ASSIGN.match(line) or _UNSET.match(line)
        if m is None:
            if line and not line.lstrip().startswith("#"):
                errors.append(f"{where}: malformed line '{line}' "
                              "(expected CONFIG_NAME=value or '# CONFIG_NAME is not set')")
            continue
        name = m.group(1)
        value = m.group(2) if m.re is _ASSIGN else "n"
        sym = kconf.syms.get(name)
        if sym is None or not sym.nodes:
            errors.append(f"{where}: CONFIG_{name} is not a Kconfig symbol{_suggest(kconf, name)}")
            continue
        if name in seen.where:
            errors.append(f"{where}: CONFIG_{name} is assigned again (first at {seen.where[name]})")
        seen.where[name], seen.value[name] = where, value
    kconf.warnings.clear()
    kconf.load_config(str(path))
    # Malformed lines, repeats and invalid values are reported above and below, with their line.
    errors += [w.replace("warning: ", "", 1) for w in kconf.warnings
               if not any(known in w for known in ("malformed line", "set more than once", "is invalid for"))]
    for name, value in seen.value.items():
        reason = _not_taken(kconf, kconf.syms[name], value)
        if reason:
            errors.append(f"{seen.where[name]}: CONFIG_{name} {reason}")
    errors += _semantic_errors(kconf, seen, cross_checks=not errors)
    if errors:
        raise ConfigError("\n".join(sorted(errors, key=_by_line)))
    return kconf, seen


def apply_overrides(kconf: kconfiglib.Kconfig, seen: Assignments, overrides: list[str]) -> None:
    """Apply `SYM=value` overrides (as `make ... SET="..."` passes them), strictly.

    `SYM` is a symbol without CONFIG_, or the name of a choice with one of
    its values (OPTIMIZER=adamwprune).
    """
    errors: list[str] = []
    applied: list[tuple[kconfiglib.Symbol, str, str]] = []
    before = {c.name: c.selection for c in kconf.unique_choices if is_active(c)}
    given: dict[str, str] = {}  # name -> the item that set it
    for item in overrides:
        where = f"SET {item}"
        if "=" not in item:
            errors.append(f"{where}: expected SYMBOL=value")
            continue
        name, value = item.split("=", 1)
        name = name.strip().removeprefix("CONFIG_")
        value = _unquote(value.strip())
        if name in given:
            errors.append(f"{where}: {name} is set twice in one SET (also as {given[name]}); give it once")
            continue
        given[name] = item
        if "\n" in value or "\r" in value:  # .config holds one assignment per line
            errors.append(f"SET {name}=...: the value {value!r} has a line break; give it on one line")
            continue
        choice = kconf.named_choices.get(name)
        if choice is not None:
            members = choice_values(choice)
            if value not in members:
                errors.append(f"{where}: '{value}' is not a value of {name} (one of: {', '.join(members)})")
                continue
            sym, value = members[value], "y"
        else:
            sym = kconf.syms.get(name)
            if sym is None or not sym.nodes:
                errors.append(f"{where}: {name} is not a Kconfig symbol{_suggest(kconf, name)}")
                continue
        if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE) and value not in ("y", "n"):
            errors.append(f"{where}: {sym.name} is a bool: use y or n")
            continue
        sym.set_value(value)
        seen.where[sym.name], seen.value[sym.name] = "SET", value
        applied.append((sym, value, where))
    for sym, value, where in applied:
        reason = _not_taken(kconf, sym, value)
        if reason:
            errors.append(f"{where}: {sym.name} {reason}")
    # An override must not silently switch another choice (OPTIMIZER=adamw would
    # otherwise turn state pruning off without a word).
    set_choices = {sym.choice.name for sym, _, _ in applied if sym.choice is not None}
    for choice in kconf.unique_choices:
        old = before.get(choice.name)
        if old is None or choice.name in set_choices or not is_active(choice) or choice.selection is old:
            continue
        deps = _deps_text(old)
        errors.append(f"SET {' '.join(overrides)}: would switch {choice.name} from {old.name} to "
                      f"{choice.selection.name}, because {old.name} depends on {deps}; set {choice.name} "
                      "explicitly if that is what you want")
    errors += _semantic_errors(kconf, seen, cross_checks=not errors)
    if errors:
        raise ConfigError("\n".join(errors))


def _by_line(message: str) -> tuple[str, int]:
    m = re.match(r"(.*?):(\d+): ", message)
    return (m.group(1), int(m.group(2))) if m else (message, 0)


def _semantic_errors(kconf: kconfiglib.Kconfig, seen: Assignments, cross_checks: bool = True) -> list[str]:
    """Checks Kconfig cannot express: float values and cross-option rules."""
    errors = []
    for opt in OPTIONS:
        sym = kconf.syms.get(opt.symbol)
        if opt.kind is float and sym is not None and is_active(sym):
            try:
                opt.parse(sym.str_value)
            except ValueError as exc:
                errors.append(f"{seen.locate(opt.symbol)}: CONFIG_{opt.symbol}=\"{sym.str_value}\": {exc}")
    if errors or not cross_checks:
        return errors
    from lib.matrix import slurm_options  # not a trainer flag: the matrix and sbatch-train read it

    for symbol, problem in validate(settings_from_kconfig(kconf)) + slurm_options.problems(kconf):
        errors.append(f"{seen.locate(symbol)}: CONFIG_{symbol}: {problem}")
    return errors


def settings_errors(settings: Settings) -> list[str]:
    """What is wrong with Settings built from trainer flags, by the rules .config is held to.

    The flags are set into a Kconfig configuration first, so the trainer
    checks exactly what `make` checks (Kconfig ranges, then `validate` on
    `settings_from_kconfig`) on exactly the values .config would hold: an
    option the configuration leaves inactive (SCHEDULE_END under one-shot)
    is None here, as it is there, whatever its flag's default says.
    """
    kconf = kconfig_from_settings(settings)
    seen = Assignments()
    errors: list[str] = []
    for opt in options_for(settings.model):
        value = getattr(settings, opt.name)
        choice = _choice_item(kconf, opt.symbol)
        if value is None or not is_active(choice or kconf.syms[opt.symbol]):
            continue
        seen.where[opt.symbol] = opt.flag
        if choice is not None:
            sym, text = choice_values(choice)[value], "y"
        elif opt.kind in (bool, int):
            sym, text = kconf.syms[opt.symbol], ("y" if value else "n") if opt.kind is bool else str(value)
        else:
            continue  # strings take any value; floats are checked by _semantic_errors
        reason = _not_taken(kconf, sym, text)
        if reason:
            errors.append(f"{opt.flag}: {sym.name} {reason}")
    return errors + _semantic_errors(kconf, seen, cross_checks=not errors)


# ---------------------------------------------------------------- outputs

def selected_model(kconf: kconfiglib.Kconfig) -> str:
    return option_value(kconf, "MODEL")


def settings_from_kconfig(kconf: kconfiglib.Kconfig) -> Settings:
    """The Settings a trainer started from this configuration would build."""
    model = selected_model(kconf)
    values = {}
    for opt in options_for(model):
        item = _choice_item(kconf, opt.symbol) or kconf.syms[opt.symbol]
        values[opt.name] = option_value(kconf, opt.symbol) if is_active(item) else None
    return Settings(**values)


def trainer_argv(kconf: kconfiglib.Kconfig) -> list[str]:
    """The trainer flags for this configuration: one per active option."""
    model = selected_model(kconf)
    argv: list[str] = []
    for opt in options_for(model):
        item = _choice_item(kconf, opt.symbol) or kconf.syms[opt.symbol]
        if not is_active(item):
            continue
        value = option_value(kconf, opt.symbol)
        if opt.kind is bool:
            argv.append(opt.flag if value else "--no-" + opt.flag[2:])
        else:
            argv += [opt.flag, kconf.syms[opt.symbol].str_value if opt.kind is float else str(value)]
    return argv


def kconfig_from_settings(settings: Settings, kconf: kconfiglib.Kconfig | None = None) -> kconfiglib.Kconfig:
    """Set a Kconfig to what `settings` says, so a run can save the .config it ran with."""
    kconf = kconf or load_kconfig()
    kconf.unset_values()
    # Choices first, in table order, so dependent options become active.
    for _ in range(2):
        for opt in OPTIONS:
            value = getattr(settings, opt.name)
            if value is None:
                continue
            choice = _choice_item(kconf, opt.symbol)
            if choice is not None:
                choice_values(choice)[value].set_value(2)
            elif opt.kind is bool:
                kconf.syms[opt.symbol].set_value(2 if value else 0)
            else:
                kconf.syms[opt.symbol].set_value(f"{value!r}" if opt.kind is float else str(value))
    return kconf


def write_config(kconf: kconfiglib.Kconfig, path: Path, minimal: bool = False) -> None:
    """Write the full (or minimal, savedefconfig-style) config atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    make_shareable(fd)  # a run's config is shared like its other result files
    os.close(fd)
    try:
        if minimal:
            kconf.write_min_config(tmp, header="# kprune defconfig (make savedefconfig)\n")
        else:
            kconf.write_config(tmp, header="# kprune .config: generated; edit with make menuconfig\n",
                               save_old=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
