"""From Settings to a Pruner: the method, the schedule and the adaptive choices."""

from __future__ import annotations

import sys

import torch
from torch import nn

from lib.errors import KpruneError
from lib.pruning.adaptive import adaptive_choice
from lib.pruning.calibration import Calibration
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import CURVES, schedule_from_settings
from lib.pruning.registry import BUDGET_MULTIPLIERS, FIXED_SCOPE, STRUCTURES, scope_in_use
from lib.pruning.channel import Channel
from lib.pruning.structure import NM, Block, Structure
from lib.pruning.units import Units
from lib.settings import Settings



def build_structure(kind: str | None, *, nm_n: int | None = None, nm_m: int | None = None,
                    block_rows: int | None = None, block_cols: int | None = None,
                    units: Units | None = None) -> Structure:
    """The structure a configuration names."""
    kind = kind or "unstructured"
    if kind == "unstructured":
        return Structure()
    if kind == "nm":
        return NM(nm_n, nm_m)
    if kind == "block":
        return Block(block_rows, block_cols)
    if kind == "channel":
        return Channel(units)
    raise ValueError(f"unknown sparsity structure '{kind}' (one of: {', '.join(STRUCTURES)})")

def budget_multiplier(s: Settings) -> float:
    """Extra iterations the variant was published with, when VARIANT_BUDGET grants them."""
    if s.pruning_method == "state" and s.variant_budget:
        return BUDGET_MULTIPLIERS.get(s.state_variant, 1.0)
    return 1.0


def _progress_curve(schedule):
    """The schedule's progress from its first to its final sparsity, 0 -> 1 over p in [0, 1].

    None for shapes a warp does not apply to (one-shot, steps) or a flat ramp.
    """
    if schedule.kind in ("one-shot", "steps"):
        return None
    if schedule.kind == "milestones":
        value = lambda p: schedule.interpolate(schedule.start + p * (schedule.end - schedule.start))  # noqa: E731
    else:
        value = lambda p: CURVES[schedule.kind](p, schedule.initial, schedule.final)  # noqa: E731
    first, last = value(0.0), value(1.0)
    if last <= first:
        return None
    return lambda p: (value(p) - first) / (last - first)


def structure_from_settings(s: Settings, units: Units | None = None) -> Structure:
    """The sparsity structure `s` names; channel structure needs the model's units."""
    try:
        return build_structure(s.sparsity_structure, nm_n=s.nm_n, nm_m=s.nm_m, block_rows=s.block_rows,
                               block_cols=s.block_cols, units=units)
    except ValueError as exc:
        raise KpruneError(f"SPARSITY_STRUCTURE={s.sparsity_structure}: {exc}") from None


def scope_from_settings(s: Settings) -> str:
    """SPARSITY_SCOPE, or the scope the variant or method means (bitter4: layer-adaptive, wanda: row,
    sparsegpt: layer) when none is set."""
    return scope_in_use(s.sparsity_scope, s.pruning_method, s.variant)


def build_pruner(s: Settings, named_params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                 model_params: int, units: Units | None = None, task=None) -> tuple[Pruner, dict | None]:
    """The pruner `s` describes, and (with ADAPTIVE_PRUNING) what was derived from the model's size.

    `units` are the model's channel units (Task.units), read by the channel structure; `task` (a
    lib.train_loop.Task) gives a method that reads calibration inputs the model and its batches.
    """
    schedule = schedule_from_settings(s)
    spt_epsilon, adaptive = s.spt_epsilon, None
    if s.adaptive_pruning:
        choice = adaptive_choice(model_params, _progress_curve(schedule))
        frequency = None
        if schedule.kind not in ("one-shot", "steps"):  # steps: the frequency is the level length
            frequency = max(1, min(choice.frequency, schedule.end - schedule.start))
        schedule = schedule_from_settings(s, frequency=frequency, warp=choice.warp)
        spt_epsilon = choice.spt_epsilon
        adaptive = {**choice.as_dict(), "frequency_used": schedule.frequency, "warp_used": schedule.warp}
        print(f"adaptive pruning for {model_params:,} parameters: SPT epsilon {choice.spt_epsilon:.4g}, "
              f"update every {schedule.frequency} steps, schedule warp {schedule.warp:.3g}", file=sys.stderr)
    # Every value as configured, zeros included (SPT_ALPHA=0, BETA1=0): the settings' ranges refuse what is invalid.
    method = build_method(s.pruning_method, s.variant, spt_epsilon=spt_epsilon, spt_alpha=s.spt_alpha,
                          seed=s.seed, last_step=schedule.last_update,
                          sparsegpt_block_size=s.sparsegpt_block_size, sparsegpt_dampening=s.sparsegpt_dampening)
    scope = scope_from_settings(s)
    implied = FIXED_SCOPE.get(s.variant)
    if implied is not None and scope != implied:  # the Kconfig check refuses this; a direct caller too
        raise KpruneError(f"SPARSITY_SCOPE={scope} conflicts with {s.variant}, which means {implied} scope")
    try:
        pruner = Pruner(named_params, schedule, method, optimizer, beta1=s.beta1,
                        structure=structure_from_settings(s, units), scope=scope,
                        fuse_masking=True)  # kprune's Adam/AdamW mask (and clip, lib/grad_clip.py) in their step
    except ValueError as exc:
        raise KpruneError(str(exc)) from None
    if method.calibration is not None and task is not None:
        pruner.calibration = Calibration(task.model, pruner.masks.names, pruner.masks.params,
                                         task.calibration_batches, s.calibration_batches, task.loss, method.name)
    return pruner, adaptive
