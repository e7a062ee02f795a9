"""Sparsity structures: which weights are pruned together (SPEC section 9).

Every method scores single weights; a structure decides what a selection
picks among, and the shared selection (lib/pruning/selection.py) picks it:

- unstructured: single weights, as always.
- nm (N:M): single weights, with a cap of M-N pruned in every group of M
  consecutive weights along the input dimension (dim 1: a Linear row's
  inputs; for a convolution [out, in, kh, kw], M consecutive input channels
  at each output channel and kernel position). In each group only the M-N
  lowest keys (pruned weights carry the lowest key, so they count first)
  stay selectable; the others get the highest key. Taking the k lowest
  selectable keys is exactly the k lowest scores under the cap (a greedy
  choice is optimal under a per-group cap), so the count is exact at every
  update and the full pattern is reached at sparsity (M-N)/M.
- block: whole R x C tiles of the weight seen as [out, in * kh * kw], scored
  by the mean of their weights' scores.
- channel: whole units described by the trainer (lib/pruning/units.py),
  scored by the mean of their weights' scores; the unit's biases and
  normalisation entries are zeroed with it.

Layers a structure cannot tile (nm: input dimension no multiple of M or a
1-D parameter; block: a side no multiple of the tile; channel: no unit covers
the parameter) are left out of the pool and listed in `excluded`, with the
reason, for the run's summary. Group scores and per-group state are small
(one value per tile or unit); the weights' scores stay in the buffers the
pruner already uses.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.pruning.masks import CHUNK, MaskSet, pack_bits
from lib.pruning.registry import (FIXED_SCOPE, LAYER_ADAPTIVE_VARIANTS, LAYER_CAP, NM_GROUP_LENGTHS, REFUSED_SCOPES,
                                  method_problem, scope_in_use)
from lib.pruning.selection import floats_to_keys_, nm_cap_native

INT32_MAX = 2 ** 31 - 1


def structure_problems(s) -> list[tuple[str, str]]:
    """What is wrong with the structure and scope settings of `s`: (symbol, problem) pairs."""
    problems: list[tuple[str, str]] = []
    structure = s.sparsity_structure or "unstructured"
    scope = scope_in_use(s.sparsity_scope, s.pruning_method, s.variant)
    target = s.target_sparsity
    if structure == "nm" and s.nm_n is not None and s.nm_m is not None:
        n, m = s.nm_n, s.nm_m
        if m not in NM_GROUP_LENGTHS:
            problems.append(("NM_M", f"{m} is not a supported group length: use "
                             f"{' or '.join(map(str, NM_GROUP_LENGTHS))} (2:4, 1:4, 4:8)"))
        elif n >= m:
            problems.append(("NM_N", f"{n} must be below NM_M ({m}): N of every M weights are kept"))
        elif target is not None and target > (m - n) / m:
            problems.append(("TARGET_SPARSITY", f"{target:g} is above {(m - n) / m:g} = (M-N)/M, the most "
                             f"{n}:{m} sparsity can prune (at most {m - n} of every {m} weights); set "
                             f"TARGET_SPARSITY to at most {(m - n) / m:g}"))
    if (structure, scope) in REFUSED_SCOPES:
        problems.append(("SPARSITY_SCOPE", f"{scope} cannot be used with SPARSITY_STRUCTURE={structure}: "
                         f"{REFUSED_SCOPES[(structure, scope)]}"))
    problem = method_problem(s.pruning_method, structure, scope)
    if problem:
        problems.append(problem)
    implied = FIXED_SCOPE.get(s.variant)
    if implied is not None and scope != implied:
        problems.append(("SPARSITY_SCOPE", f"{scope} conflicts with {s.variant}, which is bitter3's score with "
                         f"{implied} scope; set SPARSITY_SCOPE={implied}, or choose bitter3 for its score with "
                         f"another scope"))
    if (scope == "layer-adaptive" and s.variant not in LAYER_ADAPTIVE_VARIANTS and target is not None
            and target > LAYER_CAP):
        problems.append(("TARGET_SPARSITY", f"{target:g} is above {LAYER_CAP:g}, the per-layer cap of "
                         "layer-adaptive scope"))
    return problems


def nm_cap_(key: torch.Tensor, shape: torch.Size, n: int, m: int) -> None:
    """In place: in every group of m along dim 1, all but the m - n lowest keys become INT32_MAX.

    Equal keys rank by position in the group, so the result is deterministic.
    Works on chunks of output rows: the temporaries stay small.
    """
    rows, inputs = shape[0], shape[1]
    rest = key.numel() // (rows * inputs)
    if nm_cap_native(key, rows * (inputs // m), m, rest, n):  # CPUs: one C pass, the same rule
        return
    view = key.view(rows, inputs // m, m, rest)
    per = max(1, CHUNK // max(1, inputs * rest))
    for r0 in range(0, rows, per):
        x = view[r0:r0 + per]
        rank = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        # One comparison per pair of positions (6 for M = 4), each over 1/M of the chunk: j < l ranks
        # first when its key is lower or equal (an equal key earlier in the group ranks first).
        for j in range(m):
            for k in range(j + 1, m):
                first = x[:, :, j, :] <= x[:, :, k, :]
                rank[:, :, k, :] += first
                rank[:, :, j, :] += first.logical_not_()
        x.masked_fill_(rank >= m - n, INT32_MAX)


def _matrix_shape(p: nn.Parameter) -> tuple[int, int]:
    """A weight as a matrix [out, in * kh * kw]."""
    return p.shape[0], p.numel() // p.shape[0]


class Structure:
    """Unstructured sparsity, and the interface every structure gives the pruner."""

    kind = "unstructured"
    group = "weight"
    weight_level = True  # the selection runs over the weights' own keys (else over group keys)
    restricts = False  # restrict_ changes keys (the keys' histogram cannot be counted while they are written)

    def split(self, named_params: list[tuple[str, nn.Parameter]]):
        """(the pool, [{"name", "reason"}] of the parameters this structure cannot tile)."""
        return list(named_params), []

    def bind(self, masks: MaskSet) -> None:
        self.masks = masks

    def layer_sizes(self) -> list[int]:
        """Groups in each selection layer (a parameter; for channel a unit family)."""
        return [p.numel() for p in self.masks.params]

    def layer_rows(self) -> list[tuple[int, int]]:
        """(rows, groups per row) of each layer, for row scope."""
        return [_matrix_shape(p) for p in self.masks.params]

    def pruned_per_layer(self) -> list[int]:
        return self.masks.counts()

    def pruned_groups(self) -> int:
        return self.masks.pruned_count

    def cap(self) -> float:
        """The largest fraction of any layer's (or row's) groups this structure may prune."""
        return 1.0

    def restrict_(self, i: int, key: torch.Tensor) -> None:
        """Make the weights this structure does not allow in this selection unselectable."""

    def group_score_bytes(self, i: int) -> int:
        """Bytes of group scores a selection holds while parameter i's weights are scored."""
        return 0

    def target_weights(self, target_groups: int) -> int:
        """Weights the target groups hold."""
        return target_groups

    def pruned_weights(self, selected_groups: int) -> int:
        """Weights pruned after a selection of that many groups."""
        return selected_groups

    def clear(self) -> None:
        """Forget which groups are pruned (the masks are cleared by their owner)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        return {"kind": self.kind, "group": self.group}


class NM(Structure):
    kind = "nm"
    restricts = True

    def __init__(self, n: int, m: int):
        if m not in NM_GROUP_LENGTHS or not 1 <= n < m:
            raise ValueError(f"N:M = {n}:{m}: M must be one of {NM_GROUP_LENGTHS} and 1 <= N < M")
        self.n, self.m = n, m

    def split(self, named_params):
        pool, excluded = [], []
        for name, p in named_params:
            if p.dim() < 2:
                excluded.append({"name": name, "reason": "a 1-D parameter has no input dimension to group"})
            elif p.shape[1] % self.m:
                excluded.append({"name": name, "reason": f"input dimension {p.shape[1]} is no multiple of "
                                                         f"M = {self.m}"})
            else:
                pool.append((name, p))
        return pool, excluded

    def cap(self) -> float:
        return (self.m - self.n) / self.m

    def restrict_(self, i, key) -> None:
        nm_cap_(key, self.masks.params[i].shape, self.n, self.m)

    def describe(self) -> dict:
        return {**super().describe(), "n": self.n, "m": self.m}


class GroupStructure(Structure):
    """A structure whose selection runs over one small score per group (tile or unit)."""

    weight_level = False

    def begin(self) -> None:
        """A new selection: forget the previous group scores."""

    def add_scores(self, i: int, scores: torch.Tensor) -> None:
        """Fold parameter i's float32 weight scores into its groups' scores."""
        raise NotImplementedError

    def group_keys(self) -> list[torch.Tensor]:
        """One flat int32 key tensor per layer; pruned groups carry the lowest key."""
        raise NotImplementedError

    def apply(self, selected: list[torch.Tensor]) -> None:
        """Record the selected groups (a superset of the pruned ones) and write the weights' bits."""
        raise NotImplementedError

    def pruned_per_layer(self) -> list[int]:
        return torch.stack([s.sum() for s in self.pruned]).tolist()  # one read from the device, not one per layer

    def pruned_groups(self) -> int:
        return sum(self.pruned_per_layer())

    def clear(self) -> None:
        for s in self.pruned:
            s.zero_()
        self._rewrite_attached()

    def state_dict(self) -> dict:
        return {"pruned": [s.clone() for s in self.pruned]}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.pruned, state.get("pruned", [])):
            mine.copy_(saved)
        self._rewrite_attached()

    def _rewrite_attached(self) -> None:
        pass

    @staticmethod
    def _keys(mean: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
        mean = mean.float().add_(0.0)  # -0.0 becomes +0.0: one key for a zero score
        keys = floats_to_keys_(mean.reshape(-1).contiguous())
        return keys.masked_fill_(pruned.reshape(-1), torch.iinfo(torch.int32).min)


class Block(GroupStructure):
    kind = "block"
    group = "tile"

    def __init__(self, rows: int, cols: int):
        if rows < 1 or cols < 1:
            raise ValueError(f"block {rows}x{cols}: both sides must be at least 1")
        self.rows, self.cols = rows, cols

    def split(self, named_params):
        pool, excluded = [], []
        for name, p in named_params:
            out, inner = _matrix_shape(p) if p.dim() >= 2 else (0, 0)
            if p.dim() < 2:
                excluded.append({"name": name, "reason": "a 1-D parameter has no tiles"})
            elif out % self.rows or inner % self.cols:
                excluded.append({"name": name, "reason": f"[{out}, {inner}] is not tiled by {self.rows}x{self.cols}"})
            else:
                pool.append((name, p))
        return pool, excluded

    def bind(self, masks) -> None:
        super().bind(masks)
        self.tiles = [(_matrix_shape(p)[0] // self.rows, _matrix_shape(p)[1] // self.cols) for p in masks.params]
        self.pruned = [torch.zeros(t, dtype=torch.bool, device=p.device) for t, p in zip(self.tiles, masks.params)]
        masks.group_state = self.pruned
        self.means: list[torch.Tensor | None] = [None] * len(self.pruned)

    def layer_sizes(self) -> list[int]:
        return [r * c for r, c in self.tiles]

    def layer_rows(self) -> list[tuple[int, int]]:
        return list(self.tiles)

    def group_score_bytes(self, i) -> int:
        return 4 * sum(r * c for r, c in self.tiles[:i])  # the float32 tile means of the parameters before it

    def add_scores(self, i, scores) -> None:
        tr, tc = self.tiles[i]
        self.means[i] = scores.view(tr, self.rows, tc, self.cols).mean(dim=(1, 3))

    def group_keys(self) -> list[torch.Tensor]:
        keys = [self._keys(mean, pruned) for mean, pruned in zip(self.means, self.pruned)]
        self.means = [None] * len(self.pruned)
        return keys

    def apply(self, selected) -> None:
        for i, sel in enumerate(selected):
            tr, tc = self.tiles[i]
            self.pruned[i].copy_(sel.view(tr, tc))
            inner = tc * self.cols
            per = max(8, (CHUNK // (self.rows * inner)) // 8 * 8)  # whole bytes per chunk of tile rows
            bits = self.masks.bits[i]
            for t0 in range(0, tr, per):
                part = self.pruned[i][t0:t0 + per]
                weights = part[:, None, :, None].expand(part.shape[0], self.rows, tc, self.cols).reshape(-1)
                start = t0 * self.rows * inner
                bits[start // 8:start // 8 + (weights.numel() + 7) // 8] = pack_bits(weights)

    def target_weights(self, target_groups) -> int:
        return target_groups * self.rows * self.cols

    def pruned_weights(self, selected_groups) -> int:
        return self.masks.count()  # from the bits: checks that tiles were written whole

    def describe(self) -> dict:
        return {**super().describe(), "rows": self.rows, "cols": self.cols}
