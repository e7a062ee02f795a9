"""Every trainer learns: a short run, pruning as configured, ends far better than it started."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import tarfile
from pathlib import Path

import numpy as np
import pytest

import lib.data.cifar as cifar

from gpt2.train import main as gpt2_main
from lenet5.train import main as lenet5_main
from lib.pruning.pruner import target_count
from lib.results import read_metrics
from resnet.train import main as resnet_main
from tests.lib.data.test_cifar import add_pickle, dir_info

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # real runs of tens of steps

PRUNE = ["--optimizer", "adamwprune", "--pruning-method", "state", "--state-variant", "bitter7",
         "--target-sparsity", "0.5", "--schedule", "cubic-ramp", "--threads", "2"]


def _train(main, capsys, tmp_path: Path, *flags: str) -> tuple[dict, list[dict]]:
    assert main([*PRUNE, "--output-dir", str(tmp_path), *flags]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["final_pruned_count"] == target_count(0.5, summary["prunable_params"])
    return summary, read_metrics(run_dir / "metrics.jsonl")


def test_lenet5_is_far_above_chance_after_60_steps(tmp_path, capsys):
    summary, rows = _train(lenet5_main, capsys, tmp_path, "--max-iters", "60", "--batch-size", "64",
                           "--lr", "3e-3", "--eval-interval", "60", "--schedule-start", "10", "--schedule-end", "50",
                           "--schedule-frequency", "10", "--lr-warmup-iters", "10")
    start = next(r for r in rows if r["step"] == 0 and "val_accuracy" in r)
    assert start["val_accuracy"] < 0.3  # ten classes: an untrained net is near 0.1
    assert summary["val_accuracy"] > 0.8


def test_gpt2_tiny_validation_loss_drops_clearly(tmp_path, capsys):
    summary, rows = _train(gpt2_main, capsys, tmp_path, "--max-iters", "30", "--lr", "3e-3", "--eval-interval", "30",
                           "--eval-iters", "4", "--schedule-start", "5", "--schedule-end", "25",
                           "--schedule-frequency", "5", "--lr-warmup-iters", "5")
    start = next(r for r in rows if r["step"] == 0 and "val_loss" in r)["val_loss"]
    assert start > 0.9 * math.log(50257)  # untrained: about uniform over the GPT-2 vocabulary
    assert summary["val_loss"] < start - 3.0


def _class_coloured_cifar10(root: Path) -> Path:
    """A CIFAR-10 archive in the official layout whose classes can be learnt: each has its own colour."""
    rng = np.random.default_rng(0)
    palette = np.array([[25 * c, 255 - 25 * c, (80 * c) % 256] for c in range(10)], dtype=np.int64)

    def images(labels: list[int]) -> np.ndarray:
        pixels = palette[labels][:, :, None] + rng.integers(-10, 11, size=(len(labels), 3, 1024))
        return np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), 3072)

    archive = cifar.archive_path(root, "cifar10")
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(dir_info("cifar-10-batches-py"))
        for name, n in [(f"data_batch_{b}", 20) for b in range(1, 6)] + [("test_batch", 50)]:
            labels = [int(c) for c in rng.integers(0, 10, size=n)]
            add_pickle(tar, f"cifar-10-batches-py/{name}", {b"labels": labels, b"data": images(labels)})
    return archive


def test_resnet_learns_classes_it_can_tell_apart(tmp_path, capsys, monkeypatch):
    archive = _class_coloured_cifar10(tmp_path / "data")
    monkeypatch.setitem(cifar.CIFAR_MD5, "cifar10", hashlib.md5(archive.read_bytes()).hexdigest())
    summary, rows = _train(resnet_main, capsys, tmp_path, "--max-iters", "30", "--batch-size", "16",
                           "--resnet-width", "8", "--eval-interval", "30", "--log-interval", "1",
                           "--schedule-start", "5", "--schedule-end", "20", "--schedule-frequency", "5",
                           "--lr", "5e-3", "--lr-warmup-iters", "3", "--data-dir", str(tmp_path / "data"))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    first = sum(losses[:5]) / 5
    assert first > 0.8 * math.log(10)  # ten classes, untrained
    assert statistics.median(losses[-10:]) < 0.5 * first  # the median: one batch's loss is noisy
    assert summary["val_accuracy"] > 0.6  # held-out images of the same colours
