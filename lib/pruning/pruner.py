"""The pruner: schedule + method + exact selection + masks, the same for every method.

The training loop calls `observe()` after each backward pass (methods that
watch training record what they need), `after_backward()` (zero the gradients
of pruned weights) and `after_step(step)` after each optimizer step (update
the masks when the schedule says so; the scores of an update are written into
the spent gradients, which are set to None, so it needs no score-sized buffer). Only the method's score differs between
methods, so at every update every method prunes the same number of weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lib.errors import KpruneError
from lib.pruning.masks import CHUNK, MaskSet, chunks, pack_bits
from lib.pruning.methods import FunctionMethod, Method, Observation
from lib.pruning.registry import LAYER_CAP
from lib.pruning.schedules import Schedule
from lib.pruning.scores import ScoreContext, ScoreFn
from lib.pruning.selection import INT32_MIN, floats_to_keys_, iter_selection, kth_threshold



def target_count(sparsity: float, numel: int) -> int:
    """Weights to prune for `sparsity` of `numel`: rounded half up, as documented."""
    return min(numel, int(sparsity * numel + 0.5))


def layer_adaptive_counts(k: int, sizes: list[int], floor: list[int] | None = None) -> list[int]:
    """Per-layer pruned counts for depth-scaled sparsity that sum to the global target exactly.

    With s = k / (all weights), layer i of L gets min(0.95, c * s * (0.7 + 0.6 * i / (L - 1))); the factor c
    is found by bisection so the fractions add up to s over all weights, and
    the counts are rounded by largest remainder. `floor` (weights already
    pruned per layer) is respected: no layer's count goes down.
    """
    n_layers, total = len(sizes), sum(sizes)
    sparsity = k / total
    floor = floor or [0] * n_layers
    if k <= sum(floor):
        return list(floor)
    scales = [0.7 + 0.6 * i / (n_layers - 1) if n_layers > 1 else 1.0 for i in range(n_layers)]
    capacity = sum(int(LAYER_CAP * n) for n in sizes)
    if k > capacity:
        raise ValueError(f"sparsity {sparsity:.4g} cannot be reached with every layer capped at {LAYER_CAP}")

    def fractions(c: float) -> list[float]:
        return [min(LAYER_CAP, c * sparsity * sc) for sc in scales]

    lo, hi = 0.0, 1.0
    while sum(f * n for f, n in zip(fractions(hi), sizes)) < k:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(f * n for f, n in zip(fractions(mid), sizes)) < k:
            lo = mid
        else:
            hi = mid
    ideal = [f * n for f, n in zip(fractions(hi), sizes)]
    counts = [max(fl, min(int(x), int(LAYER_CAP * n))) for x, n, fl in zip(ideal, sizes, floor)]
    # Hand out (or take back) the remainder one weight at a time, largest remainder first.
    order = sorted(range(n_layers), key=lambda i: (-(ideal[i] - int(ideal[i])), i))
    while sum(counts) < k:
        for i in order:
            if sum(counts) < k and counts[i] < int(LAYER_CAP * sizes[i]):
                counts[i] += 1
    while sum(counts) > k:
        for i in reversed(order):
            if sum(counts) > k and counts[i] > floor[i]:
                counts[i] -= 1
    return counts


@dataclass
class MaskUpdate:
    step: int
    target_sparsity: float
    target_count: int
    pruned_count: int


class Pruner:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], schedule: Schedule, method: Method | ScoreFn,
                 optimizer: torch.optim.Optimizer, beta1: float | None = 0.9, layer_adaptive: bool = False):
        self.masks = MaskSet(named_params)
        if self.masks.numel == 0:
            raise ValueError("no prunable parameters")
        self.schedule = schedule
        self.method = method if isinstance(method, Method) else FunctionMethod(method.__name__, method)
        self.method.bind(self.masks.params, self.masks.pruned)
        self.optimizer = optimizer
        self.beta1 = beta1
        self.layer_adaptive = layer_adaptive
        if layer_adaptive:
            self._check_reachable()
        self.updates: list[MaskUpdate] = []
        self.peak_score_bytes = 0

    def _check_reachable(self) -> None:
        """Refuse, before training, a final sparsity the per-layer cap cannot reach with these layer sizes."""
        sizes = [p.numel() for p in self.masks.params]
        capacity = sum(int(LAYER_CAP * n) for n in sizes)  # whole weights: a small layer's cap rounds down
        if target_count(self.schedule.final, self.numel) <= capacity:
            return
        reachable = math.floor(capacity / self.numel * 1e4) / 1e4
        raise KpruneError(f"TARGET_SPARSITY {self.schedule.final:g} cannot be reached with layer-adaptive "
                          f"sparsity: each of the {len(sizes)} prunable layers is capped at {LAYER_CAP:g} of its "
                          f"weights, so at most {capacity:,} of {self.numel:,} weights can be pruned; "
                          f"set TARGET_SPARSITY to at most {reachable:g}")

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
        """Masks, counts, update history and the method's own state, for a checkpoint."""
        return {"bits": [b.clone() for b in self.masks.bits], "pruned_count": self.masks.pruned_count,
                "updates": [u.__dict__ for u in self.updates], "method": self.method.state_dict(),
                "peak_score_bytes": self.peak_score_bytes}

    def load_state_dict(self, state: dict) -> None:
        self.masks.bits = [b.to(mine.device) for b, mine in zip(state["bits"], self.masks.bits)]
        self.masks.pruned_count = state["pruned_count"]
        self.updates = [MaskUpdate(**u) for u in state["updates"]]
        self.method.load_state_dict(state["method"])
        self.peak_score_bytes = state["peak_score_bytes"]

    def observe(self, obs: Observation) -> None:
        self.method.observe(obs)

    def after_backward(self) -> None:
        if self.masks.pruned_count:
            self.masks.zero_pruned_grads()

    def after_step(self, step: int) -> MaskUpdate | None:
        """Update the masks if the schedule says so. The optimizer has used the gradients."""
        if not self.schedule.is_update(step):
            return None
        return self.update(step, gradients_spent=True)

    @torch.no_grad()
    def update(self, step: int, gradients_spent: bool = False) -> MaskUpdate:
        """Recompute masks so exactly target_count(schedule.target(step)) weights are pruned.

        With `gradients_spent` (the optimizer step that used them is done) the
        scores are written into the parameters' gradients, which are then set
        to None, instead of into a new score-sized buffer.
        """
        sparsity = self.schedule.target(step)
        k = max(target_count(sparsity, self.numel), self.masks.pruned_count)  # never revive
        if k != self.masks.pruned_count:
            self._select(k, ScoreContext(step=step, beta1=self.beta1), gradients_spent)
        record = MaskUpdate(step, sparsity, k, self.masks.pruned_count)
        self.updates.append(record)
        return record

    def _select(self, k: int, ctx: ScoreContext, gradients_spent: bool) -> None:
        masks = self.masks
        keys, borrowed, allocated = [], [], 0
        for i, p in enumerate(masks.params):
            out = _spent_gradient(p) if gradients_spent else None
            if out is None:
                out = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                allocated += out.numel() * out.element_size()
            else:
                borrowed.append(p)
            self.method.score(i, p.detach().float(), self.optimizer.state.get(p, {}), out, ctx)
            flat = out.view(-1)
            # Non-negative floats already order like their int32 bit patterns.
            key = flat.view(torch.int32) if self.method.nonnegative else floats_to_keys_(flat)
            if masks.any_pruned(i):  # pruned stay pruned: they get the lowest possible key
                for start, n in chunks(key.numel()):
                    pruned = masks.pruned_chunk(i, start, n)
                    key[start:start + n].mul_(pruned.logical_not()).add_(pruned, alpha=INT32_MIN)
            keys.append(key)
        self.peak_score_bytes = max(self.peak_score_bytes, allocated)
        if self.layer_adaptive:
            counts = layer_adaptive_counts(k, [key.numel() for key in keys], masks.counts())
            for i, (key, count) in enumerate(zip(keys, counts)):
                self._store([key], count, first=i)
        else:
            self._store(keys, k, first=0)
        del keys, out
        for p in borrowed:  # what the scores overwrote was spent; nothing may read it as a gradient
            p.grad = None
        masks.pruned_count = k
        masks.zero_pruned_weights_and_states(self.optimizer)

    def _store(self, keys: list[torch.Tensor], k: int, first: int) -> None:
        """Pack the selection of the k lowest `keys` into the bits of parameters first, first+1, ..."""
        # The old bits are no longer needed (pruned weights carry the lowest key): overwrite them
        # in place rather than holding a second copy.
        thr = kth_threshold(keys, k) if k else None
        for j in range(len(keys)):
            self.masks.bits[first + j].zero_()
        if thr is not None:
            # Ties are broken by a hash of each weight's index in the whole pool, whichever layers are selected.
            first_index = sum(p.numel() for p in self.masks.params[:first])
            for j, start, selected in iter_selection(keys, thr, chunk=CHUNK, first_index=first_index):
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
