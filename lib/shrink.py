"""Cutting removable channel units out of a model's tensors: the model-independent half of a smaller model.

A model describes its units (neurons, heads, filters) as lib/pruning/units.py
says. A unit is removable when its output weights, its entries in the input
columns of the layer that reads it (its slices along dimension 1), are all
zero: then nothing it computes reaches the rest of the model, whatever its
own weights, bias or BatchNorm shift hold. Channel pruning zeroes those
columns with the unit (and its rows, bias and BatchNorm scale and shift), so
every unit it pruned is removable; any other structure yields one only where
it happened to zero a unit's whole output.

Removing a unit cuts its entries out of every tensor its slices name, and a
BatchNorm's running mean and variance go with its scale and shift. The
smaller model computes what the full one does up to the order of
floating-point sums. Each model's shrink (gpt2/, lenet5/, resnet/shrink.py)
builds its smaller model around `shrunk_state`: GPT-2 from the kept counts,
LeNet-5 and ResNet from the cut tensors' shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.pruning.units import Units

BATCHNORM_ENTRIES = ("weight", "bias", "running_mean", "running_var")


@torch.no_grad()
def kept_units(units: Units, at_least: int = 0) -> list[torch.Tensor]:
    """Per family, the units to keep (ascending indices): those whose output weights are not all zero.

    A family keeps at least `at_least` units even if more are removable (an
    extra one adds exactly nothing: its output weights are zero); a model
    that cannot hold a layer of width 0 (torch's BatchNorm) asks for 1.
    """
    kept = []
    for family in units.families:
        outputs = [s for s in family.slices if s.dim == 1]
        if not outputs:
            raise ValueError(f"unit family {family.name} names no input columns of a reading layer (a slice "
                             "along dimension 1): its units' output weights are unknown, so none can be removed")
        alive = torch.zeros(family.count, dtype=torch.bool)
        for s in outputs:
            w = s.param.detach()
            column_used = w.ne(0).transpose(0, 1).reshape(w.shape[1], -1).any(dim=1).cpu()
            alive |= column_used[s.index].any(dim=1)
        dead = (~alive).nonzero().flatten()
        missing = max(0, min(at_least, family.count) - int(alive.sum()))
        alive[dead[:missing]] = True
        kept.append(alive.nonzero().flatten())
    return kept


@torch.no_grad()
def shrunk_state(model: nn.Module, units: Units, kept: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model`'s state_dict with every unit `kept` leaves out cut from each tensor its slices name."""
    names = {id(p): n for n, p in model.named_parameters()}
    removed: dict[tuple[str, int], torch.Tensor] = {}  # (tensor name, dimension) -> which indices go
    for family, keep in zip(units.families, kept, strict=True):
        gone = torch.ones(family.count, dtype=torch.bool)
        gone[keep] = False
        for s in family.slices:
            key = (names[id(s.param)], s.dim)
            flags = removed.setdefault(key, torch.zeros(s.param.shape[s.dim], dtype=torch.bool))
            flags[s.index[gone].flatten()] = True
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            entries = [f"{prefix}.{e}" for e in BATCHNORM_ENTRIES if f"{prefix}.{e}" in state]
            cuts = [removed[(e, 0)] for e in entries if (e, 0) in removed]
            if any(not torch.equal(c, cuts[0]) for c in cuts):
                raise ValueError(f"{prefix}: the units cut different channels from its scale and its shift")
            for e in entries if cuts else ():  # the running statistics follow the channels
                removed[(e, 0)] = cuts[0]
    out = dict(state)
    for (name, dim), flags in removed.items():
        out[name] = out[name].index_select(dim, (~flags).nonzero().flatten().to(out[name].device))
    return out
