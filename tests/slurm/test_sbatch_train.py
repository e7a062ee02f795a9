"""make sbatch-train on the real one-node Slurm: srun starts make train on the node, whose torchrun
takes its node rank, node count, head node and port from Slurm's environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.kconfig import REPO_ROOT

pytestmark = pytest.mark.slow

QUICK = ("MAX_ITERS=12 SCHEDULE_START=2 SCHEDULE_END=10 SCHEDULE_FREQUENCY=2 EVAL_INTERVAL=12 LOG_INTERVAL=4 "
         "GPT2_EVAL_ITERS=4 LR_WARMUP_ITERS=2 THREADS=1 BATCH_SIZE=8")


def _cli(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)


def test_sbatch_train_runs_torchrun_per_node_with_slurms_rendezvous(slurm, data_dir, tmp_path):
    result = _cli(tmp_path, "scripts.kconfig", "defconfig", "gpt2-bitter7", "--set",
                  f"{QUICK} DDP_NPROC_PER_NODE=2 SLURM_CPUS=2 DATA_DIR={data_dir}")
    assert result.returncode == 0, result.stderr
    submitted = _cli(tmp_path, "scripts.sbatch_train")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split()[2].rstrip(":")
    (job_dir,) = tmp_path.glob("results/slurm-train-*")
    script = (job_dir / "train.sbatch").read_text()
    assert "#SBATCH --nodes=1\n" in script and "exec srun --nodes=1 --ntasks=1 --ntasks-per-node=1" in script
    deadline = time.time() + 180
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "the job did not finish"
        time.sleep(1)
    out = (job_dir / f"{job_id}.out").read_text()
    torchrun = next(l for l in out.splitlines() if "torch.distributed.run" in l)
    assert (f"--nnodes=1 --node-rank=0 --master-addr=localhost --master-port={29500 + int(job_id) % 1000}"
            in torchrun), torchrun
    run_dir = tmp_path / out.strip().splitlines()[-1].removeprefix("results: ")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["world_size"] == 2
