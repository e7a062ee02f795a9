"""The one training loop every trainer uses.

A trainer describes its model and data as a `Task`; `run()` does the rest:
seeding, device, optimizer, pruning, learning-rate schedule, evaluation,
progress display, metrics, divergence and interruption handling, and the
results directory. Checkpoints live in lib/checkpoint.py, summary.json in
lib/summary.py, signal handling in lib/stop.py, the final model in lib/export.py.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lib import checkpoint, distributed, export, optim
from lib.batches import Prefetcher
from lib.checkpoint import Progress
from lib.device import autocast_for, prepare_process, synchronize, with_precision
from lib.errors import KpruneError
from lib.grad_clip import clipped_step
from lib.lr import lr_at
from lib.pruning.build import budget_multiplier, build_pruner
from lib.pruning.methods import Observation
from lib.pruning.oneshot import prune_only_update
from lib.pruning.pruner import Pruner
from lib.results import MetricsLog, write_json_atomic
from lib.run_dir import open_run_dir, resume_hint
from lib.pruning.units import Units
from lib.settings import Settings
from lib.stop import Diverged, Interrupted, StopRequest
from lib.summary import base_summary, count_params, final_summary, missed_target
from lib.tracking import Trackers, start_trackers


@dataclass
class Task:
    """What a trainer supplies: its model, data and evaluation."""

    name: str                                        # e.g. "gpt2-tiny", used in the run directory name
    model: nn.Module
    prunable: list[tuple[str, nn.Parameter]]         # the pool pruning draws from (tied weights once)
    group_of: Callable[[str], str]                   # parameter name -> layer group for sparsity reports
    next_batch: Callable[[], tuple]                  # the next training batch, on the device
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    evaluate: Callable[[nn.Module], dict]            # {"val_loss": ..., and "val_ppl" or "val_accuracy"}
    items_per_step: int                              # tokens or samples per micro-batch
    item_unit: str                                   # "tokens" or "samples"
    quality_key: str                                 # "val_ppl" or "val_accuracy"
    extra_summary: dict = field(default_factory=dict)
    # The data position, for checkpoints: where next_batch would continue from.
    data_state: Callable[[], dict] = dict
    load_data_state: Callable[[dict], None] = lambda state: None
    # The model's channel units (neurons, heads, filters) for SPARSITY_STRUCTURE=channel; None: it has none.
    units: Units | None = None
    # n training batches for calibration (wanda, sparsegpt): their own generator seeded from SEED, never the stream's.
    calibration_batches: Callable[[int], list[tuple]] | None = None


@dataclass
class Loop:
    """What the step loop works with: built once by run(), shared by every step."""

    settings: Settings
    task: Task
    optimizer: torch.optim.Optimizer
    pruner: Pruner | None
    iterations: int
    progress: Progress
    stop: StopRequest
    run_dir: Path | None                             # None on ranks other than 0: they write nothing
    metrics: MetricsLog | None = None
    trackers: Trackers | None = None                 # experiment trackers fed by `metrics`, finished last

    def save(self) -> None:
        """Checkpoint now; a signal never cuts the write short."""
        with self.stop.saving():
            checkpoint.save_run(self.run_dir, self.settings, self.task, self.optimizer, self.pruner, self.progress)

    def log(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(row)


def run(settings: Settings, build_task: Callable[[Settings, torch.device], Task], command: list[str]) -> int:
    """Train as `settings` says; returns the process exit status."""
    device = prepare_process(settings)
    task = build_task(settings, device)
    task.model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    optimizer = optim.build_optimizer(task.model, settings)
    pruner, adaptive = None, None
    if settings.pruning_method != "none":
        pruner, adaptive = build_pruner(settings, task.prunable, optimizer, count_params(task.model),
                                        units=task.units, task=task)
    multiplier = budget_multiplier(settings)
    iterations = int(round(settings.max_iters * multiplier))
    progress = Progress(items_per_step=task.items_per_step * settings.grad_accum_steps)

    main = distributed.world()[0] == 0  # only rank 0 writes results, and holds the run directory's lock
    run_dir, lock = open_run_dir(settings, task, command, main)
    try:
        trackers = start_trackers(settings, run_dir) if main else None  # W&B / trackio / TensorBoard, if chosen
        if settings.resume_from:
            checkpoint.resume_run(run_dir, settings, task, optimizer, pruner, progress, rewrite_metrics=main)
            print(f"resuming {run_dir} after step {progress.step}", file=sys.stderr, flush=True)
        summary = base_summary(settings, task, optimizer, pruner, device)
        summary.update({"budget_multiplier": multiplier, "iterations_planned": iterations, "adaptive": adaptive})
        if main:
            write_json_atomic(run_dir / "summary.json", {**summary, "status": "running"})
        metrics = MetricsLog(run_dir / "metrics.jsonl", [trackers.log_row] if trackers else []) if main else None
        loop = Loop(settings, task, optimizer, pruner, iterations, progress, StopRequest(), run_dir if main else None,
                    metrics, trackers)
        return _run_loop(loop, summary)
    finally:
        if lock is not None:
            lock.release()
        distributed.finish()


def _run_loop(loop: Loop, summary: dict) -> int:
    """Train, then record how the run ended in summary.json; returns the exit status."""
    st, stop = loop.progress, loop.stop
    status, exit_code, prefix = "complete", 0, "run"
    try:
        _train(loop)
        if loop.settings.checkpoint_interval:
            loop.save()
        missed = missed_target(loop.pruner)
        if missed:
            status, exit_code = "failed", 1
            summary["error"] = missed
    except Interrupted as exc:
        stop.finishing()  # from here on a signal never cuts the checkpoint or the summary short
        status, exit_code = "interrupted", 130
        note = ""
        try:
            loop.save()
        except KpruneError as error:  # e.g. a full disk: the previous checkpoint is intact
            note = f"; the checkpoint could not be written ({error})"
        summary["error"] = f"stopped by {exc} after step {st.step}{note}; {resume_hint(loop.run_dir)}"
    except KeyboardInterrupt:
        stop.finishing()
        status, exit_code = "interrupted", 130
        summary["error"] = f"stopped mid-step by a second signal after step {st.step}; {resume_hint(loop.run_dir)}"
    except Diverged as exc:
        status, exit_code = "diverged", 3
        summary["error"] = str(exc)
        summary["diverged_at_step"] = exc.step
    except KpruneError as exc:  # bad data met mid-run, a full disk: one line, not a traceback
        status, exit_code, prefix = "failed", 2, "error: run"
        summary["error"] = f"{exc}; {resume_hint(loop.run_dir)}"
    except Exception as exc:
        status, exit_code = "failed", 1
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        stop.finishing()
        try:
            if loop.metrics is not None:
                loop.metrics.close()
            summary.update(final_summary(loop.task, loop.optimizer, loop.pruner, st))
            summary["status"], summary["compile_step_s"] = status, st.compile_step_s or None
            summary["world_size"] = distributed.world()[1]
            summary.update(export.write_final_model(loop.run_dir, loop.task, loop.pruner, status, st.step))
            if loop.run_dir is not None:
                write_json_atomic(loop.run_dir / "summary.json", summary)
                if loop.trackers is not None:
                    loop.trackers.finish(summary)
                if status != "complete":
                    print(f"{prefix} {status}: {summary.get('error', '')}", file=sys.stderr)
                print(f"results: {loop.run_dir}", flush=True)
        finally:
            stop.restore()
    return exit_code


def _train(loop: Loop) -> None:
    # DDP and the compiled module share the parameters: optimizer and masks act on them directly.
    s, task, st = loop.settings, loop.task, loop.progress
    device = next(task.model.parameters()).device
    ddp = distributed.wrap(task.model, device)  # kept: its no_sync() serves the compiled wrapper too
    model = ddp or task.model
    model = torch.compile(model) if s.compile else model
    precision = autocast_for(s, device)
    prefetcher = Prefetcher(task.next_batch, s.data_workers, snapshot=task.data_state) if s.data_workers else None

    def next_batch():
        if prefetcher is None:
            return task.next_batch()
        batch = prefetcher()
        st.data_state = prefetcher.last_snapshot  # the position after this batch, for a checkpoint
        return batch
    try:
        _steps(loop, model, ddp, precision, next_batch)
    finally:
        if prefetcher is not None:
            prefetcher.close()


def _steps(loop: Loop, model: nn.Module, ddp: DistributedDataParallel | None, precision, next_batch) -> None:
    s, task, optimizer, pruner, st = loop.settings, loop.task, loop.optimizer, loop.pruner, loop.progress
    iterations = loop.iterations
    params = [p for g in optimizer.param_groups for p in g["params"]]
    accum = s.grad_accum_steps
    device = params[0].device
    interactive = sys.stderr.isatty() and distributed.world()[0] == 0
    bar = tqdm(total=iterations, disable=not interactive, dynamic_ncols=True, leave=True, unit="step")
    talk = distributed.world()[0] == 0  # one rank reports
    print_eval = bar.write if interactive else (lambda m: talk and print(m, file=sys.stderr, flush=True))
    window_time, window_steps, window_loss, timed = 0.0, 0, 0.0, 0
    if st.step == 0:  # where training starts from (a prune-only run, MAX_ITERS=0: after its one mask update)
        _evaluate(loop, model, precision, 0, *prune_only_update(pruner, iterations, loop.log), print_eval)
    bar.update(st.step)
    first = st.step + 1
    for step in range(first, iterations + 1):
        synchronize(device)  # the clock bills each step its own kernels
        t0 = time.perf_counter()
        lr = lr_at(step, s.lr, s.min_lr, s.lr_warmup_iters, iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)  # stays on the device
        for micro in range(accum):  # gradients of `accum` micro-batches add up to one step
            batch = next_batch()
            # Under DDP, gradients are averaged across ranks once, on the last micro-batch.
            with distributed.accumulating(ddp, micro, accum), precision():
                loss = task.loss(model, batch)
                (loss / accum).backward()
            step_loss += loss.detach().double() / accum
        # One reduction (loss and stop flag) and one wait per step; every rank decides alike.
        loss_value, stop_anywhere = distributed.step_stats(step_loss, loop.stop.requested)
        if not math.isfinite(loss_value):
            raise Diverged(step, loss_value, s.grad_clip)
        if pruner is not None:
            pruner.observe(Observation(step, model, batch, with_precision(precision, task.loss), loss.detach()))
            pruner.after_backward()
        clipped_step(optimizer, params, s.grad_clip)  # kprune's Adam/AdamW: masked and clipped in the step
        update = pruner.after_step(step) if pruner is not None else None
        if update is not None:
            distributed.check_masks_agree(pruner.masks.bits, step)
        synchronize(device)
        dt = time.perf_counter() - t0
        st.step, st.train_time_s, st.last_loss = step, st.train_time_s + dt, loss_value
        window_steps, window_loss = window_steps + 1, window_loss + loss_value
        if s.compile and step == first:  # compiling, not training: kept out of the throughput
            st.compile_step_s, st.compile_steps = st.compile_step_s + dt, st.compile_steps + 1
        else:  # the step's own time (synchronized above: no kernels of another step in it)
            window_time, timed = window_time + dt, timed + 1
        sparsity = pruner.achieved_sparsity if pruner is not None else 0.0
        target = pruner.schedule.target(step) if pruner is not None else 0.0
        throughput = timed * task.items_per_step * accum / window_time if timed else 0.0
        bar.update(1)
        bar.set_postfix_str(f"loss {loss_value:.3f} sparsity {sparsity:.3f} {throughput:,.0f} {task.item_unit}/s",
                            refresh=False)
        if step % s.log_interval == 0 or step == iterations or update is not None:
            row = {"step": step, "loss": window_loss / window_steps, "lr": lr,
                   "target_sparsity": target, "achieved_sparsity": sparsity}
            if timed:  # a window of only the compiling step has no training speed to report
                row.update({"step_time_s": window_time / timed, f"{task.item_unit}_per_s": throughput})
            if update is not None:
                row["mask_update"] = True
                row.update(update.metrics())
            loop.log(row)
            if not interactive and talk:
                print(f"step {step}/{iterations} loss {row['loss']:.4f} lr {lr:.2e} "
                      f"sparsity {sparsity:.4f} {throughput:,.0f} {task.item_unit}/s", file=sys.stderr, flush=True)
            window_time, window_steps, window_loss, timed = 0.0, 0, 0.0, 0
        if step % s.eval_interval == 0 or step == iterations:
            _evaluate(loop, model, precision, step, target, sparsity, print_eval)
        if s.checkpoint_interval and step % s.checkpoint_interval == 0 and step < iterations:
            loop.save()
        loop.stop.check(stop_anywhere if distributed.world()[1] > 1 else None)
    bar.close()


def _evaluate(loop: Loop, model: nn.Module, precision, step: int, target: float, sparsity: float,
              write: Callable[[str], None]) -> None:
    model.eval()
    with torch.no_grad(), precision():
        result = loop.task.evaluate(model)
    loop.progress.last_eval = result
    loop.log({"step": step, "target_sparsity": target, "achieved_sparsity": sparsity, **result})
    write(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
