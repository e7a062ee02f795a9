"""The pruner: schedule + method + exact selection + masks, the same for every method.

The training loop calls `observe()` after each backward pass (methods that
watch training record what they need), `after_backward()` (zero the gradients
of pruned weights; with `fuse_masking`, kprune's Adam/AdamW does it inside
its step instead, and takes the pruned weights' moments as 0 there too, so
an update then zeroes only the weights it prunes) and `after_step(step)` after each optimizer step (update
the masks when the schedule says so; the scores of an update are written into
the spent gradients, which are set to None, so it needs no score-sized
buffer; `peak_score_bytes` records the score memory it did need; how an
update scores and selects is lib/pruning/update_pass.py). Only the method's
score differs between methods, so at every update every method prunes the
same number of weights. What is pruned together (lib/pruning/structure.py)
and among which groups the lowest are taken (the scope: global, layer,
layer-adaptive, row) are shared settings too.
A method that reads its layers' inputs (wanda, sparsegpt) is calibrated right
before each of its updates (`calibration`, lib/pruning/calibration.py);
SparseGPT then prunes each layer to its count itself, updating the weights it
keeps, and its masks are recorded and applied like every other method's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lib.errors import KpruneError
from lib.pruning.masks import MaskSet, pack_bits
from lib.pruning.methods import FunctionMethod, Method, Observation
from lib.pruning.registry import LAYER_CAP, method_problem
from lib.pruning.schedules import Schedule
from lib.pruning.scores import ScoreContext, ScoreFn
# target_count and layer_adaptive_counts are imported from here by their users
from lib.pruning.scope import Counts, check_scope, layer_adaptive_counts, scope_counts, target_count  # noqa: F401
from lib.pruning.structure import Structure
from lib.pruning.update_pass import UpdatePass


@dataclass
class MaskUpdate:
    """One mask update. Counts are in weights; the *_groups counts are in the structure's groups
    (weights, tiles or units), which is what the schedule's target is exact in."""

    step: int
    target_sparsity: float
    target_count: int
    pruned_count: int
    group: str = "weight"
    target_groups: int | None = None
    pruned_groups: int | None = None
    achieved_sparsity: float | None = None  # in weights

    def metrics(self) -> dict:
        """The fields a metrics row records for this update."""
        return {"pruned_count": self.pruned_count, "target_count": self.target_count, "group": self.group,
                "pruned_groups": self.pruned_groups, "target_groups": self.target_groups}


class Pruner:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], schedule: Schedule, method: Method | ScoreFn,
                 optimizer: torch.optim.Optimizer, beta1: float | None = 0.9, layer_adaptive: bool = False,
                 structure: Structure | None = None, scope: str | None = None, fuse_masking: bool = False):
        self.structure = structure or Structure()
        self.scope = check_scope("layer-adaptive" if layer_adaptive else scope, self.structure)
        pool, self.excluded = self.structure.split(named_params)
        self.masks = MaskSet(pool)
        if self.masks.numel == 0:
            if self.excluded:
                raise KpruneError(f"SPARSITY_STRUCTURE={self.structure.kind} leaves no prunable parameter: "
                                  + "; ".join(f"{e['name']}: {e['reason']}" for e in self.excluded[:4]))
            raise ValueError("no prunable parameters")
        self.structure.bind(self.masks)
        self.schedule = schedule
        self.method = method if isinstance(method, Method) else FunctionMethod(method.__name__, method)
        problem = method_problem(self.method.name, self.structure.kind, self.scope)
        if problem:
            raise ValueError(f"{problem[0]}={problem[1]}")
        self.method.bind(self.masks.params, self.masks.pruned)
        # Reads the pruned layers' inputs for a method that needs them (Method.calibration); set by build_pruner.
        self.calibration: Callable[[str], list] | None = None
        self._calibration_bytes = 0  # what the calibration statistics of the update in progress hold
        self.optimizer = optimizer
        self.beta1 = beta1
        self._check_reachable()
        # How each update scores and selects (lib/pruning/update_pass.py).
        self.update_pass = UpdatePass(self.masks, self.structure, self.method, optimizer)
        self.updates: list[MaskUpdate] = []
        self.peak_score_bytes = 0
        # An optimizer that masks inside its own step (kprune's Adam/AdamW) zeroes the pruned weights'
        # gradients there instead of in a pass of their own; gradient clipping's norm leaves them out
        # too (lib/grad_clip.py).
        self.fused_masking = fuse_masking and hasattr(optimizer, "masked_params")
        self._pool_ids = frozenset(id(p) for p in self.masks.params)

    @property
    def layer_adaptive(self) -> bool:
        return self.scope == "layer-adaptive"

    def _check_reachable(self) -> None:
        """Refuse, before training, a final sparsity the per-layer (or per-group) cap cannot reach."""
        cap = self.structure.cap()
        if self.layer_adaptive:
            cap = min(cap, LAYER_CAP)
        elif cap >= 1.0:
            return
        group = self.structure.group
        if self.scope == "row":
            rows = self.structure.layer_rows()
            fits = all(target_count(self.schedule.final, cols) <= int(cap * cols) for _, cols in rows)
            if fits:
                return
            raise KpruneError(f"TARGET_SPARSITY {self.schedule.final:g} cannot be reached in every row: at most "
                              f"{cap:g} of each row's {group}s can be pruned")
        sizes = self.structure.layer_sizes()
        total = sum(sizes)
        capacity = sum(int(cap * n) for n in sizes)  # whole groups: a small layer's cap rounds down
        if target_count(self.schedule.final, total) <= capacity:
            return
        reachable = math.floor(capacity / total * 1e4) / 1e4
        why = (f"each of the {len(sizes)} prunable layers is capped at {cap:g} of its {group}s"
               if self.layer_adaptive else f"at most {cap:g} of the {group}s can be pruned")
        raise KpruneError(f"TARGET_SPARSITY {self.schedule.final:g} cannot be reached with {self.scope} "
                          f"{self.structure.kind} sparsity: {why}, so at most {capacity:,} of {total:,} {group}s "
                          f"can be pruned; set TARGET_SPARSITY to at most {reachable:g}")

    def structure_summary(self) -> dict:
        """What summary.json records about the structure: its settings, scope and the layers left out."""
        return {"sparsity_structure": {**self.structure.describe(), "scope": self.scope,
                                       "groups": sum(self.structure.layer_sizes())},
                "structure_excluded": list(self.excluded)}

    @property
    def score_buffers(self) -> list[torch.Tensor]:
        """Persistent per-weight tensors the method keeps between updates."""
        return self.method.buffers()

    @property
    def pruned_count(self) -> int:
        return self.masks.pruned_count

    @property
    def numel(self) -> int:
        return self.masks.numel

    @property
    def achieved_sparsity(self) -> float:
        return self.masks.pruned_count / self.masks.numel

    def state_dict(self) -> dict:
        """Masks, counts, update history, the structure's and the method's own state, for a checkpoint."""
        return {"bits": [b.clone() for b in self.masks.bits], "pruned_count": self.masks.pruned_count,
                "updates": [u.__dict__ for u in self.updates], "method": self.method.state_dict(),
                "peak_score_bytes": self.peak_score_bytes, "structure": self.structure.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.masks.bits = [b.to(mine.device) for b, mine in zip(state["bits"], self.masks.bits)]
        self.masks.pruned_count = state["pruned_count"]
        self.updates = [MaskUpdate(**u) for u in state["updates"]]
        self.method.load_state_dict(state["method"])
        self.peak_score_bytes = state["peak_score_bytes"]
        self.structure.load_state_dict(state.get("structure", {}))

    def clear(self) -> None:
        """Forget every pruned weight and group (the weights stay as they are): for benchmarks and tests."""
        self.masks.clear()
        self.structure.clear()
        if self.fused_masking:
            self.optimizer.masked_params = frozenset()
            self.optimizer.pruned_bits = {}

    def observe(self, obs: Observation) -> None:
        self.method.observe(obs)

    def after_backward(self) -> None:
        if not self.masks.pruned_count:
            return
        if self.fused_masking:  # the step takes the gradient of an exactly-zero pooled weight as 0
            self.optimizer.masked_params = self._pool_ids
            # clipping's norm leaves out the pruned weights by their bits (a byte per 8 weights, not 8 weights)
            self.optimizer.pruned_bits = {id(p): bits for p, bits in zip(self.masks.params, self.masks.bits)}
            self.masks.zero_attached_grads()
        else:
            self.masks.zero_pruned_grads()

    def after_step(self, step: int) -> MaskUpdate | None:
        """Update the masks if the schedule says so. The optimizer has used the gradients."""
        if not self.schedule.is_update(step):
            return None
        return self.update(step, gradients_spent=True)

    @torch.no_grad()
    def update(self, step: int, gradients_spent: bool = False) -> MaskUpdate:
        """Recompute masks so exactly the schedule's target of groups is pruned (never fewer than already are).

        With `gradients_spent` (the optimizer step that used them is done) the
        scores are written into the parameters' gradients, which are then set
        to None, instead of into a new score-sized buffer.
        """
        sparsity = self.schedule.target(step)
        counts = self._counts(sparsity)
        if counts.total != self.structure.pruned_groups():
            self._prune(counts, ScoreContext(step=step, beta1=self.beta1), gradients_spent)
        s = self.structure
        record = MaskUpdate(step, sparsity, s.target_weights(counts.total), self.masks.pruned_count, group=s.group,
                            target_groups=counts.total, pruned_groups=s.pruned_groups(),
                            achieved_sparsity=self.achieved_sparsity)
        self.updates.append(record)
        return record

    def target_groups(self, sparsity: float) -> int:
        """The groups (weights, tiles or units) an update at `sparsity` leaves pruned."""
        return self._counts(sparsity).total

    def _counts(self, sparsity: float) -> Counts:
        """The groups the scope asks to prune at `sparsity`, never fewer than are pruned (no revival)."""
        return scope_counts(self.scope, self.structure, sparsity)

    def _prune(self, counts: Counts, ctx: ScoreContext, gradients_spent: bool) -> None:
        """Calibrate if the method reads the layers' inputs, then select (or reconstruct) `counts`."""
        method = self.method
        # A step that masks the pruned weights takes their moments as 0 too: then only the weights are zeroed.
        self.masks.states_zeroed_by_step = self.fused_masking
        if method.calibration is not None:
            if self.calibration is None:
                raise KpruneError(f"{method.name} reads calibration inputs, but this pruner was built without "
                                  "the model and its calibration batches")
            stats = self.calibration(method.calibration)
            # The calibration statistics are held through the update: per-column sums (wanda) or Hessians (sparsegpt).
            self._calibration_bytes = sum(st.sums.numel() * st.sums.element_size() for st in stats)
            method.inputs = stats
        try:
            if method.reconstructs:
                self._reconstruct(counts)
            else:
                self.update_pass.run(counts, ctx, gradients_spent, self._calibration_bytes, self._record_peak)
        finally:
            method.inputs = None  # per-layer statistics (Hessians) live for one update only
            self._calibration_bytes = 0

    def _reconstruct(self, counts: Counts) -> None:
        """Each layer pruned to its count by the method itself (SparseGPT), which also updates the kept weights."""
        masks, structure = self.masks, self.structure
        nm = (structure.n, structure.m) if structure.kind == "nm" else None
        first = 0
        # Besides the Hessians, a layer's reconstruction holds a float32 copy of its weight and the factor of
        # its inverse Hessian (columns x columns).
        self._record_peak(self._calibration_bytes + max(
            4 * p.numel() + 4 * (p.numel() // p.shape[0]) ** 2 for p in masks.params))
        for i, (p, count) in enumerate(zip(masks.params, counts.per_layer)):
            pruned = masks.pruned_mask(i)
            if count != int(pruned.sum()):  # nothing new to prune: the layer stays as it is
                mask = self.method.prune_layer_(i, masks.names[i], pruned, count, nm, first)
                masks.bits[i] = pack_bits(mask)
            first += p.numel()
        masks.pruned_count = counts.total
        masks.zero_pruned_weights_and_states(self.optimizer)

    def _record_peak(self, held: int) -> None:
        """The score memory an update held at once: `peak_score_bytes` keeps the highest of every update's."""
        self.peak_score_bytes = max(self.peak_score_bytes, held)
