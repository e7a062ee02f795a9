"""The executor and Slurm options: strict like every option, and what they turn into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib.errors import ConfigError
from lib.kconfig import REPO_ROOT, apply_overrides, read_config
from lib.matrix.plan import build_plan
from lib.matrix.runner import run_command
from lib.matrix.slurm import array_spec, matrix_sbatch_options, script_text
from lib.matrix.slurm_options import executor, slurm_options, time_limit_seconds


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60), ("5:30", 5 * 60 + 30), ("04:00:00", 4 * 3600), ("48:00:00", 48 * 3600),
    ("2-12", (2 * 24 + 12) * 3600), ("1-02:30", 26 * 3600 + 30 * 60), ("1-02:03:04", 26 * 3600 + 3 * 60 + 4)])
def test_slurm_time_forms(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["1:2:3:4", "abc", "1-", "-5", "1:75:00", "1-25", "0", "10:60", "1h"])
def test_malformed_time_limits_are_refused(text):
    with pytest.raises(ValueError):
        time_limit_seconds(text)


@pytest.mark.parametrize("line, message", [
    ('CONFIG_SLURM_TIME="1:2:3:4"', "CONFIG_SLURM_TIME: '1:2:3:4' is not a Slurm time limit (minutes, MM:SS, "
                                    "HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"),
    ('CONFIG_SLURM_MEM="16GB"', "CONFIG_SLURM_MEM: '16GB' is not an amount of memory"),
    ('CONFIG_SLURM_PARTITION="gpu a100"', "CONFIG_SLURM_PARTITION: 'gpu a100' is not a Slurm name"),
    ('CONFIG_SLURM_EXTRA_ARGS="--array=0-3"', "CONFIG_SLURM_EXTRA_ARGS: --array is set by kprune itself"),
    ('CONFIG_SLURM_EXTRA_ARGS="exclusive"', "CONFIG_SLURM_EXTRA_ARGS: 'exclusive' is not an sbatch option"),
    ("CONFIG_SLURM_SIGNAL_SECONDS=1200", "CONFIG_SLURM_SIGNAL_SECONDS: 1200 s is not less than SLURM_TIME"),
])
def test_bad_slurm_options_name_file_line_and_symbol(tmp_path, line, message):
    # The defconfig sets SLURM_TIME="20:00" and SLURM_SIGNAL_SECONDS=120; appended lines come after it.
    base = (REPO_ROOT / "defconfigs" / "slurm-matrix-lenet5").read_text().splitlines()
    kept = [l for l in base if not l.startswith(line.split("=")[0] + "=")]
    path = tmp_path / "defconfig"
    path.write_text("\n".join(kept + [line]) + "\n")
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert f"{path}:{len(kept) + 1}: {message}" in str(info.value)


def test_slurm_options_become_sbatch_options():
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "slurm-gpt2-124m-finewebedu")
    apply_overrides(kconf, seen, ["SLURM_PARTITION=gpu", "SLURM_ACCOUNT=lab", "SLURM_QOS=high",
                                  "SLURM_EXTRA_ARGS=--constraint=a100 --exclusive", "SLURM_MAX_RUNNING=4"])
    opts = slurm_options(kconf)
    assert executor(kconf) == "slurm"
    assert matrix_sbatch_options(opts) == [
        "--partition=gpu", "--account=lab", "--qos=high", "--time=1-00:00:00", "--cpus-per-task=8", "--mem=64G",
        "--gpus=1", "--requeue", "--signal=B:USR1@600"]
    assert opts.extra_args == ("--constraint=a100", "--exclusive")
    plan = build_plan(kconf, Path("results/m/runs"))
    script = script_text(Path("/data/m"), plan, opts, Path("/work"))
    assert "#SBATCH --gpus=1\n" in script and "#SBATCH --constraint=a100 --exclusive\n" in script
    assert "#SBATCH --chdir=/work\n" in script and "#SBATCH --output=/data/m/slurm/%A_%a.out\n" in script
    assert script.rstrip().endswith('-m lib.matrix.task /data/m "$SLURM_ARRAY_TASK_ID"')


def test_array_spec_names_each_unfinished_run_once():
    assert array_spec([0, 1, 2, 5, 7, 8], 0) == "0-2,5,7-8"
    assert array_spec([3], 2) == "3%2"


def test_the_executor_does_not_change_the_plan():
    """Switching executor or time limit keeps the plan hash: the same matrix directory is resumed."""
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "slurm-matrix-lenet5")
    on_slurm = build_plan(kconf, Path("r"))
    apply_overrides(kconf, seen, ["MATRIX_EXECUTOR=local", "SLURM_TIME=4:00:00", "SLURM_MEM="])
    assert build_plan(kconf, Path("r")).plan_hash == on_slurm.plan_hash


def test_a_run_with_a_checkpoint_resumes_and_a_fresh_one_starts(tmp_path):
    kconf, _ = read_config(REPO_ROOT / "defconfigs" / "slurm-matrix-lenet5")
    run = build_plan(kconf, tmp_path / "runs").runs[0]
    run_dir = tmp_path / "runs" / run.id
    fresh = run_command(run, run_dir, threads=3)
    assert fresh[fresh.index("--threads") + 1] == "3" and fresh[fresh.index("--resume-from") + 1] == ""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert run_command(run, run_dir, 3) == fresh  # no checkpoint: nothing to resume from
    (run_dir / "checkpoint.json").write_text("{}")
    resumed = run_command(run, run_dir, 3)
    assert resumed[resumed.index("--resume-from") + 1] == str(run_dir) and resumed.count("--resume-from") == 1
    (run_dir / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert run_command(run, run_dir, 3) == fresh
