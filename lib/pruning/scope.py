"""Selection scope: among which groups the lowest scores are taken, and how many in each.

- global: one ranking over the whole pool, round(s x groups) pruned.
- layer: every layer (a parameter; for channel a unit family) to round(s x its groups).
- layer-adaptive: seed 003's depth scaling (what bitter4 means), the total
  exactly round(s x groups), no layer beyond 0.95 (or the structure's own cap).
- row: every output row to round(s x its groups), Wanda's comparison group.

Counts never go below what is already pruned (pruned groups carry the lowest
key, so they are always among the selected). Ties at the threshold are
broken by the tie hash of each weight's or group's index in the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.pruning.registry import LAYER_CAP, REFUSED_SCOPES, SCOPES
from lib.pruning.selection import iter_selection, kth_threshold, tie_hash


def target_count(sparsity: float, numel: int) -> int:
    """Weights to prune for `sparsity` of `numel`: rounded half up, as documented."""
    return min(numel, int(sparsity * numel + 0.5))


def layer_adaptive_counts(k: int, sizes: list[int], floor: list[int] | None = None,
                          cap: float = LAYER_CAP) -> list[int]:
    """Per-layer pruned counts for depth-scaled sparsity that sum to the global target exactly.

    With s = k / (all weights), layer i of L gets min(0.95, c * s * (0.7 + 0.6 * i / (L - 1))); the factor c
    is found by bisection so the fractions add up to s over all weights, and
    the counts are rounded by largest remainder. `floor` (weights already
    pruned per layer) is respected: no layer's count goes down. Sizes may
    count groups (tiles, units) instead of weights; `cap` lowers the 0.95
    per-layer cap where a structure allows less (N:M: (M-N)/M).
    """
    n_layers, total = len(sizes), sum(sizes)
    sparsity = k / total
    floor = floor or [0] * n_layers
    if k <= sum(floor):
        return list(floor)
    scales = [0.7 + 0.6 * i / (n_layers - 1) if n_layers > 1 else 1.0 for i in range(n_layers)]
    capacity = sum(int(cap * n) for n in sizes)
    if k > capacity:
        raise ValueError(f"sparsity {sparsity:.4g} cannot be reached with every layer capped at {cap}")

    def fractions(c: float) -> list[float]:
        return [min(cap, c * sparsity * sc) for sc in scales]

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
    counts = [max(fl, min(int(x), int(cap * n))) for x, n, fl in zip(ideal, sizes, floor)]
    # Hand out (or take back) the remainder one weight at a time, largest remainder first.
    order = sorted(range(n_layers), key=lambda i: (-(ideal[i] - int(ideal[i])), i))
    while sum(counts) < k:
        for i in order:
            if sum(counts) < k and counts[i] < int(cap * sizes[i]):
                counts[i] += 1
    while sum(counts) > k:
        for i in reversed(order):
            if sum(counts) > k and counts[i] > floor[i]:
                counts[i] -= 1
    return counts


@dataclass(frozen=True)
class Counts:
    """How many groups an update prunes: in all (`total`) and, unless the scope is global, where."""

    total: int
    per_layer: list[int] | None = None  # layer and layer-adaptive scope
    per_row: list[int] | None = None    # row scope: groups pruned in every row of each layer


def scope_counts(scope: str, s, sparsity: float) -> Counts:
    """The groups `scope` asks structure `s` to prune at `sparsity`, never fewer than are pruned (no revival)."""
    if scope == "global":
        return Counts(max(target_count(sparsity, sum(s.layer_sizes())), s.pruned_groups()))
    if scope == "row":
        rows = s.layer_rows()
        per_row = [target_count(sparsity, cols) for _, cols in rows]
        return Counts(sum(r * c for (r, _), c in zip(rows, per_row)), per_row=per_row)
    sizes, floor = s.layer_sizes(), s.pruned_per_layer()
    if scope == "layer":
        per_layer = [max(target_count(sparsity, n), f) for n, f in zip(sizes, floor)]
        return Counts(sum(per_layer), per_layer=per_layer)
    k = max(target_count(sparsity, sum(sizes)), sum(floor))
    return Counts(k, per_layer=layer_adaptive_counts(k, sizes, floor, cap=min(LAYER_CAP, s.cap())))


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


def select_groups(keys: list[torch.Tensor], counts: Counts, layer_rows) -> list[torch.Tensor]:
    """Bool selection of the groups `counts` asks for, per layer, from each layer's small int32 group keys.

    Ties are broken by the tie hash of each group's index in the pool of groups.
    """
    offsets = [0]
    for key in keys[:-1]:
        offsets.append(offsets[-1] + key.numel())
    if counts.per_row is not None:
        return [row_select(key.view(rows, cols), c, first).reshape(-1)
                for key, (rows, cols), c, first in zip(keys, layer_rows(), counts.per_row, offsets)]
    if counts.per_layer is not None:
        return [lowest([key], count, first)[0] for key, count, first in zip(keys, counts.per_layer, offsets)]
    return lowest(keys, counts.total, 0)


def lowest(keys: list[torch.Tensor], k: int, first_index: int) -> list[torch.Tensor]:
    """Bool flags of the k lowest of `keys` taken together, one tensor per key tensor."""
    out = [torch.zeros(key.numel(), dtype=torch.bool, device=key.device) for key in keys]
    if k:
        thr = kth_threshold(keys, k)
        for j, start, selected in iter_selection(keys, thr, first_index=first_index):
            out[j][start:start + selected.numel()] = selected
    return out


def check_scope(scope: str | None, structure) -> str:
    """`scope` (default global), if it exists and makes sense with `structure`."""
    scope = scope or "global"
    if scope not in SCOPES:
        raise ValueError(f"unknown sparsity scope '{scope}' (one of: {', '.join(SCOPES)})")
    if (structure.kind, scope) in REFUSED_SCOPES:
        raise ValueError(f"SPARSITY_SCOPE={scope} with SPARSITY_STRUCTURE={structure.kind}: "
                         f"{REFUSED_SCOPES[(structure.kind, scope)]}")
    return scope
