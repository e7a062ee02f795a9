"""Prune-only runs (MAX_ITERS=0) and the settings the calibrated one-shot methods need.

A prune-only run goes through the one training loop with no training step:
its only mask update happens at step 0, before the first evaluation, so its
results (metrics, summary, final model) are written exactly as any run's.
Only a method whose scores need no training can do that (PRUNE_ONLY_METHODS):
movement, spt and the state variants score from gradients or Adam's moments,
which a run without steps never has.
"""

from __future__ import annotations

from typing import Callable

from lib import distributed
from lib.pruning.methods import CALIBRATED_METHODS
from lib.pruning.registry import PRUNE_ONLY_METHODS


def oneshot_problems(s) -> list[tuple[str, str]]:
    """What is wrong with a prune-only run or a calibrated method's settings: (symbol, problem) pairs."""
    problems: list[tuple[str, str]] = []
    method = s.pruning_method or "none"
    if s.max_iters == 0:
        wrong = []
        if method not in PRUNE_ONLY_METHODS:
            why = ("prunes nothing" if method == "none" else
                   "scores from training (gradients or optimizer state), which a run without steps never has")
            wrong.append(f"PRUNING_METHOD={method} {why}")
        if method != "none" and (s.schedule != "one-shot" or s.schedule_start != 0):
            wrong.append(f"SCHEDULE={s.schedule}" + (f" with SCHEDULE_START={s.schedule_start}"
                                                      if s.schedule == "one-shot" else ""))
        if wrong:
            problems.append(("MAX_ITERS", "0 is a prune-only run (calibrate, prune once at step 0, evaluate), "
                             f"which needs PRUNING_METHOD={', '.join(sorted(PRUNE_ONLY_METHODS))}, SCHEDULE=one-shot "
                             f"and SCHEDULE_START=0; here {'; '.join(wrong)}: set those, or MAX_ITERS >= 1"))
    if method in CALIBRATED_METHODS and s.prune_embeddings:
        problems.append(("PRUNE_EMBEDDINGS", f"{method} reads the inputs of the nn.Linear layer that owns each "
                         "pruned weight, and the embeddings have none (the token embedding is also the output "
                         f"layer, tied); set PRUNE_EMBEDDINGS=n, or choose another PRUNING_METHOD"))
    if (method == "sparsegpt" and s.sparsity_structure == "nm" and s.nm_m and s.sparsegpt_block_size
            and s.sparsegpt_block_size % s.nm_m):
        problems.append(("SPARSEGPT_BLOCK_SIZE", f"{s.sparsegpt_block_size} is no multiple of NM_M ({s.nm_m}): a "
                         f"block must hold whole groups of {s.nm_m}; set it to e.g. "
                         f"{max(s.nm_m, s.sparsegpt_block_size // s.nm_m * s.nm_m)}"))
    return problems


def prune_only_update(pruner, iterations: int, log: Callable[[dict], None]) -> tuple[float, float]:
    """Before the first evaluation: a prune-only run's one mask update (logged as a metrics row).

    Returns the (target, achieved) sparsity the evaluation at step 0 records: both 0 for a run that trains.
    """
    if pruner is None or iterations:
        return 0.0, 0.0
    update = pruner.update(0)
    distributed.check_masks_agree(pruner.masks.bits, 0)
    log({"step": 0, "target_sparsity": update.target_sparsity, "achieved_sparsity": update.achieved_sparsity,
         "mask_update": True, **update.metrics()})
    return update.target_sparsity, update.achieved_sparsity
