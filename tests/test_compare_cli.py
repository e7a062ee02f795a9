"""`python -m scripts.compare`, the program behind `make compare`: arms of two matrices in one report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lib.report.conftest import MatrixBuilder

REPO = Path(__file__).resolve().parents[1]
SEEDS = (1337, 1338, 1339)
MAG = "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp"
BIT = "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp"
MOV = "gpt2-adamwprune-movement-sp0.5-cubic-ramp"


def _run(*args: str, cwd: Path = REPO, results: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KPRUNE_RESULTS", None)
    if results is not None:
        env["KPRUNE_RESULTS"] = results
    return subprocess.run([sys.executable, "-m", "scripts.compare", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _two_matrices(root: Path, frequency_b: int = 20) -> tuple[Path, Path]:
    a = MatrixBuilder(root=root, name="first")
    b = MatrixBuilder(root=root, name="second", stamp="20261122-090000")
    for i, seed in enumerate(SEEDS):
        a.add(method="magnitude", seed=seed, quality=50.0 + i)
        a.add(method="bitter7", seed=seed, quality=49.0 + i)
        b.add(method="magnitude", seed=seed, quality=50.0 + i, settings={"schedule_frequency": frequency_b})
        b.add(method="movement", seed=seed, quality=51.0 + i + 0.1 * i, settings={"schedule_frequency": frequency_b})
    return a.write(), b.write()


def _report(result: subprocess.CompletedProcess) -> Path:
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))


@pytest.mark.slow  # starts a process or trains: over a second
def test_arms_of_two_matrices_in_one_report(tmp_path):
    a, b = _two_matrices(tmp_path / "results")
    result = _run(str(a), str(b), "--output-root", str(tmp_path / "results"))
    report = _report(result)
    assert report.parent.parent == tmp_path / "results" and report.parent.name.startswith("compare-")
    text = report.read_text()
    assert "# Test matrix report: first vs second" in text
    assert f"- Compares the matrices: `{a}`, `{b}`" in text and "- Baseline arm: `first/" + MAG + "`" in text
    # second/movement paired with first/magnitude by seed: +1.0, +1.1, +1.2 (mean +1.1, std 0.1, half 0.248414).
    assert f"| `second/{MOV}` | `first/{MAG}` | 3 | +1.10 | 0.10 | [+0.85, +1.35] | worse | none |" in text
    audit = text.split("## Fairness audit", 1)[1]
    assert f"- `first/{MAG}` vs `second/{MAG}` (against the baseline; intended axis: none): " \
           "no differences besides the intended axis" in audit
    assert not (a / "report.md").exists() and not (b / "report.md").exists()  # the sources are only read
    assert len(list((report.parent / "plots").glob("*.png"))) == 6


@pytest.mark.slow  # starts a process or trains: over a second
def test_the_same_audit_finds_what_differs_between_matrices(tmp_path):
    a, b = _two_matrices(tmp_path / "results", frequency_b=10)
    text = _report(_run(str(a), str(b), "--output", str(tmp_path / "cmp"))).read_text()
    assert (tmp_path / "cmp" / "report.md").is_file()
    assert f"- `first/{MAG}` vs `second/{MAG}` (against the baseline; intended axis: none): 1 difference" in text
    assert "  - schedule.frequency: 20 vs 10 (setting schedule_frequency: 20 vs 10)" in text


@pytest.mark.slow  # starts a process or trains: over a second
def test_directories_from_the_results_variable_as_make_passes_them(tmp_path):
    a, b = _two_matrices(tmp_path / "results dir")
    result = _run("--output", str(tmp_path / "cmp"), results=f"'{a}' '{b}'")
    assert _report(result) == tmp_path / "cmp" / "report.md"


@pytest.mark.slow  # starts a process or trains: over a second
def test_bad_input_is_one_error_line(tmp_path):
    a, _ = _two_matrices(tmp_path / "results")
    for args, results, message in (((str(a),), None, "compare needs two or more matrix directories"),
                                   ((str(a), str(tmp_path / "nope")), None, "no matrix directory"),
                                   ((), f"'{a}", "RESULTS: No closing quotation")):
        result = _run(*args, "--output", str(tmp_path / "cmp"), results=results)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and message in line
    assert not (tmp_path / "cmp").exists()
    (tmp_path / "cmp").mkdir()
    result = _run(str(a), str(a), "--output", str(tmp_path / "cmp"))
    assert result.returncode == 2 and "already exists" in result.stderr
