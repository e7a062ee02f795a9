"""DistributedDataParallel under torchrun on CPUs (gloo): one node with two processes, two nodes.

`make train` starts torchrun as a user would; tests/split_batch_trainer.py splits one global batch
across the ranks, so two processes must reproduce one process's run to float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib.errors import KpruneError
from lib.kconfig import REPO_ROOT
from lib.results import read_metrics

pytestmark = pytest.mark.slow

QUICK = ("MAX_ITERS=12 SCHEDULE_START=2 SCHEDULE_END=10 SCHEDULE_FREQUENCY=2 EVAL_INTERVAL=12 LOG_INTERVAL=4 "
         "GPT2_EVAL_ITERS=4 LR_WARMUP_ITERS=2 THREADS=1")
UPDATE_STEPS = [2, 4, 6, 8, 10]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kconfig(cwd: Path, *args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "scripts.kconfig", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if wait:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(stdout: str, cwd: Path) -> dict:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results: "), stdout
    return json.loads((cwd / last.removeprefix("results: ") / "summary.json").read_text())


def _prepare(cwd: Path, extra: str) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    result = _kconfig(cwd, "defconfig", str(REPO_ROOT / "defconfigs" / "gpt2-bitter7"), "--set",
                      f"{QUICK} DATA_DIR={REPO_ROOT / 'data'} {extra}")
    assert result.returncode == 0, result.stderr


# The real GPT-2 trainer as `make train` launches it. Its ranks draw their own batches, so its numbers
# are not one process's: the split-batch test below compares a run with one process exactly.
def test_two_processes_on_one_node(tmp_path):
    _prepare(tmp_path, f"DDP_NPROC_PER_NODE=2 DDP_MASTER_PORT={_free_port()}")
    result = _kconfig(tmp_path, "train")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch.distributed.run --nproc-per-node=2" in result.stdout.splitlines()[0]
    summary = _summary(result.stdout, tmp_path)
    assert summary["status"] == "complete" and summary["world_size"] == 2
    assert summary["target_count_exact"] and summary["mask_pruned_count"] == summary["final_pruned_count"]
    assert [u["step"] for u in summary["mask_updates"]] == UPDATE_STEPS
    assert len(list(tmp_path.glob("results/*/summary.json"))) == 1  # only rank 0 wrote


def test_two_processes_calibrate_alike_and_agree_on_sparsegpt_masks(tmp_path):
    # Each rank runs its share of the calibration batches and the sums are averaged: every rank reconstructs
    # the same layers (the mask digest is compared at every update, and the weights must stay in step too).
    _prepare(tmp_path, f"DDP_NPROC_PER_NODE=2 DDP_MASTER_PORT={_free_port()} PRUNING_METHOD=sparsegpt "
                       "SPARSITY_SCOPE=layer CALIBRATION_BATCHES=3")
    result = _kconfig(tmp_path, "train")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(result.stdout, tmp_path)
    assert summary["status"] == "complete" and summary["world_size"] == 2 and summary["pruning_method"] == "sparsegpt"
    assert summary["target_count_exact"] and summary["mask_pruned_count"] == summary["final_pruned_count"]
    assert [u["step"] for u in summary["mask_updates"]] == UPDATE_STEPS


def test_two_single_process_nodes_on_loopback(tmp_path):
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        cwd = tmp_path / f"node{rank}"
        _prepare(cwd, f"DDP_NNODES=2 DDP_NODE_RANK={rank} DDP_MASTER_ADDR=127.0.0.1 DDP_MASTER_PORT={port}")
        nodes.append((cwd, _kconfig(cwd, "train", wait=False)))
    outputs = [(cwd, proc.communicate(timeout=600), proc.returncode) for cwd, proc in nodes]
    for cwd, (out, err), code in outputs:
        assert code == 0, out + err
    summary = _summary(outputs[0][1][0], outputs[0][0])
    assert summary["status"] == "complete" and summary["world_size"] == 2 and summary["target_count_exact"]
    assert [u["step"] for u in summary["mask_updates"]] == UPDATE_STEPS
    assert not list((tmp_path / "node1").glob("results/*"))  # node 1 holds rank 1: it writes nothing


def _mismatch_worker(rank: int, port: int, queue) -> None:
    from lib.distributed import check_masks_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bits = [torch.tensor([1, 0], dtype=torch.uint8), torch.tensor([0, 1], dtype=torch.uint8)]
    check_masks_agree(bits, step=5)  # equal masks pass
    if rank == 1:  # as many pruned weights, in other places
        bits = [torch.tensor([0, 1], dtype=torch.uint8), torch.tensor([1, 0], dtype=torch.uint8)]
    try:
        check_masks_agree(bits, step=6)
        queue.put((rank, "no error"))
    except KpruneError as exc:
        queue.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def test_differing_masks_stop_every_rank_with_a_clear_error():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_mismatch_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    messages = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        assert "the masks differ across ranks after the update at step 6" in messages[rank]


# SGD, not Adam: Adam's update hardly changes when every gradient is doubled, SGD's doubles.
# No clipping (it would rescale a doubled gradient), no dropout, one thread: a deterministic run.
SPLIT = ["--optimizer", "sgd", "--sgd-momentum", "0.9", "--weight-decay", "0", "--lr", "0.1", "--min-lr", "0.01",
         "--lr-warmup-iters", "0", "--grad-clip", "0", "--max-iters", "10", "--eval-interval", "10",
         "--log-interval", "1", "--pruning-method", "magnitude", "--schedule", "linear", "--schedule-start", "2",
         "--schedule-end", "8", "--schedule-frequency", "2", "--target-sparsity", "0.5", "--threads", "1",
         "--seed", "3", "--device", "cpu", "--precision", "fp32", "--data-workers", "0"]
TIGHT = 1e-5  # relative: float rounding of a sum split in two is ~1e-7


def _split_run(out: Path, *flags: str, ranks: int = 1) -> tuple[list[dict], list[dict]]:
    """(rows of metrics.jsonl, each rank's final weights) of one split-batch run."""
    argv = ["-m", "tests.split_batch_trainer", *SPLIT, "--output-dir", str(out), *flags]
    if ranks > 1:
        argv = ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--nnodes=1",
                "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *argv,
                "--ddp-nproc-per-node", str(ranks), "--ddp-backend", "gloo"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("results: "))
    weights = [torch.load(out / f"weights-rank{r}.pt") for r in range(ranks)]
    return read_metrics(run_dir / "metrics.jsonl"), weights


def _relative_difference(a: dict, b: dict) -> float:
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return diff / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5


@pytest.mark.timeout(600)  # four runs, one of them under torchrun
def test_two_processes_reproduce_one_process_with_the_same_global_batch(tmp_path):
    one_rows, (one,) = _split_run(tmp_path / "one")
    two_rows, (rank0, rank1) = _split_run(tmp_path / "two", ranks=2)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the ranks hold one model
    assert _relative_difference(rank0, one) < TIGHT
    # the same weights pruned: masks agree with the single process's, not just their counts
    assert all(torch.equal(rank0[k] == 0, one[k] == 0) for k in one if k.endswith("weight"))
    losses = [(a["loss"], b["loss"]) for a, b in zip(one_rows, two_rows) if "loss" in a]
    assert len(losses) == 10 and [r["step"] for r in one_rows] == [r["step"] for r in two_rows]
    assert all(abs(a - b) <= TIGHT * abs(a) for a, b in losses), losses
    # Validation split across the ranks (2 of its 4 batches each) gives the single process's figures.
    evals = [(a, b) for a, b in zip(one_rows, two_rows) if "val_loss" in a]
    assert len(evals) == 2 and all(abs(a["val_loss"] - b["val_loss"]) <= TIGHT * a["val_loss"]
                                   and a["val_accuracy"] == b["val_accuracy"] for a, b in evals), evals
    # A wrong average (the sum over two ranks, or half the mean) scales SGD's step like LR x2 or /2:
    # far outside the tolerance, so the comparison above catches it.
    for lr in ("0.2", "0.05"):
        _, (wrong,) = _split_run(tmp_path / f"lr{lr}", "--lr", lr)
        assert _relative_difference(wrong, one) > 1000 * TIGHT
