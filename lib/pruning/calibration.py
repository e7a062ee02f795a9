"""Calibration: what the pruned layers see, read from a few training batches.

Wanda and SparseGPT score a weight by the inputs of its layer. Before each of
their mask updates, `Calibration` runs CALIBRATION_BATCHES batches through
the model in eval mode without gradients, with a forward hook on every
nn.Linear and nn.Conv2d that owns a pruned weight, and accumulates per layer
what the method reads, in float32:

- "norms": the sum of x_j^2 over every input row, per input column j
  (size in_features), and the row count;
- "hessian": the sum of x x^T over every input row (in x in), and the count.

A convolution's input rows are its unfolded patches, so column j matches
column j of weight.view(out, -1). The batches come from the trainer
(Task.calibration_batches): from the training split only, drawn by their own
generator seeded from SEED, so calibrating neither advances the training
stream nor reads validation data, and every update (and every rank) sees the
same batches. Under DDP each rank runs its share of them and the sums are
averaged across ranks, so every rank ends with the same statistics.
A pruned parameter that is not the weight of exactly one such layer (GPT-2's
tied token embedding) has no inputs to read: a configuration error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lib import distributed
from lib.errors import KpruneError

KINDS = ("norms", "hessian")
SEED_OFFSET = 104_729  # calibration draws from SEED + this: a stream of its own, not training's nor validation's


def calibration_generator(seed: int) -> torch.Generator:
    """A fresh generator for a run's calibration batches: the same batches at every update and on every rank."""
    return torch.Generator().manual_seed(seed + SEED_OFFSET)


def sample_indices(n_items: int, batch_size: int, batches: int, seed: int) -> list[torch.Tensor]:
    """`batches` random index batches into a training set of `n_items`, from the calibration generator."""
    gen = calibration_generator(seed)
    return [torch.randint(n_items, (batch_size,), generator=gen) for _ in range(batches)]


@dataclass
class LayerInputs:
    """What one layer's calibration inputs gave: `sums` (per column, or the in x in Hessian sum) over `count` rows."""

    sums: torch.Tensor
    count: float


def owning_layers(model: nn.Module, names: list[str], params: list[nn.Parameter], method: str) -> list[nn.Module]:
    """The nn.Linear or nn.Conv2d whose weight each pruned parameter is; KpruneError names one that has none."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
            users.setdefault(id(p), []).append((module_name or "the model itself", module))
    layers = []
    for name, p in zip(names, params):
        found = users.get(id(p), [])
        kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in found) or "no module of the model"
        layer = found[0][1] if len(found) == 1 else None
        ok = isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.weight is p
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or isinstance(layer.padding, str)
                                             or layer.padding_mode != "zeros"):
            ok = False
            kinds += " with groups, padding by name or a padding mode other than zeros"
        if not ok:
            raise KpruneError(f"{name} is pruned by {method}, which reads the inputs of the one nn.Linear or "
                              f"nn.Conv2d layer whose weight it is, but it is used by {kinds}; leave it out of the "
                              "pool (GPT-2: PRUNE_EMBEDDINGS=n) or choose another PRUNING_METHOD")
        layers.append(layer)
    return layers


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows [n, columns of weight.view(out, -1)], float32."""
    if isinstance(layer, nn.Conv2d):
        x = F.unfold(x.float(), layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                     stride=layer.stride)  # [batch, in * kh * kw, positions], the weight's column order
        return x.transpose(1, 2).reshape(-1, x.shape[1])
    return x.float().reshape(-1, x.shape[-1])


class Calibration:
    """Reads the inputs of the layers that own `params` over `count` batches from `batches`."""

    def __init__(self, model: nn.Module, names: list[str], params: list[nn.Parameter],
                 batches: Callable[[int], list[tuple]] | None, count: int | None,
                 forward: Callable[[nn.Module, tuple], object], method: str):
        self.model, self.batches, self.count, self.forward, self.method = model, batches, count, forward, method
        self.layers = owning_layers(model, names, params, method)
        if batches is None:
            raise KpruneError(f"{method} reads calibration batches, which this trainer does not supply "
                              "(Task.calibration_batches); choose another PRUNING_METHOD")
        if not count or count < 1:
            raise KpruneError(f"CALIBRATION_BATCHES={count} must be at least 1")

    @torch.no_grad()
    def __call__(self, kind: str) -> list[LayerInputs]:
        """One LayerInputs per pruned parameter, in pool order."""
        if kind not in KINDS:
            raise ValueError(f"unknown calibration statistic '{kind}' (one of: {', '.join(KINDS)})")
        device = self.layers[0].weight.device
        # One accumulator per layer, made before the pass in pool order: under DDP every rank then
        # reduces the same tensors in the same order, whichever layers its batches reached.
        seen: dict[int, LayerInputs] = {}
        for layer in self.layers:
            cols = layer.weight[0].numel()  # columns of weight.view(out, -1)
            shape = (cols,) if kind == "norms" else (cols, cols)
            seen[id(layer)] = LayerInputs(torch.zeros(shape, dtype=torch.float32, device=device), 0.0)

        def hook(layer, inputs, _output):
            rows, stats = input_rows(layer, inputs[0]), seen[id(layer)]
            if kind == "norms":
                stats.sums.add_(rows.square().sum(0))
            else:
                stats.sums.addmm_(rows.T, rows)
            stats.count += rows.shape[0]

        handles = [layer.register_forward_hook(hook) for layer in dict.fromkeys(self.layers)]
        training = self.model.training
        rank, world = distributed.world()
        try:
            self.model.eval()
            for i, batch in enumerate(self.batches(self.count)):
                if i % world == rank:  # under DDP each rank runs its share
                    self.forward(self.model, batch)
        finally:
            for h in handles:
                h.remove()
            self.model.train(training)
        if world > 1:
            for stats in seen.values():
                distributed.mean_(stats.sums)
                stats.count = float(distributed.mean_(torch.tensor([stats.count], dtype=torch.float64,
                                                                   device=device)).item())
        out = [seen[id(layer)] for layer in self.layers]
        for layer, stats in zip(self.layers, out):
            if stats.count == 0:
                raise KpruneError(f"{self.method}: no calibration input reached a {type(layer).__name__} whose "
                                  "weight is pruned (the model's forward pass never calls it)")
        return out
