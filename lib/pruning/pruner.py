"""The pruner: schedule + method + exact selection + masks, the same for every method.

The training loop calls `observe()` after each backward pass (methods that
watch training record what they need), `after_backward()` (zero the gradients
of pruned weights; with `fuse_masking`, kprune's Adam/AdamW does it inside
its step instead) and `after_step(step)` after each optimizer step (update
the masks when the schedule says so; the scores of an update are written into
the spent gradients, which are set to None, so it needs no score-sized
buffer; `peak_score_bytes` records the score memory it did need). Only the method's score differs between methods, so at every
update every method prunes the same number of weights. What is pruned
together (lib/pruning/structure.py) and among which groups the lowest are
taken (the scope: global, layer, layer-adaptive, row) are shared settings too.
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
from lib.pruning.masks import CHUNK, MaskSet, chunk_size, chunks, pack_bits
from lib.pruning.methods import FunctionMethod, Method, Observation
from lib.pruning.registry import LAYER_CAP, method_problem
from lib.pruning.schedules import Schedule
from lib.pruning.scores import ScoreContext, ScoreFn, native_arguments, score_chunk_numel
from lib.pruning.selection import (INT32_MIN, SMALL_SELECTION, Counters, count_first_histogram, floats_to_keys_,
                                   iter_selection, kth_threshold, native_selection, sample_keys, score_keys,
                                   settle_ties_, store_selection)
# target_count and layer_adaptive_counts are imported from here by their users
from lib.pruning.scope import (Counts, check_scope, layer_adaptive_counts, row_select, scope_counts,  # noqa: F401
                               select_groups, target_count)
from lib.pruning.structure import Structure
from lib.pruning import window




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
                self._select(counts, ctx, gradients_spent)
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
        self.peak_score_bytes = max(self.peak_score_bytes, self._calibration_bytes + max(
            4 * p.numel() + 4 * (p.numel() // p.shape[0]) ** 2 for p in masks.params))
        for i, (p, count) in enumerate(zip(masks.params, counts.per_layer)):
            pruned = masks.pruned_mask(i)
            if count != int(pruned.sum()):  # nothing new to prune: the layer stays as it is
                mask = self.method.prune_layer_(i, masks.names[i], pruned, count, nm, first)
                masks.bits[i] = pack_bits(mask)
            first += p.numel()
        masks.pruned_count = counts.total
        masks.zero_pruned_weights_and_states(self.optimizer)

    def _select(self, counts: Counts, ctx: ScoreContext, gradients_spent: bool) -> None:
        masks, structure = self.masks, self.structure
        keys, borrowed, allocated, peak = [], [], 0, 0
        self._zeroed: set[int] = set()  # parameters whose pruned weights and states _store already zeroed
        weight_level = structure.weight_level
        if not weight_level:
            structure.begin()
        # Which parameters already have pruned weights, read from the device once, not once per parameter.
        pruned_before = masks.pruned_flags() if weight_level else []
        # One global selection over keys no structure changes: on the CPU its first histogram is counted
        # while the keys are written (the counters are closed by the selection, or below).
        counters = self._first_histogram() if weight_level and not structure.restricts and counts.per_layer is None \
            and counts.per_row is None else None
        try:
            if counters is not None and counts.total:  # a sample of the keys: the window that holds the k-th
                peak = self._set_window(counters, counts.total, pruned_before, ctx)
            position = 0  # of the parameter's first weight in the pool
            for i, p in enumerate(masks.params):
                out, own = _spent_gradient(p) if gradients_spent else None, 0
                if out is None:
                    out = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                    own = out.numel() * out.element_size()
                else:
                    borrowed.append(p)
                allocated += own
                held = (allocated if weight_level else own) + structure.group_score_bytes(i) + self._calibration_bytes \
                    + (counters.window_bytes if counters is not None else 0)
                state = self.optimizer.state.get(p, {})
                native = self._native_keys_(i, p, state, out, pruned_before[i] if weight_level else False, ctx,
                                            counters, keys=weight_level, position=position)
                position += p.numel()
                if native:
                    peak = max(peak, held)  # one C pass: nothing beside the keys (or scores)
                else:
                    # Score memory while this weight is scored: the buffers held (the keys keep every one; a
                    # group structure folds each into its group scores and drops it), the group scores, a
                    # float32 copy of a weight of another dtype and the score's declared intermediates.
                    transient = ((p.numel() * 4 if p.dtype != torch.float32 else 0)
                                 + self.method.temporaries * 4 * score_chunk_numel(p.shape, p.device))
                    peak = max(peak, held + transient)
                    self.method.score(i, p.detach().float(), state, out, ctx)
                if not weight_level:  # the structure folds the weights' scores into its groups' scores
                    structure.add_scores(i, out)
                    continue
                if native:  # already keys, pruned weights lowest
                    key = out.view(-1).view(torch.int32)
                    structure.restrict_(i, key)
                else:
                    key = self._keys_(i, out, pruned_before[i])
                    if counters is not None:
                        count_first_histogram(key, counters, position - p.numel())
                keys.append(key)
            self.peak_score_bytes = max(self.peak_score_bytes, peak)
            if not weight_level:
                structure.apply(select_groups(structure.group_keys(), counts, structure.layer_rows
                                               if counts.per_row is not None else None))
                masks.pruned_count = structure.pruned_weights(counts.total)
            elif counts.per_row is not None:
                for i, (key, per_row) in enumerate(zip(keys, counts.per_row)):
                    self._store_rows(key, i, per_row)
                masks.pruned_count = counts.total
            elif counts.per_layer is not None:
                for i, (key, count) in enumerate(zip(keys, counts.per_layer)):
                    self._store([key], count, first=i)
                masks.pruned_count = counts.total
            else:
                self._store(keys, counts.total, first=0, counted=counters)
                masks.pruned_count = counts.total
        finally:
            if counters is not None:
                counters.close()
        del keys, out
        for p in borrowed:  # what the scores overwrote was spent; nothing may read it as a gradient
            p.grad = None
        masks.zero_pruned_weights_and_states(self.optimizer, done=frozenset(self._zeroed))

    def _first_histogram(self) -> Counters | None:
        """Counters for the selection's first histogram, where the C passes will run it (the CPU, a large pool)."""
        params = self.masks.params
        if self.masks.numel <= SMALL_SELECTION or any(p.device.type != "cpu" for p in params):
            return None
        return Counters(torch.get_num_threads()) if native_selection() else None

    def _set_window(self, counters: Counters, k: int, pruned_before: list[bool], ctx: ScoreContext) -> int:
        """Score a sample of every weight (a few cache lines each, select.c's pass) and set the window that
        holds the k-th key (lib/pruning/window.py) on `counters`; returns the bytes held at once while
        sampling. No window where a weight cannot be scored by select.c (the first pass then counts the
        histogram as before)."""
        method, params, n = self.method, self.masks.params, self.masks.numel
        if not isinstance(method, FunctionMethod) or not window.WINDOW_FROM <= n <= 1 << 32:  # 32-bit positions
            return 0
        budget = window.sample_budget(n)
        parts, held = [], 0
        for i, p in enumerate(params):
            arguments = native_arguments(method.fn, self.optimizer.state.get(p, {}), ctx)
            if arguments is None:
                return 0
            formula, m, v, correction = arguments
            key = sample_keys(formula, p.detach(), m, v, self.masks.bits[i] if pruned_before[i] else None,
                              *window.sample_lines(p.numel(), n, budget), correction)
            if key is None:
                return 0
            parts.append(key)
            held += 4 * key.numel()
        sample = torch.cat(parts)
        del parts
        peak = 2 * held  # the parts and their concatenation
        chosen = window.choose_window(sample, n, k, counters.threads)
        if chosen is not None:
            counters.set_window(*chosen)
        return peak

    def _native_keys_(self, i: int, p: nn.Parameter, state: dict, out: torch.Tensor, any_pruned: bool,
                      ctx: ScoreContext, counters: Counters | None, keys: bool = True, position: int = 0) -> bool:
        """Parameter i's selection keys written into `out` by one C pass (score, key, pruned weights lowest,
        with `counters` the first histogram or the window's count; `position`: of p's first weight in the pool),
        for a score select.c has; False, nothing written, otherwise. keys=False: its float scores only (for a
        group structure)."""
        method = self.method
        if p.device.type != "cpu" or not isinstance(method, FunctionMethod) or not native_selection():
            return False  # (a GPU: bitter8's arguments would read Adam's step from the device)
        arguments = native_arguments(method.fn, state, ctx)
        if arguments is None:
            return False
        formula, m, v, correction = arguments
        pruned = self.masks.bits[i] if any_pruned else None
        return score_keys(formula, p.detach(), m, v, out, pruned, correction, counters, keys=keys, position=position)

    def _keys_(self, i: int, scores: torch.Tensor, any_pruned: bool) -> torch.Tensor:
        """Parameter i's float32 scores turned in place into its int32 selection keys.

        Pruned weights get the lowest key (pruned stay pruned) and the structure makes what it
        does not allow unselectable. The chunks' temporaries are gone when this returns.
        """
        flat = scores.view(-1)
        # Non-negative floats already order like their int32 bit patterns.
        key = flat.view(torch.int32) if self.method.nonnegative else floats_to_keys_(flat)
        if any_pruned:
            for start, n in chunks(key.numel(), chunk_size(key.device)):  # GPUs: whole tensors
                pruned = self.masks.pruned_chunk(i, start, n)
                key[start:start + n].mul_(pruned.logical_not()).add_(pruned, alpha=INT32_MIN)
        self.structure.restrict_(i, key)
        return key

    def _store_rows(self, key: torch.Tensor, i: int, per_row: int) -> None:
        """Pack the `per_row` lowest keys of every output row of parameter i into its bits."""
        p, bits = self.masks.params[i], self.masks.bits[i]
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        first_index = sum(q.numel() for q in self.masks.params[:i])
        per = max(8, (CHUNK // cols) // 8 * 8)  # whole bytes per chunk of rows
        for r0 in range(0, rows, per):
            part = key[r0 * cols:(r0 + per) * cols].view(-1, cols)
            selected = row_select(part, per_row, first_index + r0 * cols).reshape(-1)
            start = r0 * cols
            bits[start // 8:start // 8 + (selected.numel() + 7) // 8] = pack_bits(selected)

    def _store(self, keys: list[torch.Tensor], k: int, first: int, counted: Counters | None = None) -> None:
        """Pack the selection of the k lowest `keys` into the bits of parameters first, first+1, ...

        `counted`: counters holding the keys' first histogram already (or the finds of their window)."""
        # The old bits are no longer needed (pruned weights carry the lowest key): overwrite them
        # in place rather than holding a second copy.
        found = window.window_threshold(counted, k) if k and counted is not None and counted.windowed else None
        tied = None
        if found is not None:
            thr, tied = found
        else:  # (a window that missed counted no histogram: the histograms are counted over the keys)
            thr = kth_threshold(keys, k, first_histogram=None if counted is None or counted.windowed else counted) \
                if k else None
        first_index = sum(p.numel() for p in self.masks.params[:first])
        if thr is not None:  # on the CPU, the usual few tied keys are settled in the keys (the same choice)
            thr = settle_ties_(keys, thr, first_index, where=tied)
        indices = range(first, first + len(keys))
        if thr is not None and store_selection(keys, thr, [self.masks.bits[i] for i in indices],
                                               [self.masks.zero_targets(self.masks.params[i], self.optimizer)
                                                for i in indices]):
            self._zeroed.update(indices)  # bits and zeroing in one pass (CPU, no tie to break)
            return
        for j in range(len(keys)):
            self.masks.bits[first + j].zero_()
        if thr is not None:
            # Ties are broken by a hash of each weight's index in the whole pool, whichever layers are selected.
            chunk = chunk_size(keys[0].device)  # cache-sized on CPUs, whole tensors on GPUs (fewer launches)
            for j, start, selected in iter_selection(keys, thr, chunk=chunk, first_index=first_index):
                self.masks.bits[first + j][start // 8:start // 8 + (selected.numel() + 7) // 8] = pack_bits(selected)


def _spent_gradient(p: nn.Parameter) -> torch.Tensor | None:
    """p.grad, if it can hold p's float32 scores in place.

    A mask update in after_step runs after the optimizer step, when the
    gradient has been used and the next step's zero_grad would drop it: its
    memory is free to hold the scores, so the update adds no score-sized
    buffer. The pruner sets it to None afterwards.
    """
    g = p.grad
    if (g is None or g.dtype != torch.float32 or g.layout != torch.strided or g.shape != p.shape
            or not g.is_contiguous() or g.requires_grad):
        return None
    return g.detach()
