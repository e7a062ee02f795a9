"""`make test-matrix` as a user runs it: real runs, failures isolated, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.kconfig import REPO_ROOT
from lib.results import write_json_atomic

pytestmark = pytest.mark.slow

QUICK = ("MAX_ITERS=12 SCHEDULE_START=2 SCHEDULE_END=10 SCHEDULE_FREQUENCY=2 EVAL_INTERVAL=12 LOG_INTERVAL=4 "
         "BATCH_SIZE=32 LR_WARMUP_ITERS=2 MATRIX_NAME=t")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _cli(cwd: Path, module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _defconfig(cwd: Path, extra: str = "", name: str = "test-matrix-bitter-variants") -> None:
    variants = " ".join(f"MATRIX_VARIANT_BITTER{i}=n" for i in range(10) if i != 7)
    # One SET names a symbol once: a symbol in `extra` replaces QUICK's value for it.
    words = dict(w.split("=", 1) for w in f"{QUICK} {variants} DATA_DIR={REPO_ROOT / 'data'} {extra}".split())
    result = _cli(cwd, "scripts.kconfig", "defconfig", str(REPO_ROOT / "defconfigs" / name), "--set",
                  " ".join(f"{k}={v}" for k, v in words.items()))
    assert result.returncode == 0, result.stderr


def _matrix_dir(result: subprocess.CompletedProcess, cwd: Path) -> Path:
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("results: "), result.stdout + result.stderr
    return cwd / last.removeprefix("results: ")


def _status(matrix_dir: Path) -> dict:
    return json.loads((matrix_dir / "status.json").read_text())["runs"]


def test_matrix_runs_every_combination_in_parallel(tmp_path):
    _defconfig(tmp_path, "MATRIX_SEEDS=2")
    result = _cli(tmp_path, "scripts.matrix", "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    matrix_dir = _matrix_dir(result, tmp_path)
    assert matrix_dir.name.startswith("matrix-t-")
    plan = json.loads((matrix_dir / "plan.json").read_text())
    assert len(plan["runs"]) == 4 and (matrix_dir / "plan.md").exists()
    status = _status(matrix_dir)
    assert {k: v["status"] for k, v in status.items()} == {r["id"]: "complete" for r in plan["runs"]}
    for run in plan["runs"]:
        summary = json.loads((matrix_dir / "runs" / run["id"] / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["seed"] == run["seed"]
        assert summary["threads"] == max(1, (os.cpu_count() or 1) // 2)  # threads divided between jobs
    assert "with" in result.stdout and "2 at a time" in result.stdout


def test_failures_are_isolated_and_resume_reruns_only_what_is_left(tmp_path):
    _defconfig(tmp_path, "MATRIX_SEEDS=2")
    first = _cli(tmp_path, "scripts.matrix")
    matrix_dir = _matrix_dir(first, tmp_path)
    plan_path = matrix_dir / "plan.json"
    plan = json.loads(plan_path.read_text())
    ids = [r["id"] for r in plan["runs"]]

    # Break two runs of the plan: one diverges, one cannot find its data; then re-run the matrix.
    plan["runs"][0]["argv"] += ["--lr", "1e6", "--grad-clip", "0", "--lr-warmup-iters", "0", "--max-iters", "200"]
    plan["runs"][1]["argv"] += ["--data-dir", str(tmp_path / "no-such-data")]
    write_json_atomic(plan_path, plan)
    for run_id in ids[:2]:
        (matrix_dir / "runs" / run_id / "summary.json").unlink()
    kept = {i: (matrix_dir / "runs" / i / "summary.json").stat().st_mtime_ns for i in ids[2:]}

    second = _cli(tmp_path, "scripts.matrix", "--results", str(matrix_dir))
    assert second.returncode == 1, second.stdout + second.stderr
    status = _status(matrix_dir)
    assert status[ids[0]]["status"] == "diverged"
    assert status[ids[1]]["status"] == "failed" and "no-such-data" in status[ids[1]]["error"]
    for run_id in ids[2:]:  # finished runs were not run again
        assert status[run_id] == {"status": "complete", "skipped": True}
        assert (matrix_dir / "runs" / run_id / "summary.json").stat().st_mtime_ns == kept[run_id]
    assert "2 of 4 runs complete" in second.stdout


def test_a_new_invocation_resumes_the_newest_unfinished_matrix_with_the_same_plan(tmp_path):
    _defconfig(tmp_path)
    matrix_dir = _matrix_dir(_cli(tmp_path, "scripts.matrix"), tmp_path)
    victim = sorted((matrix_dir / "runs").iterdir())[0]
    (victim / "summary.json").unlink()
    again = _cli(tmp_path, "scripts.matrix")
    assert f"resuming {matrix_dir.relative_to(tmp_path)}" in again.stdout
    assert _matrix_dir(again, tmp_path) == matrix_dir
    status = _status(matrix_dir)
    assert status[victim.name]["status"] == "complete" and "skipped" not in status[victim.name]
    # complete now: the next invocation starts a fresh matrix
    assert _matrix_dir(_cli(tmp_path, "scripts.matrix"), tmp_path) != matrix_dir


@pytest.mark.timeout(700)  # its own waits add up to 660 s on a loaded machine
def test_killed_matrix_loses_no_finished_run(tmp_path):
    # Two runs one after another (magnitude and bitter7, one seed): the interrupt comes as the first completes
    # (polled every 0.2 s), while the second, a process start and 150 steps, is still to go. One finished run
    # and one cut short is all the guarantee is about (the finished one kept as it was, the cut one marked so
    # and finished by the resume); more seeds only meant more runs to train before and after the interrupt.
    _defconfig(tmp_path, "MATRIX_SEEDS=1 MAX_ITERS=150 SCHEDULE_END=100 EVAL_INTERVAL=150")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.matrix"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, finished = time.time() + 240, None
    while time.time() < deadline and finished is None:
        for summary in tmp_path.glob("results/matrix-*/runs/*/summary.json"):
            if json.loads(summary.read_text()).get("status") == "complete":
                finished = summary
        time.sleep(0.2)
    assert finished is not None, "no run finished"
    mtime = finished.stat().st_mtime_ns
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "finished runs are kept" in err
    matrix_dir = finished.parent.parent.parent
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in matrix_dir.glob("runs/*/summary.json")}
    assert "running" not in statuses.values()  # the run cut short says so
    resumed = _cli(tmp_path, "scripts.matrix", "--results", str(matrix_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert finished.stat().st_mtime_ns == mtime
    assert all(v["status"] == "complete" for v in _status(matrix_dir).values())
