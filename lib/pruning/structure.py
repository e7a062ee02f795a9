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
from lib.pruning.registry import (IMPLIED_SCOPE, LAYER_ADAPTIVE_VARIANTS, LAYER_CAP, NM_GROUP_LENGTHS,
                                  REFUSED_SCOPES, SCOPES, STRUCTURES)
from lib.pruning.selection import floats_to_keys_, tie_hash
from lib.pruning.units import Units

INT32_MAX = 2 ** 31 - 1


def structure_problems(s) -> list[tuple[str, str]]:
    """What is wrong with the structure and scope settings of `s`: (symbol, problem) pairs."""
    problems: list[tuple[str, str]] = []
    structure, scope = s.sparsity_structure or "unstructured", s.sparsity_scope or "global"
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
    implied = IMPLIED_SCOPE.get(s.variant)
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


def row_select(keys: torch.Tensor, count: int, first_index: int) -> torch.Tensor:
    """Bool [rows, cols]: the `count` lowest keys of every row of int32 `keys`.

    Ties are broken by the tie hash of each entry's index in the pool
    (`first_index` for keys[0, 0]), as in the global selection: the key and
    the hash are one int64, so each row has a strict order.
    """
    rows, cols = keys.shape
    if count == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=keys.device)
    index = torch.arange(first_index, first_index + rows * cols, device=keys.device)
    order = keys.reshape(-1).to(torch.int64).mul_(1 << 32).add_(tie_hash(index).to(torch.int64) + (1 << 31))
    order = order.view(rows, cols)
    kth = order.kthvalue(count, dim=1).values
    return order <= kth[:, None]


def _matrix_shape(p: nn.Parameter) -> tuple[int, int]:
    """A weight as a matrix [out, in * kh * kw]."""
    return p.shape[0], p.numel() // p.shape[0]


class Structure:
    """Unstructured sparsity, and the interface every structure gives the pruner."""

    kind = "unstructured"
    group = "weight"
    weight_level = True  # the selection runs over the weights' own keys (else over group keys)

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
        return [int(s.sum()) for s in self.pruned]

    def pruned_groups(self) -> int:
        return sum(self.pruned_per_layer())

    def clear(self) -> None:
        for s in self.pruned:
            s.zero_()
        self._rewrite_attached()

    def state_dict(self) -> dict:
        return {"pruned": [s.clone() for s in self.pruned]}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.pruned, state["pruned"]):
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
        self.means: list[torch.Tensor | None] = [None] * len(self.pruned)

    def layer_sizes(self) -> list[int]:
        return [r * c for r, c in self.tiles]

    def layer_rows(self) -> list[tuple[int, int]]:
        return list(self.tiles)

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


class Channel(GroupStructure):
    kind = "channel"
    group = "unit"

    def __init__(self, units: Units | None):
        if units is None or not units.families:
            raise ValueError("channel structure needs the model's units (Task.units): this model describes none")
        self.units = units

    def split(self, named_params):
        covered = {id(s.param) for f in self.units.families for s in f.slices}
        pool = [(n, p) for n, p in named_params if id(p) in covered]
        excluded = [{"name": n, "reason": self.units.left_out.get(n, "no channel unit covers it")}
                    for n, p in named_params if id(p) not in covered]
        return pool, excluded

    def bind(self, masks) -> None:
        super().bind(masks)
        families = self.units.families
        position = {id(p): i for i, p in enumerate(masks.params)}
        device = masks.params[0].device if masks.params else None
        self.pruned = [torch.zeros(f.count, dtype=torch.bool, device=device) for f in families]
        # Which (family, slice) touches each parameter; pool parameters are scored, the rest follow.
        self.touching: dict[int, list[tuple[int, object]]] = {}
        self.params: dict[int, nn.Parameter] = {}
        self.unit_weights = [0] * len(families)
        for fi, family in enumerate(families):
            for s in family.slices:
                self.touching.setdefault(id(s.param), []).append((fi, s))
                self.params[id(s.param)] = s.param
                if id(s.param) in position:
                    self.unit_weights[fi] += s.index.shape[1] * (s.param.numel() // s.param.shape[s.dim])
        self.scored = {i: [(fi, s) for fi, s in self.touching[id(p)]] for i, p in enumerate(masks.params)}
        # Biases, normalisation entries and other parameters of a unit outside the pool.
        self.attached = [pid for pid in self.touching if pid not in position]
        masks.attached = [(self.params[pid], torch.ones_like(self.params[pid], dtype=torch.bool))
                          for pid in self.attached]
        self.sums: list[torch.Tensor] = []

    def layer_sizes(self) -> list[int]:
        return [f.count for f in self.units.families]

    def layer_rows(self) -> list[tuple[int, int]]:
        raise ValueError("row scope is not defined for channel structure")

    def begin(self) -> None:
        self.sums = [torch.zeros(f.count, dtype=torch.float64, device=s.device)
                     for f, s in zip(self.units.families, self.pruned)]

    def add_scores(self, i, scores) -> None:
        for fi, s in self.scored[i]:
            other = [d for d in range(scores.dim()) if d != s.dim]
            along = scores.sum(dim=other, dtype=torch.float64) if other else scores.double()
            self.sums[fi] += along[s.index.to(along.device)].sum(dim=1)

    def group_keys(self) -> list[torch.Tensor]:
        keys = [self._keys(total / max(1, n), pruned)
                for total, n, pruned in zip(self.sums, self.unit_weights, self.pruned)]
        self.sums = []
        return keys

    def _along(self, pid: int) -> dict[int, torch.Tensor]:
        """Per dimension (0, 1) of a parameter: which of its indices belong to a pruned unit."""
        p = self.params[pid]
        out: dict[int, torch.Tensor] = {}
        for fi, s in self.touching[pid]:
            flags = out.setdefault(s.dim, torch.zeros(p.shape[s.dim], dtype=torch.bool, device=p.device))
            flags[s.index.to(p.device)[self.pruned[fi]].reshape(-1)] = True
        return out

    @staticmethod
    def _mask(p: nn.Parameter, along: dict[int, torch.Tensor], r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """The pruned entries of output rows r0:r1 of p, shaped [rows, in, rest]."""
        rows = p.shape[0] if r1 is None else r1
        if p.dim() == 1:
            return along.get(0, torch.zeros(p.shape[0], dtype=torch.bool, device=p.device))[r0:rows].view(-1, 1, 1)
        inputs, rest = p.shape[1], p.numel() // (p.shape[0] * p.shape[1])
        mask = torch.zeros(rows - r0, inputs, rest, dtype=torch.bool, device=p.device)
        if 0 in along:
            mask |= along[0][r0:rows].view(-1, 1, 1)
        if 1 in along:
            mask |= along[1].view(1, -1, 1)
        return mask

    def apply(self, selected) -> None:
        for fi, sel in enumerate(selected):
            self.pruned[fi].copy_(sel)
        for i, p in enumerate(self.masks.params):
            along = self._along(id(p))
            per_row = p.numel() // p.shape[0]
            per = max(8, (CHUNK // per_row) // 8 * 8)  # whole bytes per chunk of rows
            for r0 in range(0, p.shape[0], per):
                flags = self._mask(p, along, r0, min(p.shape[0], r0 + per)).reshape(-1)
                start = r0 * per_row
                self.masks.bits[i][start // 8:start // 8 + (flags.numel() + 7) // 8] = pack_bits(flags)
        self._rewrite_attached()

    def _rewrite_attached(self) -> None:
        for k, pid in enumerate(self.attached):
            p = self.params[pid]
            kept = self._mask(p, self._along(pid)).reshape(p.shape).logical_not_()
            self.masks.attached[k] = (p, kept)

    def target_weights(self, target_groups) -> int:
        """Weights the pruned units hold, counted from the units (rows and columns, each weight once)."""
        total = 0
        for p in self.masks.params:
            along = self._along(id(p))
            rows, cols = (int(along[d].sum()) if d in along else 0 for d in (0, 1))
            rest = p.numel() // (p.shape[0] * p.shape[1]) if p.dim() > 1 else 1
            inputs = p.shape[1] if p.dim() > 1 else 1
            total += (rows * inputs + cols * p.shape[0] - rows * cols) * rest
        return total

    def pruned_weights(self, selected_groups) -> int:
        return self.masks.count()  # from the bits: checks them against the units

    def describe(self) -> dict:
        return {**super().describe(), "units": {f.name: f.count for f in self.units.families},
                "attached": len(self.attached)}


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


def check_scope(scope: str, structure: Structure) -> str:
    scope = scope or "global"
    if scope not in SCOPES:
        raise ValueError(f"unknown sparsity scope '{scope}' (one of: {', '.join(SCOPES)})")
    if (structure.kind, scope) in REFUSED_SCOPES:
        raise ValueError(f"SPARSITY_SCOPE={scope} with SPARSITY_STRUCTURE={structure.kind}: "
                         f"{REFUSED_SCOPES[(structure.kind, scope)]}")
    return scope
