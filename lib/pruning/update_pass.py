"""How one mask update scores every weight and selects the lowest (the pruner decides when, and how many).

`UpdatePass.run` scores each pooled parameter, by select.c's one C pass where it has the method's score
and by the method's torch score otherwise, into the parameter's spent gradient or a buffer of its own;
turns the scores into int32 selection keys (pruned weights lowest, what the structure does not allow
unselectable), or folds them into a structure's group scores; selects the scope's counts of the lowest
(lib/pruning/selection.py, lib/pruning/scope.py); packs the selection into the masks' bits and zeroes
the pruned weights (and their optimizer states, unless the step masks them). The score memory it held
at once is handed to the pruner (`peak_score_bytes`). The pruner's lifecycle is lib/pruning/pruner.py.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lib.pruning.masks import CHUNK, MaskSet, chunk_size, chunks, pack_bits
from lib.pruning.methods import FunctionMethod, Method
from lib.pruning.scores import ScoreContext, native_arguments, score_chunk_numel
from lib.pruning.selection import (INT32_MIN, SMALL_SELECTION, Counters, TiedKeys, count_first_histogram,
                                   floats_to_keys_, iter_selection, kth_threshold, native_selection, sample_keys,
                                   scorable, score_keys, score_window, store_selection, zero_selected)
from lib.pruning.scope import Counts, row_select, select_groups
from lib.pruning.structure import Structure
from lib.pruning import window


class UpdatePass:
    """The score-and-select pass of a pruner's mask updates over its masks, structure, method and optimizer."""

    def __init__(self, masks: MaskSet, structure: Structure, method: Method, optimizer: torch.optim.Optimizer):
        self.masks = masks
        self.structure = structure
        self.method = method
        self.optimizer = optimizer

    def run(self, counts: Counts, ctx: ScoreContext, gradients_spent: bool, calibration_bytes: int,
            record_peak: Callable[[int], None]) -> None:
        """Prune `counts`: score, select, write the bits and the masks' pruned count, zero the pruned weights.

        With `gradients_spent` the scores are written into the parameters' gradients, which are then set to
        None. `calibration_bytes`: what the method's calibration statistics hold through the update.
        `record_peak` gets the score memory held at once, once every weight is scored."""
        masks, structure = self.masks, self.structure
        borrowed: dict[int, nn.Parameter] = {}  # by id: parameters whose spent gradients the pass wrote into
        zeroed: set[int] = set()  # parameters whose pruned weights and states the pass already zeroed
        # Which parameters already have pruned weights, read from the device once, not once per parameter.
        pruned_before = masks.pruned_flags() if structure.weight_level else []
        # One global selection over keys no structure changes: on the CPU its first histogram is counted
        # while the keys are written (the counters are closed by the selection, or below).
        counters = self._first_histogram() if structure.weight_level and not structure.restricts \
            and counts.per_layer is None and counts.per_row is None else None
        try:
            done, peak = False, 0
            if counters is not None and counts.total:  # a sample of the keys: the window that holds the k-th
                peak, bounds = self._sample_window(counts.total, pruned_before, ctx, gradients_spent)
                held = None if bounds is None else self._select_in_window(
                    bounds, counts.total, pruned_before, ctx, gradients_spent, counters, borrowed)
                if held is not None:
                    record_peak(max(peak, held + calibration_bytes))
                    masks.pruned_count = counts.total
                    zeroed.update(range(len(masks.params)))
                    done = True
            if not done:
                self._score_and_select(counts, ctx, gradients_spent, calibration_bytes, record_peak, pruned_before,
                                       counters, borrowed, zeroed, peak)
        finally:
            if counters is not None:
                counters.close()
        for p in borrowed.values():  # what the scores overwrote was spent; nothing may read it as a gradient
            p.grad = None
        masks.zero_pruned_weights_and_states(self.optimizer, done=frozenset(zeroed))

    def _score_and_select(self, counts: Counts, ctx: ScoreContext, gradients_spent: bool, calibration_bytes: int,
                          record_peak: Callable[[int], None], pruned_before: list[bool], counters: Counters | None,
                          borrowed: dict[int, nn.Parameter], zeroed: set[int], peak: int = 0) -> None:
        """Score every weight into its keys (or a structure's group scores), select, write the bits (run's
        pass without a window); the parameters whose spent gradients it wrote into go to `borrowed`, those
        whose pruned weights and states it zeroed to `zeroed`. `peak`: the score memory held before."""
        masks, structure = self.masks, self.structure
        keys, allocated = [], 0
        weight_level = structure.weight_level
        if not weight_level:
            structure.begin()
        for i, p in enumerate(masks.params):
            out, own = _spent_gradient(p) if gradients_spent else None, 0
            if out is None:
                out = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                own = out.numel() * out.element_size()
            else:
                borrowed[id(p)] = p
            allocated += own
            held = (allocated if weight_level else own) + structure.group_score_bytes(i) + calibration_bytes
            state = self.optimizer.state.get(p, {})
            native = self._native_keys_(i, p, state, out, pruned_before[i] if weight_level else False, ctx,
                                        counters, keys=weight_level)
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
                    count_first_histogram(key, counters)
            keys.append(key)
        record_peak(peak)
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
                if self._store([key], count, first=i):
                    zeroed.add(i)
            masks.pruned_count = counts.total
        else:
            if self._store(keys, counts.total, first=0, counted=counters):
                zeroed.update(range(len(keys)))
            masks.pruned_count = counts.total

    def _first_histogram(self) -> Counters | None:
        """Counters for the selection's first histogram, where the C passes will run it (the CPU, a large pool)."""
        params = self.masks.params
        if self.masks.numel <= SMALL_SELECTION or any(p.device.type != "cpu" for p in params):
            return None
        return Counters(torch.get_num_threads()) if native_selection() else None

    def _sample_window(self, k: int, pruned_before: list[bool], ctx: ScoreContext,
                       gradients_spent: bool) -> tuple[int, tuple[int, int] | None]:
        """Score a sample of every weight (a few cache lines each, select.c's pass) and choose the window of
        keys that holds the k-th (lib/pruning/window.py): (the bytes the sample held, (lo, hi) or None). The
        sample held 0 bytes when a spent gradient holds it (it is dead until this update writes there). No
        window where a weight cannot be scored by select.c, a tensor is too large for its int32 positions or
        the pool for the tie order's 32-bit indices (iter_selection then says so)."""
        method, params, n = self.method, self.masks.params, self.masks.numel
        if not isinstance(method, FunctionMethod) or not window.WINDOW_FROM <= n <= 1 << 32 \
                or any(p.numel() >= 1 << 31 for p in params):
            return 0, None
        budget = window.sample_budget(n)
        lines = [window.sample_lines(p.numel(), n, budget) for p in params]
        size = sum(runs * length for runs, _, length in lines)
        room = [g for g in map(_spent_gradient, params) if g is not None and g.numel() >= size] \
            if gradients_spent else []
        sample = room[0].view(-1)[:size].view(torch.int32) if room else torch.empty(size, dtype=torch.int32)
        peak = 0 if room else 4 * size
        start = 0
        for i, (p, (runs, stride, length)) in enumerate(zip(params, lines)):
            arguments = native_arguments(method.fn, self.optimizer.state.get(p, {}), ctx)
            if arguments is None:
                return peak, None
            formula, m, v, correction = arguments
            part = sample[start:start + runs * length]
            if not sample_keys(formula, p.detach(), m, v, self.masks.bits[i] if pruned_before[i] else None,
                               runs, stride, length, part, correction):
                return peak, None
            start += part.numel()
        return peak, window.choose_window(sample, n, k)

    def _select_in_window(self, bounds: tuple[int, int], k: int, pruned_before: list[bool], ctx: ScoreContext,
                          gradients_spent: bool, counters: Counters,
                          borrowed: dict[int, nn.Parameter]) -> int | None:
        """Select the k lowest keys where `bounds` holds the k-th: one select.c pass per weight writes the bits
        of the keys below the window and keeps those inside it, each into its spent gradient (or a buffer of
        its own); the k-th key is found among the kept ones, their bits set, and the selected weights (and
        states, unless the step masks them) zeroed (lib/pruning/window.py). Returns the bytes of the buffers
        it allocated; None, no bit or weight changed, where the window did not hold the k-th key, a part of
        a buffer could not keep its window's keys, too many tied keys were to be chosen among, or a tensor
        to zero is not one select.c takes (run's pass without a window then selects)."""
        masks, method = self.masks, self.method
        targets = [masks.zero_targets(p, self.optimizer) for p in masks.params]
        if not all(scorable(p, *group) for p, group in zip(masks.params, targets)):
            return None
        lo, hi = bounds
        parts, below, allocated = [], 0, 0
        for i, p in enumerate(masks.params):
            out = _spent_gradient(p) if gradients_spent else None
            if out is None:
                out = torch.empty(p.shape, dtype=torch.float32)
                allocated += out.numel() * 4
            else:
                borrowed[id(p)] = p
            formula, m, v, correction = native_arguments(method.fn, self.optimizer.state.get(p, {}), ctx)
            found = score_window(formula, p.detach(), m, v, masks.bits[i] if pruned_before[i] else None,
                                 correction, lo, hi, out.view(-1).view(torch.int32))
            if found is None:
                return None
            below += found.below
            parts.append(found)
        threshold = window.window_threshold(parts, below, k, counters)
        if threshold is None:
            return None
        offset, tie = 0, TiedKeys(threshold)
        for i, (p, found) in enumerate(zip(masks.params, parts)):
            found.write_bits(masks.bits[i], threshold, offset, tie)
            offset += p.numel()
        tie.take(0, masks.params, masks.bits, [[] for _ in masks.params])  # (zeroed with the rest, next)
        for bits, group in zip(masks.bits, targets):
            zero_selected(bits, group)
        return allocated

    def _native_keys_(self, i: int, p: nn.Parameter, state: dict, out: torch.Tensor, any_pruned: bool,
                      ctx: ScoreContext, counters: Counters | None, keys: bool = True) -> bool:
        """Parameter i's selection keys written into `out` by one C pass (score, key, pruned weights lowest,
        with `counters` the first histogram), for a score select.c has; False, nothing written, otherwise.
        keys=False: its float scores only (for a group structure)."""
        method = self.method
        if p.device.type != "cpu" or not isinstance(method, FunctionMethod) or not native_selection():
            return False  # (a GPU: bitter8's arguments would read Adam's step from the device)
        arguments = native_arguments(method.fn, state, ctx)
        if arguments is None:
            return False
        formula, m, v, correction = arguments
        pruned = self.masks.bits[i] if any_pruned else None
        return score_keys(formula, p.detach(), m, v, out, pruned, correction, counters, keys=keys)

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

    def _store(self, keys: list[torch.Tensor], k: int, first: int, counted: Counters | None = None) -> bool:
        """Pack the selection of the k lowest `keys` into the bits of parameters first, first+1, ...

        `counted`: counters holding the keys' first histogram already.
        True if the same pass also zeroed those parameters' pruned weights and states."""
        # The old bits are no longer needed (pruned weights carry the lowest key): overwrite them
        # in place rather than holding a second copy.
        thr = kth_threshold(keys, k, first_histogram=counted) if k else None
        first_index = sum(p.numel() for p in self.masks.params[:first])
        indices = range(first, first + len(keys))
        if thr is not None and store_selection(keys, thr, [self.masks.bits[i] for i in indices],
                                               [self.masks.zero_targets(self.masks.params[i], self.optimizer)
                                                for i in indices], first_index):
            return True  # bits and zeroing in one pass (CPU; the usual few tied keys taken after it, the same choice)
        for j in range(len(keys)):
            self.masks.bits[first + j].zero_()
        if thr is not None:
            # Ties are broken by a hash of each weight's index in the whole pool, whichever layers are selected.
            chunk = chunk_size(keys[0].device)  # cache-sized on CPUs, whole tensors on GPUs (fewer launches)
            for j, start, selected in iter_selection(keys, thr, chunk=chunk, first_index=first_index):
                self.masks.bits[first + j][start // 8:start // 8 + (selected.numel() + 7) // 8] = pack_bits(selected)
        return False


def _spent_gradient(p: nn.Parameter) -> torch.Tensor | None:
    """p.grad, if it can hold p's float32 scores in place.

    A mask update in after_step runs after the optimizer step, when the
    gradient has been used and the next step's zero_grad would drop it: its
    memory is free to hold the scores, so the update adds no score-sized
    buffer. The update pass sets it to None afterwards.
    """
    g = p.grad
    if (g is None or g.dtype != torch.float32 or g.layout != torch.strided or g.shape != p.shape
            or not g.is_contiguous() or g.requires_grad):
        return None
    return g.detach()
