"""The one training loop every trainer uses.

A trainer describes its model and data as a `Task`; `run()` does the rest:
seeding, device, optimizer, pruning, learning-rate schedule, evaluation,
progress display, metrics, divergence and interruption handling, and the
results directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lib import checkpoint, distributed, optim
from lib.errors import KpruneError
from lib.batches import Prefetcher
from lib.device import keep_freed_memory, pick_device, seed_everything, set_threads
from lib.kconfig import kconfig_from_settings, write_config
from lib.lr import lr_at
from lib.memory import memory_by_kind
from lib.pruning.build import budget_multiplier, build_pruner
from lib.pruning.methods import Observation
from lib.pruning.pruner import Pruner
from lib.pruning.units import Units
from lib.results import MetricsLog, claim_run_dir, create_run_dir, read_metrics, write_json_atomic, write_text_atomic
from lib.settings import Settings


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


class Interrupted(Exception):
    pass


def run(settings: Settings, build_task: Callable[[Settings, torch.device], Task], command: list[str]) -> int:
    """Train as `settings` says; returns the process exit status."""
    ddp_device = None
    if distributed.launched_by_torchrun():
        ddp_device = distributed.init(settings.ddp_backend, settings.ddp_nproc_per_node * settings.ddp_nnodes)
    rank, _ = distributed.world()
    device = ddp_device or pick_device(settings.device)
    if device.type == "cpu":
        keep_freed_memory()
    set_threads(settings.threads)
    seed_everything(settings.seed, device)
    configure_backends(settings, device)
    task = build_task(settings, device)
    task.model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    optimizer = optim.build_optimizer(task.model, settings)
    pruner, adaptive = None, None
    if settings.pruning_method != "none":
        pruner, adaptive = build_pruner(settings, task.prunable, optimizer, _count_params(task.model),
                                        units=task.units)
    multiplier = budget_multiplier(settings)
    iterations = int(round(settings.max_iters * multiplier))
    state = _LoopState(items_per_step=task.items_per_step * settings.grad_accum_steps)

    main = rank == 0  # only rank 0 writes results
    if settings.resume_from:
        run_dir = Path(settings.resume_from)
        _resume(run_dir, settings, task, optimizer, pruner, state, rewrite_metrics=main)
        print(f"resuming {run_dir} after step {state.step}", file=sys.stderr, flush=True)
    elif not main:
        run_dir = None
    else:
        if settings.run_name:
            run_dir = claim_run_dir(Path(settings.output_dir), settings.run_name)
        else:
            run_dir = create_run_dir(Path(settings.output_dir), _run_name(settings, task))
        write_config(kconfig_from_settings(settings), run_dir / "config")
        write_text_atomic(run_dir / "command", " ".join(_quote(a) for a in command) + "\n")

    summary = _base_summary(settings, task, optimizer, pruner, device)
    summary.update({"budget_multiplier": multiplier, "iterations_planned": iterations, "adaptive": adaptive})
    if main:
        write_json_atomic(run_dir / "summary.json", {**summary, "status": "running"})
    metrics = MetricsLog(run_dir / "metrics.jsonl") if main else _NoMetrics()
    stop = _StopRequest()
    status, exit_code = "complete", 0
    save = functools.partial(_save_checkpoint, run_dir, settings, task, optimizer, pruner, state)
    try:
        _train(settings, iterations, task, optimizer, pruner, metrics, state, stop, save)
        if settings.checkpoint_interval:
            save()
    except Interrupted as exc:
        status, exit_code = "interrupted", 130
        summary["error"] = f"stopped by {exc} after step {state.step}; continue with make resume RESUME={run_dir}"
        save()
    except KeyboardInterrupt:
        status, exit_code = "interrupted", 130
        summary["error"] = f"stopped mid-step by a second signal after step {state.step}; no new checkpoint"
    except Diverged as exc:
        status, exit_code = "diverged", 3
        summary["error"] = str(exc)
        summary["diverged_at_step"] = exc.step
    except Exception as exc:
        status, exit_code = "failed", 1
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        stop.restore()
        metrics.close()
        summary.update(_final_summary(task, optimizer, pruner, state))
        summary["status"] = status
        summary["world_size"] = distributed.world()[1]
        if main:
            write_json_atomic(run_dir / "summary.json", summary)
            if status != "complete":
                print(f"run {status}: {summary.get('error', '')}", file=sys.stderr)
            print(f"results: {run_dir}", flush=True)
        distributed.finish()
    return exit_code


class _NoMetrics:
    """What ranks other than 0 log into."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _StopRequest:
    """SIGINT and SIGTERM ask the loop to stop after the step in progress, so the
    checkpoint it then writes is of a whole step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def check(self, device: torch.device) -> None:
        """Raise Interrupted once a signal came, on every rank at the same step."""
        requested = self.signal_name is not None
        if distributed.world()[1] > 1:  # ranks may see the signal at different steps: agree first
            requested = distributed.mean(float(requested), device) > 0
        if requested:
            raise Interrupted(self.signal_name or "a signal to another rank")

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _save_checkpoint(run_dir: Path | None, s: Settings, task: Task, optimizer, pruner: Pruner | None,
                     st: "_LoopState") -> None:
    # Every rank's data position (each reads its own shard); rank 0 writes.
    data = distributed.gather(st.data_state if st.data_state is not None else task.data_state())
    if run_dir is None:
        return
    checkpoint.save(run_dir, {
        "step": st.step, "model_name": task.name, "settings": s.as_dict(),
        "config": (run_dir / "config").read_text(encoding="utf-8"),
        "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
        "pruner": pruner.state_dict() if pruner is not None else None,
        "rng": checkpoint.rng_state(), "data": data,
        "loop": {"train_time_s": st.train_time_s, "last_eval": st.last_eval, "last_loss": st.last_loss},
    })


def _resume(run_dir: Path, s: Settings, task: Task, optimizer, pruner: Pruner | None, st: "_LoopState",
            rewrite_metrics: bool = True) -> None:
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text(encoding="utf-8")).get("status") == "complete":
        raise KpruneError(f"{run_dir} is complete: nothing to resume")
    payload = checkpoint.load(run_dir, task.name, s.as_dict())
    task.model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if pruner is not None:
        pruner.load_state_dict(payload["pruner"])
    rank, size = distributed.world()
    if len(payload["data"]) != size:
        raise KpruneError(f"{run_dir} was checkpointed by {len(payload['data'])} processes, not {size}")
    task.load_data_state(payload["data"][rank])
    checkpoint.set_rng_state(payload["rng"])
    st.step = payload["step"]
    st.train_time_s = payload["loop"]["train_time_s"]
    st.last_eval, st.last_loss = payload["loop"]["last_eval"], payload["loop"]["last_loss"]
    if not rewrite_metrics:
        return
    # Rows logged after the checkpoint are redone: drop them so each step appears once.
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step", 0) <= st.step]
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


class Diverged(Exception):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}; lower LR or enable GRAD_CLIP")
        self.step = step


@dataclass
class _LoopState:
    step: int = 0
    train_time_s: float = 0.0
    last_eval: dict = field(default_factory=dict)
    last_loss: float = float("nan")
    items_per_step: int = 0  # per optimizer step: micro-batch items x accumulation steps
    data_state: dict | None = None  # the data position after the last batch consumed (with prefetching)


def _train(s: Settings, iterations: int, task: Task, optimizer, pruner: Pruner | None, metrics: MetricsLog,
           st: _LoopState, stop: _StopRequest, save: Callable[[], None]) -> None:
    # DDP and the compiled module share the parameters: optimizer and masks act on them directly.
    device = next(task.model.parameters()).device
    model = task.model
    if distributed.world()[1] > 1:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
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
        _steps(s, iterations, task, model, precision, next_batch, optimizer, pruner, metrics, st, stop, save)
    finally:
        if prefetcher is not None:
            prefetcher.close()


def _steps(s: Settings, iterations: int, task: Task, model: nn.Module, precision, next_batch, optimizer,
           pruner: Pruner | None, metrics: MetricsLog, st: _LoopState, stop: _StopRequest,
           save: Callable[[], None]) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    accum = s.grad_accum_steps
    device = params[0].device
    interactive = sys.stderr.isatty() and distributed.world()[0] == 0
    bar = tqdm(total=iterations, disable=not interactive, dynamic_ncols=True, leave=True, unit="step")
    talk = distributed.world()[0] == 0  # one rank reports
    print_eval = bar.write if interactive else (lambda m: talk and print(m, file=sys.stderr, flush=True))
    window_time, window_steps, window_loss = 0.0, 0, 0.0
    if st.step == 0:
        _evaluate(task, model, precision, metrics, st, 0, 0.0, 0.0, print_eval)  # where training starts from
    bar.update(st.step)
    for step in range(st.step + 1, iterations + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, s.lr, s.min_lr, s.lr_warmup_iters, iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for micro in range(accum):  # gradients of `accum` micro-batches add up to one step
            batch = next_batch()
            # Under DDP, gradients are averaged across ranks once, on the last micro-batch.
            sync = micro == accum - 1 or not isinstance(model, DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()), precision():
                loss = task.loss(model, batch)
                (loss / accum).backward()
            micro_loss = loss.item()  # one sync per micro-batch: divergence is caught at once
            loss_value += micro_loss / accum
        loss_value = distributed.mean(loss_value, device)  # every rank decides alike
        if not math.isfinite(loss_value):
            raise Diverged(step, loss_value)
        if pruner is not None:
            pruner.observe(Observation(step, model, batch, _with(precision, task.loss), micro_loss))
            pruner.after_backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        optimizer.step()
        update = pruner.after_step(step) if pruner is not None else None
        if update is not None:
            distributed.check_masks_agree(pruner.masks.bits, step)
        dt = time.perf_counter() - t0
        st.step, st.train_time_s, st.last_loss = step, st.train_time_s + dt, loss_value
        window_time, window_steps, window_loss = window_time + dt, window_steps + 1, window_loss + loss_value

        sparsity = pruner.achieved_sparsity if pruner is not None else 0.0
        target = pruner.schedule.target(step) if pruner is not None else 0.0
        throughput = window_steps * task.items_per_step * accum / window_time
        bar.update(1)
        bar.set_postfix_str(f"loss {loss_value:.3f} sparsity {sparsity:.3f} {throughput:,.0f} {task.item_unit}/s",
                            refresh=False)
        if step % s.log_interval == 0 or step == iterations or update is not None:
            row = {"step": step, "loss": window_loss / window_steps, "lr": lr,
                   "target_sparsity": target, "achieved_sparsity": sparsity,
                   "step_time_s": window_time / window_steps, f"{task.item_unit}_per_s": throughput}
            if update is not None:
                row["mask_update"] = True
                row.update(update.metrics())
            metrics.write(row)
            if not interactive and talk:
                print(f"step {step}/{iterations} loss {row['loss']:.4f} lr {lr:.2e} "
                      f"sparsity {sparsity:.4f} {throughput:,.0f} {task.item_unit}/s", file=sys.stderr, flush=True)
            window_time, window_steps, window_loss = 0.0, 0, 0.0
        if step % s.eval_interval == 0 or step == iterations:
            _evaluate(task, model, precision, metrics, st, step, target, sparsity, print_eval)
        if s.checkpoint_interval and step % s.checkpoint_interval == 0 and step < iterations:
            save()
        stop.check(device)
    bar.close()


def _with(precision, loss_fn):
    def loss(m, batch):
        with precision():
            return loss_fn(m, batch)
    return loss


def _evaluate(task: Task, model: nn.Module, precision, metrics: MetricsLog, st: _LoopState, step: int,
              target: float, sparsity: float, write: Callable[[str], None]) -> None:
    model.eval()
    with torch.no_grad(), precision():
        result = task.evaluate(model)
    st.last_eval = result
    metrics.write({"step": step, "target_sparsity": target, "achieved_sparsity": sparsity, **result})
    write(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))


def configure_backends(s: Settings, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = s.tf32
        torch.backends.cudnn.allow_tf32 = s.tf32


def autocast_for(s: Settings, device: torch.device):
    """A context-manager factory: bf16 autocast where configured, else a no-op."""
    use_bf16 = s.precision == "bf16" or (s.precision == "auto" and device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _run_name(s: Settings, task: Task) -> str:
    method = s.pruning_method if s.pruning_method != "state" else s.state_variant
    return f"{task.name}-{method}-s{s.seed}"


def _quote(arg: str) -> str:
    safe = all(c.isalnum() or c in "-_./=:,+@%" for c in arg)
    return arg if arg and safe else "'" + arg.replace("'", "'\\''") + "'"


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _base_summary(s: Settings, task: Task, optimizer, pruner: Pruner | None, device: torch.device) -> dict:
    n_params = _count_params(task.model)
    return {
        "model": task.name,
        "model_family": s.model,
        "optimizer": optim.describe(optimizer, s),
        "pruning_method": s.pruning_method,
        "variant": s.variant,
        "schedule": None if pruner is None else {
            "kind": pruner.schedule.kind, "start": pruner.schedule.start, "end": pruner.schedule.end,
            "initial": pruner.schedule.initial, "final": pruner.schedule.final,
            "frequency": pruner.schedule.frequency},
        "target_sparsity": s.target_sparsity if pruner is not None else 0.0,
        "prunable_params": pruner.numel if pruner is not None else sum(p.numel() for _, p in task.prunable),
        **(pruner.structure_summary() if pruner is not None else {}),
        "params": n_params,
        "seed": s.seed,
        "device": str(device),
        "torch": torch.__version__,
        "items_per_step": task.items_per_step * s.grad_accum_steps,
        "threads": torch.get_num_threads(),
        "settings": s.as_dict(),
        **task.extra_summary,
    }


@torch.no_grad()
def _final_summary(task: Task, optimizer, pruner: Pruner | None, st: _LoopState) -> dict:
    out: dict = {"iterations": st.step, "wall_time_s": st.train_time_s, "final_train_loss": st.last_loss,
                 "throughput": st.items_per_step * st.step / st.train_time_s if st.train_time_s else 0.0,
                 "throughput_unit": f"{task.item_unit}/s"}
    out.update(st.last_eval)
    out["quality_metric"] = task.quality_key
    # Sparsity counted from the weights themselves, per layer group and over the pool.
    groups: dict[str, list[int]] = {}
    names_params = [(n, p) for n, p in ({id(p): (n, p) for n, p in task.prunable}.values())]
    for name, p in names_params:
        g = groups.setdefault(task.group_of(name), [0, 0])
        g[0] += int((p == 0).sum())
        g[1] += p.numel()
    zeros = sum(z for z, _ in groups.values())
    total = sum(n for _, n in groups.values())
    out["final_sparsity"] = zeros / total if total else 0.0
    out["final_pruned_count"] = zeros
    out["sparsity_by_group"] = {g: z / n for g, (z, n) in groups.items()}
    if pruner is not None:
        out["mask_pruned_count"] = pruner.masks.count()
        out["mask_updates"] = [u.__dict__ for u in pruner.updates]
        out["target_count_exact"] = all(u.pruned_count == u.target_count for u in pruner.updates)
    out["memory"] = memory_by_kind(task.model, optimizer, pruner)
    device = next(task.model.parameters()).device
    if device.type == "cuda":
        out["memory"]["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return out
