"""`python -m scripts.plots`, the program behind `make plots`, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The fixture builder lives with the report tests; conftest fixtures do not reach this directory, the class does.
from tests.lib.report.conftest import MatrixBuilder

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.plots", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def _matrix(root: Path, stamp: str = "20261121-221000") -> Path:
    builder = MatrixBuilder(root=root, stamp=stamp)
    for seed in (1337, 1338):
        builder.add(method="magnitude", seed=seed, quality=50.0 + seed % 2)
        builder.add(method="bitter7", seed=seed, quality=47.0 + seed % 2)
    builder.add(method="bitter7", seed=1339, status="diverged", error="loss became nan at step 57")
    return builder.write()


@pytest.mark.slow  # starts a process or trains: over a second
def test_writes_plots_and_report(tmp_path):
    matrix = _matrix(tmp_path / "results")
    result = _run("--results", str(matrix))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"report: {matrix / 'report.md'}"
    assert (matrix / "report.md").is_file()
    plots = [line.removeprefix("plot: ") for line in lines if line.startswith("plot: ")]
    assert len(plots) == 6 and all(Path(p).read_bytes().startswith(b"\x89PNG") for p in plots)


@pytest.mark.slow  # starts a process or trains: over a second
def test_picks_the_newest_matrix(tmp_path):
    _matrix(tmp_path / "results", stamp="20261120-090000")
    newest = _matrix(tmp_path / "results", stamp="20261121-090000")
    result = _run("--output-root", str(tmp_path / "results"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"matrix: {newest}"
    assert result.stdout.strip().splitlines()[-1] == f"report: {newest / 'report.md'}"


def test_bad_input_exits_2_with_the_message(tmp_path):
    result = _run("--results", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: no matrix directory") and "make test-matrix" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run("--output-root", str(tmp_path))
    assert result.returncode == 2 and "no matrix directory under" in result.stderr


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow  # starts a process or trains: over a second
def test_looks_where_output_dir_in_config_points(tmp_path):
    """make test-matrix wrote to OUTPUT_DIR=out; an older-named but newer matrix in results/ is not it."""
    made = subprocess.run([sys.executable, "-m", "scripts.kconfig", "defconfig", "demo", "--set", "OUTPUT_DIR=out"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    _matrix(tmp_path / "results", stamp="20261122-090000")
    written = _matrix(tmp_path / "out", stamp="20261121-090000")
    result = subprocess.run([sys.executable, "-m", "scripts.plots"], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"matrix: {written.relative_to(tmp_path)}"
    assert (written / "report.md").is_file()
    assert not list((tmp_path / "results").glob("*/report.md"))


@pytest.mark.slow  # starts a process or trains: over a second
def test_damaged_metrics_are_one_warning_and_the_report_goes_on(tmp_path):
    matrix = _matrix(tmp_path / "results")
    damaged = matrix / "runs" / "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-seed1337" / "metrics.jsonl"
    lines = damaged.read_bytes().split(b"\n")
    lines[3] = b"\xff\xfe garbage \x80"
    damaged.write_bytes(b"\n".join(lines))
    result = _run("--results", str(matrix))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    [warning] = result.stderr.strip().splitlines()
    assert warning.startswith(f"warning: {damaged}: line 4 not readable")
    assert f"make test-matrix RESULTS={matrix}" in warning
    report = (matrix / "report.md").read_text()
    assert "## Files not read in full" in report and str(damaged) in report
    assert "| `gpt2-adamwprune-bitter7-sp0.5-cubic-ramp` | bitter7 |" in report  # the arm is still reported


@pytest.mark.slow  # starts a process or trains: over a second
@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"{not json", b"[1, 2]"])
def test_garbage_summary_leaves_that_run_out(tmp_path, content):
    matrix = _matrix(tmp_path / "results")
    bad = matrix / "runs" / "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-seed1337" / "summary.json"
    bad.write_bytes(content)
    result = _run("--results", str(matrix))
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.strip().splitlines()
    assert warning.startswith(f"warning: {bad}: summary.json ") and "the run is left out" in warning
    report = (matrix / "report.md").read_text()
    assert "| `gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-seed1337` | unreadable |" in report


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"{not json"])
def test_garbage_plan_is_one_error_line(tmp_path, content):
    matrix = _matrix(tmp_path / "results")
    (matrix / "plan.json").write_bytes(content)
    result = _run("--results", str(matrix))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {matrix / 'plan.json'}: plan.json is not ") and "make test-matrix" in line
