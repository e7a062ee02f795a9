"""Training-loop features: gradient accumulation, prefetching, precision, torch.compile."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

from lib.batches import Prefetcher
from lib.classification import cross_entropy, evaluate
from lib.pruning.pruner import target_count
from lib.results import read_metrics
from lib.cli import build_parser
from lib.settings import settings_from_namespace
from lib.train_loop import Task, run

QUICK = ["--max-iters", "8", "--batch-size", "32", "--eval-interval", "8", "--log-interval", "1",
         "--lr-warmup-iters", "1", "--optimizer", "adamwprune", "--pruning-method", "state",
         "--schedule", "linear", "--schedule-start", "2", "--schedule-end", "6", "--schedule-frequency", "2"]


def _small_conv_task(s, device) -> Task:
    """A convolution and a linear layer on seeded random 8x8 images: the loop's features, in milliseconds."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = torch.Generator().manual_seed(s.seed)
    held_out = torch.Generator().manual_seed(s.seed + 1)
    val_x, val_y = torch.randn(64, 1, 8, 8, generator=held_out), torch.randint(0, 3, (64,), generator=held_out)

    def next_batch():
        return torch.randn(s.batch_size, 1, 8, 8, generator=data), torch.randint(0, 3, (s.batch_size,), generator=data)

    return Task(name="small-conv", model=model, prunable=[(n, p) for n, p in model.named_parameters() if p.dim() > 1],
                group_of=lambda n: n.split(".")[0], next_batch=next_batch, loss=cross_entropy,
                evaluate=lambda m: evaluate(m, val_x, val_y, 32, device), items_per_step=s.batch_size,
                item_unit="samples", quality_key="val_accuracy")


def _run_small(tmp_path: Path, capsys, *flags: str, wrap: Callable[[Task], None] = lambda task: None) -> Path:
    """A short run of the small task through the shared loop; `wrap` may instrument the task before it runs."""
    parser = build_parser("lenet5", prog="x", description="")
    settings = settings_from_namespace(parser.parse_args([*QUICK, "--output-dir", str(tmp_path), *flags]))

    def build(s, device):
        task = _small_conv_task(s, device)
        wrap(task)
        return task

    assert run(settings, build, command=["test"]) == 0
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


def _record_threads(threads: list[threading.Thread]) -> Callable[[Task], None]:
    def wrap(task: Task) -> None:
        make = task.next_batch

        def next_batch():
            threads.append(threading.current_thread())
            return make()
        task.next_batch = next_batch
    return wrap


def test_prefetching_makes_batches_in_the_background_and_does_not_change_the_run(tmp_path, capsys):
    plain_threads: list[threading.Thread] = []
    prefetch_threads: list[threading.Thread] = []
    plain = _run_small(tmp_path / "a", capsys, wrap=_record_threads(plain_threads))
    prefetched = _run_small(tmp_path / "b", capsys, "--data-workers", "3", wrap=_record_threads(prefetch_threads))
    assert set(plain_threads) == {threading.main_thread()}
    # Every batch came from one thread that is not the loop's: the background producer.
    assert len(prefetch_threads) >= 8 and len(set(prefetch_threads)) == 1
    assert prefetch_threads[0] is not threading.main_thread()
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


def _record_output_dtypes(dtypes: set[torch.dtype]) -> Callable[[Task], None]:
    """Record the dtype every convolution and linear layer computes in, in training and evaluation."""
    def wrap(task: Task) -> None:
        for module in task.model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
    return wrap


@pytest.mark.parametrize("precision, computed", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                                 ("auto", torch.float32)])  # auto: bf16 on CUDA only
def test_bf16_autocast_computes_in_bf16_and_prunes_exactly(tmp_path, capsys, precision, computed):
    dtypes: set[torch.dtype] = set()
    run_dir = _run_small(tmp_path, capsys, "--precision", precision, wrap=_record_output_dtypes(dtypes))
    assert dtypes == {computed}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["final_pruned_count"] == target_count(0.5, summary["prunable_params"])
    assert summary["memory"]["weights"] == 4 * summary["params"]  # the weights themselves stay float32
    assert all(math.isfinite(loss) for loss in _losses(run_dir))


def _record_models(models: list[nn.Module]) -> Callable[[Task], None]:
    def wrap(task: Task) -> None:
        loss = task.loss

        def recording_loss(model, batch):
            models.append(model)
            return loss(model, batch)
        task.loss = recording_loss
    return wrap


@pytest.mark.slow  # compiling takes tens of seconds on a CPU
def test_torch_compile_trains_the_compiled_model_and_keeps_masks_exact(tmp_path, capsys):
    models: list[nn.Module] = []
    torch._dynamo.reset()
    counters.clear()
    run_dir = _run_small(tmp_path, capsys, "--compile", wrap=_record_models(models))
    # The loss saw the compiled wrapper of the task's model at every step, and dynamo compiled a frame.
    assert len(models) == 8 and all(isinstance(m, OptimizedModule) for m in models)
    assert counters["stats"]["unique_graphs"] >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["settings"]["compile"] is True
    assert summary["final_pruned_count"] == target_count(0.5, summary["prunable_params"])
    assert summary["mask_pruned_count"] == summary["final_pruned_count"]


def test_without_compile_the_loss_gets_the_plain_model(tmp_path, capsys):
    models: list[nn.Module] = []
    _run_small(tmp_path, capsys, wrap=_record_models(models))
    assert len(models) == 8 and not any(isinstance(m, OptimizedModule) for m in models)


@pytest.mark.parametrize("budget, iterations", [("--variant-budget", 17), ("--no-variant-budget", 10)])
def test_variant_budget_multiplies_the_iterations_run(tmp_path, capsys, budget, iterations):
    # bitter7 was published with 1.7x the iterations: MAX_ITERS=10 runs round(17.0) steps with the budget.
    run_dir = _run_small(tmp_path, capsys, "--max-iters", "10", "--eval-interval", "100", "--state-variant",
                          "bitter7", budget)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == summary["iterations_planned"] == iterations
    assert summary["budget_multiplier"] == (1.7 if iterations == 17 else 1.0)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, iterations + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, iterations]
    # The learning rate decays over the iterations actually run: it ends at MIN_LR on the last one.
    assert train[-1]["lr"] == pytest.approx(summary["settings"]["min_lr"], rel=1e-12)
