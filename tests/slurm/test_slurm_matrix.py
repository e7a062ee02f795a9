"""The test matrix through a real Slurm: same results as the local runner, exact resume after a
requeue or a time-limit warning, resubmission of only what is left, clear errors that lose nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib.kconfig import REPO_ROOT
from tests.test_matrix_e2e import _matrix_dir  # the matrix directory a runner's last line names

pytestmark = pytest.mark.slow

QUICK = ("MAX_ITERS=40 SCHEDULE_START=5 SCHEDULE_END=30 SCHEDULE_FREQUENCY=5 EVAL_INTERVAL=40 LOG_INTERVAL=5 "
         "LR_WARMUP_ITERS=5 BATCH_SIZE=64 MATRIX_SEEDS=1 CHECKPOINT_INTERVAL=0 MATRIX_NAME=t")
# Final metrics a run reports; equal between two runs of the same plan on the CPU.
FINAL = ("val_accuracy", "val_loss", "final_sparsity", "final_pruned_count", "iterations", "seed")


def _cli(cwd: Path, module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _defconfig(cwd: Path, extra: str = "") -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    # One SET names a symbol once: `extra` replaces QUICK's value of a symbol it also sets.
    values = dict(item.split("=", 1) for item in f"{QUICK} DATA_DIR={REPO_ROOT / 'data'} {extra}".split())
    result = _cli(cwd, "scripts.kconfig", "defconfig", "slurm-matrix-lenet5", "--set",
                  " ".join(f"{k}={v}" for k, v in values.items()))
    assert result.returncode == 0, result.stderr


def _states(cwd: Path, matrix_dir: Path) -> dict[str, str]:
    result = _cli(cwd, "scripts.matrix_jobs", "status", "--results", str(matrix_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:-1]]
    return {row[0]: row[1] for row in rows}


def _wait(predicate, what: str, timeout: float = 240.0, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    queue = subprocess.run(["squeue", "-a", "-r", "-o", "%i %T %r %M"], capture_output=True, text=True)
    nodes = subprocess.run(["sinfo", "-N", "-o", "%N %t %E"], capture_output=True, text=True)
    pytest.fail(f"timed out waiting for {what}\n{queue.stdout}{queue.stderr}\n{nodes.stdout}{nodes.stderr}")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _jobs(matrix_dir: Path) -> list[dict]:
    return json.loads((matrix_dir / "slurm" / "jobs.json").read_text())["submissions"]


def _squeue(job: str) -> str:
    result = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def matrices(slurm, tmp_path_factory) -> dict:
    """The same three-run matrix, submitted to Slurm and run by the local runner at the same time."""
    local_cwd, slurm_cwd = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("slurm")
    _defconfig(local_cwd, "MATRIX_EXECUTOR=local")
    _defconfig(slurm_cwd)
    submitted = _cli(slurm_cwd, "scripts.matrix")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    matrix_dir = _matrix_dir(submitted, slurm_cwd)
    # At once, while its runs are still queued or running, a second submission adds nothing.
    states_then = _states(slurm_cwd, matrix_dir)
    again = _cli(slurm_cwd, "scripts.matrix")
    # One run per CPU locally too: the same torch threads (1) as each Slurm task gets.
    local = subprocess.Popen([sys.executable, "-m", "scripts.matrix", "--jobs", str(os.cpu_count() or 1)],
                             cwd=local_cwd, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    local_out, local_err = local.communicate(timeout=300)
    assert local.returncode == 0, local_out + local_err
    _wait(lambda: set(_states(slurm_cwd, matrix_dir).values()) == {"complete"}, "the Slurm matrix to complete")
    return {"submitted": submitted, "again": again, "states_then": states_then, "slurm_dir": matrix_dir,
            "slurm_cwd": slurm_cwd, "local_dir": local_cwd / local_out.strip().splitlines()[-1].removeprefix(
                "results: ")}


def test_submission_prints_the_job_and_the_matrix_dir_and_returns(matrices):
    out = matrices["submitted"].stdout
    jobs = _jobs(matrices["slurm_dir"])
    assert len(jobs) == 1 and f"submitted job {jobs[0]['job_id']}: 3 of 3 runs" in out
    assert sorted(jobs[0]["tasks"]) == ["0", "1", "2"]
    assert set(matrices["states_then"].values()) <= {"queued", "running"}, matrices["states_then"]
    script = (matrices["slurm_dir"] / "slurm" / "submission-1.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script


def test_a_second_submission_while_runs_are_queued_or_running_adds_nothing(matrices):
    again = matrices["again"]
    assert again.returncode == 0, again.stderr
    assert "nothing to submit: every run is complete, queued or running" in again.stdout
    assert _matrix_dir(again, matrices["slurm_cwd"]) == matrices["slurm_dir"]


def test_slurm_matrix_gives_the_local_runners_results(matrices):
    plan = json.loads((matrices["slurm_dir"] / "plan.json").read_text())
    assert len(plan["runs"]) == 3
    for run in plan["runs"]:
        on_slurm = _summary(matrices["slurm_dir"] / "runs" / run["id"])
        local = _summary(matrices["local_dir"] / "runs" / run["id"])
        assert on_slurm["status"] == local["status"] == "complete"
        assert on_slurm["threads"] == local["threads"] == 1
        assert {k: on_slurm[k] for k in FINAL} == {k: local[k] for k in FINAL}, run["id"]
        log = (matrices["slurm_dir"] / "logs" / f"{run['id']}.log").read_text()
        assert "Slurm task" in log and log.rstrip().splitlines()[-1].startswith("results: ")


def test_a_second_submission_submits_only_unfinished_runs(matrices):
    matrix_dir, cwd = matrices["slurm_dir"], matrices["slurm_cwd"]
    runs = sorted((matrix_dir / "runs").iterdir())
    victim, kept = runs[0], runs[1:]
    mtimes = {r.name: (r / "summary.json").stat().st_mtime_ns for r in kept}
    (victim / "summary.json").unlink()
    assert _states(cwd, matrix_dir)[victim.name] not in ("complete", "queued", "running")
    result = _cli(cwd, "scripts.matrix", "--results", str(matrix_dir))
    assert result.returncode == 0, result.stderr
    jobs = _jobs(matrix_dir)
    assert len(jobs) == 2 and list(jobs[1]["tasks"].values()) == [victim.name]
    _wait(lambda: _states(cwd, matrix_dir)[victim.name] == "complete", "the resubmitted run")
    assert {r.name: (r / "summary.json").stat().st_mtime_ns for r in kept} == mtimes


def test_requeued_and_warned_run_resumes_bit_identical_to_an_uninterrupted_one(slurm, tmp_path):
    """A time-limit warning (USR1 to the batch shell) and a `scontrol requeue` during one run."""
    one = ("MATRIX_METHOD_MOVEMENT=n MATRIX_VARIANT_BITTER7=n MAX_ITERS=600 SCHEDULE_END=500 SCHEDULE_FREQUENCY=50 "
           "EVAL_INTERVAL=600 LOG_INTERVAL=10 BATCH_SIZE=32 CHECKPOINT_INTERVAL=600")
    _defconfig(tmp_path, one)
    submitted = _cli(tmp_path, "scripts.matrix")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    matrix_dir = _matrix_dir(submitted, tmp_path)
    plan = json.loads((matrix_dir / "plan.json").read_text())
    (run,) = plan["runs"]
    job = f"{_jobs(matrix_dir)[0]['job_id']}_0"
    run_dir = matrix_dir / "runs" / run["id"]
    # The same run without interruption, next to it: same flags, same single thread.
    reference = subprocess.Popen([sys.executable, "-m", "lenet5.train", *run["argv"], "--threads", "1",
                                  "--output-dir", str(tmp_path / "reference")], cwd=tmp_path,
                                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)

    def step() -> int:
        path = run_dir / "metrics.jsonl"
        rows = [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")] if path.exists() else []
        return max((r["step"] for r in rows), default=0)

    _wait(lambda: step() >= 100, "the run to pass step 100", every=0.05)
    warned = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True)
    assert warned.returncode == 0, warned.stderr
    _wait(lambda: _squeue(job) == "PENDING", "the warned task to requeue itself", every=0.1)
    first_stop = json.loads((run_dir / "checkpoint.json").read_text())["step"]
    assert _summary(run_dir)["status"] == "interrupted" and 100 <= first_stop < 600
    _wait(lambda: step() >= first_stop + 100, "the run to continue", every=0.05)
    requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr
    _wait(lambda: _states(tmp_path, matrix_dir)[run["id"]] == "complete", "the requeued run to complete")
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    log = (matrix_dir / "logs" / f"{run['id']}.log").read_text()
    starts = [l for l in log.splitlines() if l.startswith("== ")]
    resume = f"--resume-from {matrix_dir.resolve() / 'runs' / run['id']}"
    assert len(starts) == 3 and resume not in starts[0] and all(resume in s for s in starts[1:])
    assert log.count("resuming ") == 2 and f"after step {first_stop}" in log
    ours = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    theirs = torch.load(tmp_path / "reference" / run["id"] / "checkpoint.pt", weights_only=False)
    assert ours["step"] == theirs["step"] == 600
    for key, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][key], tensor), key
    summary, ref = _summary(run_dir), _summary(tmp_path / "reference" / run["id"])
    assert {k: summary[k] for k in FINAL} == {k: ref[k] for k in FINAL}


def test_matrix_cancel_stops_what_is_queued_or_running(slurm, tmp_path):
    _defconfig(tmp_path, "MAX_ITERS=3000 SCHEDULE_END=2000 SCHEDULE_FREQUENCY=100 EVAL_INTERVAL=3000")
    matrix_dir = _matrix_dir(_cli(tmp_path, "scripts.matrix"), tmp_path)
    _wait(lambda: list(matrix_dir.glob("runs/*/metrics.jsonl")), "a trainer to start")
    # The local runner refuses to run what Slurm is running.
    local = _cli(tmp_path, "scripts.matrix", "--results", str(matrix_dir), "--set", "MATRIX_EXECUTOR=local")
    assert local.returncode == 2 and "3 runs of" in local.stderr and "queued or running on Slurm" in local.stderr
    result = _cli(tmp_path, "scripts.matrix_jobs", "cancel", "--results", str(matrix_dir))
    assert result.returncode == 0, result.stderr
    assert "cancelled 3 Slurm tasks" in result.stdout
    states = _wait(lambda: (s := _states(tmp_path, matrix_dir)) and
                   not {"queued", "running"} & set(s.values()) and s, "the tasks to end")
    assert "complete" not in states.values() and "interrupted" in states.values(), states
    assert all((matrix_dir / "runs" / run_id / "checkpoint.json").exists()
               for run_id, state in states.items() if state == "interrupted")


def test_unknown_partition_is_an_error_that_writes_nothing(slurm, tmp_path):
    _defconfig(tmp_path, "SLURM_PARTITION=nosuchpartition")
    result = _cli(tmp_path, "scripts.matrix")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: SLURM_PARTITION: Slurm refuses the runs' job: invalid partition "
                                    "specified: nosuchpartition"), result.stderr
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_malformed_time_limit_is_an_error_that_writes_nothing(slurm, tmp_path):
    _defconfig(tmp_path)
    before = (tmp_path / ".config").read_bytes()
    result = _cli(tmp_path, "scripts.matrix", "--set", "SLURM_TIME=1:2:3:4")
    assert result.returncode == 2
    assert "SET: CONFIG_SLURM_TIME: '1:2:3:4' is not a Slurm time limit (minutes, MM:SS, HH:MM:SS" in result.stderr
    assert (tmp_path / ".config").read_bytes() == before and not (tmp_path / "results").exists()
