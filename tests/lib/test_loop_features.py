"""Training-loop features: gradient accumulation, prefetching, precision, torch.compile."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lenet5.train import main as lenet5_main
from lib.batches import Prefetcher
from lib.pruning.pruner import target_count
from lib.results import read_metrics
from lib.cli import build_parser
from lib.settings import settings_from_namespace
from lib.train_loop import Task, run

QUICK = ["--max-iters", "8", "--batch-size", "32", "--eval-interval", "8", "--log-interval", "1",
         "--lr-warmup-iters", "1", "--optimizer", "adamwprune", "--pruning-method", "state",
         "--schedule", "linear", "--schedule-start", "2", "--schedule-end", "6", "--schedule-frequency", "2"]


def _run_lenet5(tmp_path: Path, capsys, *flags: str) -> Path:
    assert lenet5_main([*QUICK, "--output-dir", str(tmp_path), *flags]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_prefetcher_keeps_order_and_raises_where_the_producer_failed():
    counter = iter(range(5))

    def make():
        value = next(counter)
        if value == 3:
            raise ValueError("bad batch 3")
        return (value,)

    pre = Prefetcher(make, depth=2)
    assert [pre()[0] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad batch 3"):
        pre()
    pre.close()


def test_prefetching_does_not_change_the_run(tmp_path, capsys):
    plain = _run_lenet5(tmp_path / "a", capsys)
    prefetched = _run_lenet5(tmp_path / "b", capsys, "--data-workers", "3")
    assert _losses(plain) == _losses(prefetched) and len(_losses(plain)) == 8


def _linear_task(batches: list[tuple[torch.Tensor, torch.Tensor]], calls: list[int]):
    def build(s, device):
        model = nn.Linear(4, 1, bias=False)
        nn.init.constant_(model.weight, 0.5)
        source = iter(batches)

        def next_batch():
            calls.append(1)
            return next(source)

        return Task(name="linear", model=model, prunable=[("weight", model.weight)], group_of=lambda n: "all",
                    next_batch=next_batch, loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
                    evaluate=lambda m: {"val_loss": 0.0, "val_accuracy": 1.0}, items_per_step=len(batches[0][0]),
                    item_unit="samples", quality_key="val_accuracy")
    return build


def test_accumulated_micro_batches_give_the_full_batch_step(tmp_path):
    parser = build_parser("lenet5", prog="x", description="")
    base = settings_from_namespace(parser.parse_args(
        ["--optimizer", "sgd", "--sgd-momentum", "0", "--lr", "0.1", "--max-iters", "1", "--lr-warmup-iters", "0",
         "--grad-clip", "0", "--eval-interval", "1", "--output-dir", str(tmp_path)]))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    weights = []
    for accum, batches in ((1, [(x, y)]), (2, [(x[:4], y[:4]), (x[4:], y[4:])])):
        calls: list[int] = []
        s = dataclasses.replace(base, grad_accum_steps=accum)
        holder = {}

        def build(settings, device, _b=batches, _c=calls):
            task = _linear_task(_b, _c)(settings, device)
            holder["model"] = task.model
            return task

        assert run(s, build, command=["test"]) == 0
        assert len(calls) == accum
        weights.append(holder["model"].weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])


def test_bf16_autocast_on_cpu_trains_and_prunes_exactly(tmp_path, capsys):
    run_dir = _run_lenet5(tmp_path, capsys, "--precision", "bf16")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["final_pruned_count"] == target_count(0.5, summary["prunable_params"])
    assert all(loss == loss for loss in _losses(run_dir))  # no NaN


def test_torch_compile_keeps_masks_exact(tmp_path, capsys):
    run_dir = _run_lenet5(tmp_path, capsys, "--compile")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["settings"]["compile"] is True
    assert summary["final_pruned_count"] == target_count(0.5, summary["prunable_params"])
    assert summary["mask_pruned_count"] == summary["final_pruned_count"]
