"""The channel structure: whole units (neurons, heads, filters) pruned together.

The trainer describes its units (lib/pruning/units.py). A unit's score is the
mean of its weights' scores over every slice of it that is in the pool; a
weight two units share (a conv2 weight belongs to a conv2 filter and to the
conv1 filter it reads) counts in both means, and goes when either unit goes.
The unit's entries outside the pool (biases, BatchNorm scale and shift) are
attached to the masks: zeroed with the unit, with their gradients and
optimizer states, every step.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.pruning.masks import CHUNK, pack_bits
from lib.pruning.structure import GroupStructure
from lib.pruning.units import Units


def _sums_along(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Float64 sums of `scores` over every dimension but `dim`, one per index along `dim`.

    sum(dtype=float64) first copies its whole input to float64 (twice the float32 scores' size):
    summed in chunks along `dim`, only one chunk is copied at a time (4 MiB, or 64 indices if more).
    Each sum is still taken over the same values in the same order, so the results are the same
    bits; a chunk of one index would not be (a single sum is reduced by a different kernel).
    """
    if scores.dim() == 1:
        return scores.double()
    other = [d for d in range(scores.dim()) if d != dim]
    size = scores.shape[dim]
    per = max(64, (CHUNK // 2) // (scores.numel() // size))
    along = torch.empty(size, dtype=torch.float64, device=scores.device)
    for a0 in range(0, size, per):
        n = min(per, size - a0)
        torch.sum(scores.narrow(dim, a0, n), dim=other, dtype=torch.float64, out=along.narrow(0, a0, n))
    return along


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
        masks.group_state = self.pruned
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

    def group_score_bytes(self, i) -> int:
        return 8 * sum(f.count for f in self.units.families)  # every family's float64 sums, from begin()

    def add_scores(self, i, scores) -> None:
        for fi, s in self.scored[i]:
            along = _sums_along(scores, s.dim)
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
            # An index goes when any unit it belongs to goes; counted by index_add_, not picked out by a
            # boolean index, which would wait for the device once per slice.
            index = s.index.to(p.device)
            hits = torch.zeros(p.shape[s.dim], dtype=torch.int32, device=p.device)
            hits.index_add_(0, index.reshape(-1), self.pruned[fi][:, None].expand(index.shape).reshape(-1).int())
            flags |= hits > 0
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
        totals = []  # per parameter, on the device: read once at the end, not once per parameter
        for p in self.masks.params:
            along = self._along(id(p))
            rows, cols = (along[d].sum() if d in along else torch.zeros((), dtype=torch.int64, device=p.device)
                          for d in (0, 1))
            rest = p.numel() // (p.shape[0] * p.shape[1]) if p.dim() > 1 else 1
            inputs = p.shape[1] if p.dim() > 1 else 1
            totals.append((rows * inputs + cols * p.shape[0] - rows * cols) * rest)
        return int(torch.stack(totals).sum())

    def pruned_weights(self, selected_groups) -> int:
        return self.masks.count()  # from the bits: checks them against the units

    def describe(self) -> dict:
        return {**super().describe(), "units": {f.name: f.count for f in self.units.families},
                "attached": len(self.attached)}
