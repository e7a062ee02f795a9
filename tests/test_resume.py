"""Checkpoints: an interrupted run resumes exactly; a bad checkpoint is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib.kconfig import REPO_ROOT

pytestmark = pytest.mark.slow

# Batches of 4 sequences of 32 tokens: a step's cost is mostly the 50,257-way output layer, and resuming
# bit-identically (data position, RNG, optimizer, masks, schedule) does not depend on how many tokens a step has.
FLAGS = ["--batch-size", "4", "--block-size", "32", "--max-iters", "30", "--log-interval", "1", "--eval-interval", "30", "--eval-iters", "1",
         "--dropout", "0.1", "--pruning-method", "magnitude", "--schedule", "linear", "--schedule-start", "4",
         "--schedule-end", "24", "--schedule-frequency", "4", "--checkpoint-interval", "30", "--data-workers", "2",
         "--lr-warmup-iters", "3"]


def _start(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt2.train", *FLAGS, "--output-dir", str(tmp_path),
                             "--run-name", name, "--data-dir", str(REPO_ROOT / "data"), *extra],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.kconfig", "resume", str(run_dir), *extra], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip().endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    whole = _start(root, "whole")
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    cut = _start(root, "cut")
    deadline = time.time() + 120
    while _last_step(root / "cut") < 10 and time.time() < deadline:
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)
    out, err = cut.communicate(timeout=120)
    return root, cut.returncode, err


def test_sigterm_writes_a_checkpoint_and_an_interrupted_summary(runs):
    root, code, err = runs
    assert code == 130, err
    summary = json.loads((root / "cut" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "make resume RESUME=" in summary["error"]
    meta = json.loads((root / "cut" / "checkpoint.json").read_text())
    assert 10 <= meta["step"] < 30 and summary["iterations"] == meta["step"]


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs):
    root, _, _ = runs
    result = _resume(root / "cut")
    assert result.returncode == 0, result.stderr
    assert json.loads((root / "cut" / "summary.json").read_text())["status"] == "complete"
    a = torch.load(root / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(root / "cut" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 30
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(pa[k], pb[k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["pruner"]["bits"], b["pruner"]["bits"]))
    steps = [r["step"] for r in map(json.loads, (root / "cut" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 31))  # each step logged once, across the interruption


def test_corrupt_or_foreign_checkpoints_are_refused(runs, tmp_path):
    root, _, _ = runs
    assert _resume(root / "whole").returncode == 2  # a complete run has nothing to resume
    victim = tmp_path / "victim"  # the checkpoint of a run that did not finish
    victim.mkdir()
    for name in ("config", "checkpoint.json", "checkpoint.pt"):
        (victim / name).write_bytes((root / "whole" / name).read_bytes())
    # other settings than the run's own
    result = subprocess.run([sys.executable, "-m", "gpt2.train", *FLAGS, "--lr", "0.5", "--resume-from",
                             str(victim), "--data-dir", str(REPO_ROOT / "data")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "other settings (lr: 0.001 then, 0.5 now)" in result.stderr
    # a corrupt file
    data = bytearray((victim / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (victim / "checkpoint.pt").write_bytes(bytes(data))
    result = _resume(victim)
    assert result.returncode == 2 and "is corrupt" in result.stderr
