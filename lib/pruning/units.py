"""Channel units: what a trainer tells the pruner about its model's neurons, heads and filters.

A unit is removed whole: its output row (or rows) in one layer, the matching
bias and normalisation entries, and the matching input columns of the layer
that reads it. The model files know nothing about pruning, so each trainer
describes its units (`Task.units`) and lib/pruning stays model-agnostic.

Units come in families of equal units (one layer's neurons, one block's
heads): a family is a few slices, and a slice says, for every unit of the
family at once, which indices along one dimension of one parameter belong to
it (`index[u]` for unit u). Families are listed in depth order: the
layer-adaptive scope scales them by that order, and the layer scope prunes
each family to the same fraction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class UnitSlice:
    """Entries index[u] along dimension `dim` (0: output rows, 1: input columns) of `param` belong to unit u."""

    name: str
    param: nn.Parameter
    dim: int
    index: torch.Tensor  # int64 [units, entries per unit]

    def __post_init__(self):
        if self.dim not in (0, 1) or self.dim >= self.param.dim():
            raise ValueError(f"unit slice of {self.name}: dim {self.dim} must be 0 or 1 and exist in the parameter")
        if self.index.dim() != 2 or int(self.index.max()) >= self.param.shape[self.dim]:
            raise ValueError(f"unit slice of {self.name}: index must be [units, per unit] within dim {self.dim}")


@dataclass(frozen=True)
class UnitFamily:
    """`count` units of one kind and place, e.g. the MLP neurons of block 3."""

    name: str
    slices: tuple[UnitSlice, ...]

    @property
    def count(self) -> int:
        return self.slices[0].index.shape[0]

    def __post_init__(self):
        if any(s.index.shape[0] != self.count for s in self.slices):
            raise ValueError(f"unit family {self.name}: every slice must list the same number of units")


@dataclass
class Units:
    """A model's channel units, and why the prunable parameters no unit covers are left out."""

    families: list[UnitFamily]
    left_out: dict[str, str] = field(default_factory=dict)  # parameter name -> reason


def consecutive(name: str, param: nn.Parameter, dim: int, units: int, per_unit: int = 1) -> UnitSlice:
    """Unit u owns entries u*per_unit ... (u+1)*per_unit - 1 along `dim`."""
    return UnitSlice(name, param, dim, torch.arange(units * per_unit).view(units, per_unit))


def attention_heads(name: str, param: nn.Parameter, n_head: int, width: int) -> UnitSlice:
    """Head h of a fused q|k|v projection (rows [q; k; v], each `width` wide): its rows in all three."""
    head = width // n_head
    base = torch.arange(n_head * head).view(n_head, head)
    return UnitSlice(name, param, 0, torch.cat([base, base + width, base + 2 * width], dim=1))
