"""summary.json of a run: what it was (written at the start) and what it reached (at the end).

The keys are the results contract (SPEC §6); final sparsity is counted from
the weights themselves, not taken from the masks' own bookkeeping.
"""

from __future__ import annotations

import torch
from torch import nn

from lib import optim
from lib.memory import memory_by_kind
from lib.pruning.pruner import Pruner
from lib.settings import Settings


def count_params(model: nn.Module) -> int:
    """Parameters of `model`, a tied one counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def base_summary(s: Settings, task, optimizer, pruner: Pruner | None, device: torch.device) -> dict:
    """What the run is: model, optimizer as built, method, schedule, settings."""
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
        "params": count_params(task.model),
        "seed": s.seed,
        "device": str(device),
        "torch": torch.__version__,
        "items_per_step": task.items_per_step * s.grad_accum_steps,
        "threads": torch.get_num_threads(),
        "settings": s.as_dict(),
        **task.extra_summary,
    }


@torch.no_grad()
def final_summary(task, optimizer, pruner: Pruner | None, progress) -> dict:
    """What the run reached: steps, time, throughput, quality, sparsity from the weights, memory."""
    # Steps that compiled (the first of each process under COMPILE) measure the compiler, not training.
    timed_steps = progress.step - progress.compile_steps
    timed_s = progress.train_time_s - progress.compile_step_s
    out: dict = {"iterations": progress.step, "wall_time_s": progress.train_time_s,
                 "final_train_loss": progress.last_loss,
                 "throughput": progress.items_per_step * timed_steps / timed_s if timed_steps and timed_s > 0 else None,
                 "throughput_unit": f"{task.item_unit}/s"}
    out.update(progress.last_eval)
    out["quality_metric"] = task.quality_key
    # Sparsity counted from the weights themselves, per layer group and over the pool.
    groups: dict[str, list[int]] = {}
    for name, p in {id(p): (n, p) for n, p in task.prunable}.values():
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


def missed_target(pruner: Pruner | None) -> str | None:
    """Why a finished run did not reach its schedule's final sparsity, or None when it did.

    A run that ends short of its target must not be recorded `complete`: every
    comparison downstream assumes the arms reached the sparsity they claim.
    """
    if pruner is None:
        return None
    want = pruner.target_groups(pruner.schedule.final)  # in the structure's groups: weights, tiles or units
    have = pruner.structure.pruned_groups()
    if have == want:
        return None
    return (f"the run ended with {have} {pruner.structure.group}s pruned, but its schedule's final target is "
            f"{want} (sparsity {pruner.schedule.final:g}); no mask update reached it: check the schedule "
            "(make schedule) so that its last update falls inside the run")
