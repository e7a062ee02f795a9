"""Strict configuration: the Kconfig tree, the option table, defconfigs and SET."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lib.errors import ConfigError
from lib.kconfig import (REPO_ROOT, apply_overrides, choice_values, kconfig_from_settings, load_kconfig,
                         read_config, settings_errors, settings_from_kconfig, trainer_argv, write_config)
from lib.matrix.plan import SELECTORS as MATRIX_SELECTORS, SETTINGS as MATRIX_SETTINGS
from lib.cli import build_parser
from lib.matrix.slurm_options import SETTINGS as SLURM_SETTINGS
from lib.settings import OPTIONS, fields, settings_from_namespace, Settings

DEFCONFIGS = sorted((REPO_ROOT / "defconfigs").iterdir())
CODE_DIRS = ["lib", "gpt2", "lenet5", "resnet", "scripts"]


def _write(tmp_path: Path, text: str, name: str = "defconfig") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_config(path)
    return str(info.value)


# ------------------------------------------------------------------ the tree and the table

def test_kconfig_tree_parses_without_warnings_and_every_option_has_help():
    kconf = load_kconfig()
    missing = [s.name for s in kconf.unique_defined_syms
               if any(n.prompt for n in s.nodes) and not any(n.help for n in s.nodes)]
    missing += [c.name for c in kconf.unique_choices if not any(n.help for n in c.nodes)]
    assert missing == []


def test_every_kconfig_option_has_a_flag_and_every_flag_a_symbol():
    kconf = load_kconfig()
    table = {o.symbol for o in OPTIONS} | set(MATRIX_SELECTORS) | set(MATRIX_SETTINGS) | set(SLURM_SETTINGS)
    user_set = set(kconf.named_choices)
    user_set |= {s.name for s in kconf.unique_defined_syms if s.choice is None and any(n.prompt for n in s.nodes)}
    assert all(c.name for c in kconf.unique_choices), "every choice must be named to map to a flag"
    assert user_set - table == set(), "Kconfig options nothing reads"
    assert table - user_set == set(), "flags or matrix entries without a Kconfig option"


def test_matrix_settings_are_read_by_the_planner():
    source = (REPO_ROOT / "lib" / "matrix" / "plan.py").read_text()
    assert all(f'"{symbol}"' in source for symbol in MATRIX_SETTINGS)


def test_executor_and_slurm_settings_are_read():
    source = (REPO_ROOT / "lib" / "matrix" / "slurm_options.py").read_text()
    body = source[source.index("def problems"):]  # the table itself does not count as reading
    assert all(f'"{symbol}"' in body for symbol in SLURM_SETTINGS)


def test_every_setting_is_read_by_code():
    """A flag in the table that no code reads would be a silently ignored option."""
    sources = "\n".join(p.read_text() for d in CODE_DIRS for p in (REPO_ROOT / d).rglob("*.py")
                        if p.name != "settings.py")
    unread = [f.name for f in fields(Settings)
              if not re.search(rf"\b(s|settings)\.{f.name}\b", sources)]
    assert unread == []


@pytest.mark.slow  # starts a process or trains: over a second
@pytest.mark.parametrize("model", ["gpt2", "lenet5"])
def test_trainer_help_lists_every_flag_with_its_default(model):
    out = subprocess.run([sys.executable, "-m", f"{model}.train", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    parser = build_parser(model, prog="x", description="")
    flat = "".join(out.split())  # argparse wraps lines, even inside values
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in out
        assert "".join(f"(default: {action.default})".split()) in flat, action.dest


@pytest.mark.parametrize("path", DEFCONFIGS, ids=lambda p: p.name)
def test_defconfig_flags_parse_back_to_the_same_settings(path):
    kconf, _ = read_config(path)
    settings = settings_from_kconfig(kconf)
    parser = build_parser(settings.model, prog="x", description="")
    parsed = settings_from_namespace(parser.parse_args(trainer_argv(kconf)))
    for f in fields(Settings):
        if getattr(settings, f.name) is not None:
            assert getattr(parsed, f.name) == getattr(settings, f.name), f.name


@pytest.mark.parametrize("path", DEFCONFIGS, ids=lambda p: p.name)
def test_defconfigs_are_minimal_and_round_trip(path, tmp_path):
    kconf, _ = read_config(path)
    write_config(kconf, tmp_path / "min", minimal=True)
    assignments = lambda p: sorted(l for l in p.read_text().splitlines() if l.startswith("CONFIG_"))
    assert assignments(path) == assignments(tmp_path / "min"), "defconfig is not what savedefconfig writes"
    # A run saves the .config it ran with from its Settings: that must load to the same Settings.
    settings = settings_from_kconfig(kconf)
    write_config(kconfig_from_settings(settings), tmp_path / "config")
    again, _ = read_config(tmp_path / "config")
    assert settings_from_kconfig(again) == settings


def test_choice_values_are_member_names_without_the_choice_prefix():
    kconf = load_kconfig()
    assert set(choice_values(kconf.named_choices["SCHEDULE"])) == {"one-shot", "linear", "zhu-gupta", "cubic-ramp",
                                                                  "milestones", "steps"}
    assert set(choice_values(kconf.named_choices["MODEL"])) == {"gpt2", "lenet5", "resnet"}


# ------------------------------------------------------------------ strict errors

def test_undefined_symbol_names_file_line_and_suggests(tmp_path):
    path = _write(tmp_path, "CONFIG_OPTIMIZER_ADAMWPRUNE=y\nCONFIG_TARGET_SPARSTY=\"0.5\"\n")
    msg = _error_of(path)
    assert f"{path}:2: CONFIG_TARGET_SPARSTY is not a Kconfig symbol (did you mean TARGET_SPARSITY?)" in msg


def test_float_out_of_range_is_an_error(tmp_path):
    path = _write(tmp_path, "CONFIG_PRUNING_METHOD_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY=\"150\"\n")
    assert f'{path}:2: CONFIG_TARGET_SPARSITY="150": 150 is out of range [0, 1)' in _error_of(path)


def test_float_that_is_not_a_number_is_an_error(tmp_path):
    path = _write(tmp_path, "CONFIG_LR=\"fast\"\n")
    assert f"{path}:1: CONFIG_LR=\"fast\": 'fast' is not a number" in _error_of(path)


def test_int_out_of_range_is_an_error(tmp_path):
    path = _write(tmp_path, "CONFIG_GPT2_BLOCK_SIZE=5\n")
    assert f"{path}:1: CONFIG_GPT2_BLOCK_SIZE 5 is out of range [8, 4096]" in _error_of(path)


def test_value_blocked_by_dependencies_is_an_error(tmp_path):
    # state pruning needs the adamwprune optimizer
    path = _write(tmp_path, "CONFIG_PRUNING_METHOD_STATE=y\n")
    msg = _error_of(path)
    assert f"{path}:1: CONFIG_PRUNING_METHOD_STATE has unmet dependencies (OPTIMIZER_ADAMWPRUNE)" in msg


def test_option_of_an_inactive_menu_is_an_error(tmp_path):
    path = _write(tmp_path, "CONFIG_MODEL_LENET5=y\nCONFIG_GPT2_BLOCK_SIZE=128\n")
    assert f"{path}:2: CONFIG_GPT2_BLOCK_SIZE has unmet dependencies (MODEL_GPT2)" in _error_of(path)


def test_malformed_line_and_duplicate_are_errors(tmp_path):
    path = _write(tmp_path, "CONFIG_SEED=1\nSEED=2\nCONFIG_SEED=3\n")
    msg = _error_of(path)
    assert f"{path}:2: malformed line 'SEED=2'" in msg
    assert f"{path}:3: CONFIG_SEED is assigned again (first at {path}:1)" in msg


def test_two_members_of_one_choice_is_an_error(tmp_path):
    path = _write(tmp_path, "CONFIG_SCHEDULE_LINEAR=y\nCONFIG_PRUNING_METHOD_MAGNITUDE=y\nCONFIG_SCHEDULE_ZHU_GUPTA=y\n")
    assert f"{path}:1: CONFIG_SCHEDULE_LINEAR is overridden: SCHEDULE_ZHU_GUPTA" in _error_of(path)


def test_cross_option_rules_name_the_symbol(tmp_path):
    path = _write(tmp_path, "CONFIG_PRUNING_METHOD_MAGNITUDE=y\nCONFIG_MAX_ITERS=100\nCONFIG_SCHEDULE_END=200\n"
                            "CONFIG_SCHEDULE_START=10\nCONFIG_SCHEDULE_FREQUENCY=10\n")
    msg = _error_of(path)
    assert f"{path}:3: CONFIG_SCHEDULE_END: step 200 is after the last step (MAX_ITERS=100)" in msg


def test_bad_schedule_is_an_error(tmp_path):
    path = _write(tmp_path, "CONFIG_PRUNING_METHOD_MAGNITUDE=y\nCONFIG_SCHEDULE_START=300\nCONFIG_SCHEDULE_END=200\n")
    assert f"{path}:3: CONFIG_SCHEDULE_END: end step 200 must be after the start step 300" in _error_of(path)


# ------------------------------------------------------------------ SET overrides

def test_set_overrides_symbols_and_choices_by_value():
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "gpt2-magnitude")
    apply_overrides(kconf, seen, ["MAX_ITERS=20", "SCHEDULE_END=20", "SCHEDULE_START=5", "SCHEDULE_FREQUENCY=5",
                                  "SCHEDULE=linear", "CONFIG_LR=3e-4", "AMSGRAD=y"])
    s = settings_from_kconfig(kconf)
    assert (s.max_iters, s.schedule, s.lr, s.amsgrad) == (20, "linear", 3e-4, True)


@pytest.mark.parametrize("override, expected", [
    ("TARGET_SPARSITY=1.5", 'SET: CONFIG_TARGET_SPARSITY="1.5": 1.5 is out of range [0, 1)'),
    ("MAX_ITRS=5", "SET MAX_ITRS=5: MAX_ITRS is not a Kconfig symbol (did you mean MAX_ITERS?)"),
    ("SCHEDULE=cubic", "SET SCHEDULE=cubic: 'cubic' is not a value of SCHEDULE (one of: one-shot, linear, "
                       "zhu-gupta, cubic-ramp, milestones, steps)"),
    ("GPT2_BLOCK_SIZE=1", "SET GPT2_BLOCK_SIZE=1: GPT2_BLOCK_SIZE 1 is out of range [8, 4096]"),
    ("AMSGRAD=1", "SET AMSGRAD=1: AMSGRAD is a bool: use y or n"),
    ("OPTIMIZER=adamw", "SET OPTIMIZER=adamw"),  # state pruning then loses its optimizer
    # Kconfig ints are decimal; Python's int() would read these, and .config would keep the text.
    ("MAX_ITERS=0x20", "SET MAX_ITERS=0x20: MAX_ITERS '0x20' is not a decimal integer (digits 0-9 only)"),
    ("MAX_ITERS=\u0663\u0660", "MAX_ITERS '\u0663\u0660' is not a decimal integer"),   # Arabic-Indic 30
    ("SEED=\uff13\uff10", "SEED '\uff13\uff10' is not a decimal integer"),            # fullwidth 30
    ("LR=\u0660.\u0661", "'\u0660.\u0661' is not a number (write it with the digits 0-9)"),
])
def test_bad_overrides_are_errors(override, expected):
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "gpt2-bitter7")
    with pytest.raises(ConfigError) as info:
        apply_overrides(kconf, seen, [override])
    assert expected in str(info.value)


@pytest.mark.parametrize("overrides, name", [
    (["MAX_ITERS=40", "LR=3e-4", "MAX_ITERS=50"], "MAX_ITERS"),
    (["SCHEDULE=linear", "CONFIG_SCHEDULE=zhu-gupta"], "SCHEDULE"),   # a choice, by value and with CONFIG_
])
def test_a_symbol_twice_in_one_set_is_an_error(overrides, name):
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "gpt2-bitter7")
    with pytest.raises(ConfigError) as info:
        apply_overrides(kconf, seen, overrides)
    assert f"SET {overrides[-1]}: {name} is set twice in one SET (also as {overrides[0]}); give it once" \
        == str(info.value)


def test_a_defconfig_with_hex_or_foreign_digits_is_an_error(tmp_path):
    path = _write(tmp_path, "CONFIG_MODEL_LENET5=y\nCONFIG_MAX_ITERS=0x20\nCONFIG_SEED=\u0663\u0660\n")
    assert _error_of(path) == (f"{path}:2: CONFIG_MAX_ITERS '0x20' is not a decimal integer (digits 0-9 only)\n"
                               f"{path}:3: CONFIG_SEED '\u0663\u0660' is not a decimal integer (digits 0-9 only)")


@pytest.mark.parametrize("flags, expected", [
    (["--max-iters", "0x20"], "--max-iters (Kconfig MAX_ITERS): '0x20' is not a decimal integer"),
    (["--seed", "\u0663\u0660"], "--seed (Kconfig SEED): '\u0663\u0660' is not a decimal integer"),
    (["--lr", "\uff10.\uff11"], "--lr (Kconfig LR): '\uff10.\uff11' is not a number (write it with the digits 0-9)"),
])
def test_trainer_flags_take_the_numbers_kconfig_takes(flags, expected, capsys):
    with pytest.raises(SystemExit):
        build_parser("lenet5", prog="x", description="").parse_args(flags)
    assert expected in capsys.readouterr().err


# ------------------------------------------------------------------ one set of rules: make and the trainer

def _trainer_settings(kconf) -> Settings:
    """The Settings the trainer builds from the flags `make train` gives it."""
    model = settings_from_kconfig(kconf).model
    return settings_from_namespace(build_parser(model, prog="x", description="").parse_args(trainer_argv(kconf)))


@pytest.mark.parametrize("overrides", [
    # one-shot has no end: SCHEDULE_END's default (3283) is no reason to refuse the run
    ["SCHEDULE=one-shot", "SCHEDULE_START=10", "MAX_ITERS=30"],
    ["SCHEDULE=one-shot", "SCHEDULE_START=0", "MAX_ITERS=30"],
    ["SCHEDULE=milestones", "SCHEDULE_MILESTONE_TABLE=0:0.0,20:0.7", "SCHEDULE_FREQUENCY=5", "MAX_ITERS=30"],
    ["SCHEDULE=steps", "SCHEDULE_STEP_LEVELS=0.3,0.7", "SCHEDULE_START=0", "SCHEDULE_FREQUENCY=10",
     "MAX_ITERS=30"],
])
def test_the_trainer_accepts_what_make_accepts(overrides):
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "lenet5-magnitude")
    apply_overrides(kconf, seen, overrides)   # make defconfig-... SET=... accepts it
    assert settings_errors(_trainer_settings(kconf)) == []


@pytest.mark.parametrize("path", DEFCONFIGS, ids=lambda p: p.name)
def test_every_defconfig_passes_the_trainer_check(path):
    kconf, _ = read_config(path)
    assert settings_errors(_trainer_settings(kconf)) == []


def test_the_trainer_refuses_what_make_refuses_with_the_same_message(tmp_path):
    path = _write(tmp_path, "CONFIG_MODEL_LENET5=y\nCONFIG_OPTIMIZER_ADAMWPRUNE=y\nCONFIG_PRUNING_METHOD_MAGNITUDE=y\n"
                            "CONFIG_SCHEDULE_ONE_SHOT=y\nCONFIG_SCHEDULE_START=40\nCONFIG_MAX_ITERS=30\n")
    rule = "CONFIG_SCHEDULE_START: step 40 is after the last step (MAX_ITERS=30)"
    assert f"{path}:5: {rule}" in _error_of(path)
    parser = build_parser("lenet5", prog="x", description="")
    flags = ["--optimizer", "adamwprune", "--pruning-method", "magnitude", "--schedule", "one-shot",
             "--schedule-start", "40", "--max-iters", "30"]
    errors = settings_errors(settings_from_namespace(parser.parse_args(flags)))
    assert len(errors) == 1 and errors[0].startswith(f"--schedule-start: {rule}")


@pytest.mark.parametrize("flags, expected", [
    (["--max-iters", "-1"], "--max-iters: MAX_ITERS -1 is out of range [0, 100000000]"),
    (["--pruning-method", "state", "--optimizer", "adamw"], "--pruning-method: PRUNING_METHOD_STATE has unmet dependencies (OPTIMIZER_ADAMWPRUNE)"),
])
def test_trainer_flags_are_held_to_the_kconfig_rules(flags, expected):
    parser = build_parser("lenet5", prog="x", description="")
    errors = settings_errors(settings_from_namespace(parser.parse_args(flags)))
    assert any(expected in e for e in errors), errors


# ------------------------------------------------------------------ the command line

def _kconfig_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.kconfig", *args], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow  # starts a process or trains: over a second
def test_failed_defconfig_leaves_dot_config_untouched(tmp_path):
    assert _kconfig_cli(tmp_path, "defconfig", "gpt2-magnitude").returncode == 0
    before = (tmp_path / ".config").read_bytes()
    bad = _write(tmp_path, "CONFIG_PRUNING_METHOD_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY=\"150\"\n", "bad")
    result = _kconfig_cli(tmp_path, "defconfig", str(bad))
    assert result.returncode == 2
    assert "150 is out of range [0, 1)" in result.stderr and ".config is unchanged" in result.stderr
    assert (tmp_path / ".config").read_bytes() == before
    result = _kconfig_cli(tmp_path, "train", "--set", "TARGET_SPARSITY=150")
    assert result.returncode == 2 and (tmp_path / ".config").read_bytes() == before


@pytest.mark.slow  # starts a process or trains: over a second
def test_set_updates_dot_config_before_the_command(tmp_path):
    assert _kconfig_cli(tmp_path, "defconfig", "lenet5-magnitude").returncode == 0
    result = _kconfig_cli(tmp_path, "command", "--set", "MAX_ITERS=4000 SEED=7")
    assert result.returncode == 0, result.stderr
    assert "-m lenet5.train " in result.stdout and "--seed 7" in result.stdout
    assert "CONFIG_SEED=7" in (tmp_path / ".config").read_text()


def test_train_without_dot_config_says_what_to_run(tmp_path):
    result = _kconfig_cli(tmp_path, "train")
    assert result.returncode == 2
    assert "make defconfig-<name>" in result.stderr and "make menuconfig" in result.stderr


def test_unknown_defconfig_lists_the_available_ones(tmp_path):
    result = _kconfig_cli(tmp_path, "defconfig", "gpt2-bitter77")
    assert result.returncode == 2 and "gpt2-bitter7" in result.stderr
