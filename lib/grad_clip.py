"""Gradient clipping, inside kprune's Adam/AdamW step where it can be.

torch's `clip_grad_norm_` reads every gradient for the norm and then reads
and writes every gradient again to scale it; before it, a pruned run's
separate masking pass had to zero the pruned weights' gradients (reading the
weights, reading and writing the gradients), since the norm must not count
them. kprune's Adam/AdamW (lib/fused_adam.py) take both jobs into their one
pass: they leave out the gradient of an exactly-zero weight of a masked
parameter, and multiply every gradient by the clipping coefficient handed to
`step(grad_scale=...)`. What is left is the norm: one pass that reads every
gradient and, for a parameter the pruner masks, its packed mask bits (a byte
per 8 weights), and writes nothing.

The coefficient is torch's, min(1, max_norm / (norm + 1e-6)), computed with
torch's own float32 operations from the norm over every parameter's gradient,
leaving out the pruned weights' entries (their bits set; AdamWPrune's
reference masks the gradients before clipping alike). A weight that is
exactly 0 without being pruned (practically never: training would have to
land on 0.0) counts in the norm, though the masked step takes its gradient as
0. A masked parameter without bits (an optimizer used without the pruner)
leaves out the entries whose weight is exactly 0. On the CPU the sum of
squares is one threaded C pass per call (float64, the same result for any
thread count: lib/adam_step.c); elsewhere (CUDA, other dtypes, no C
compiler) torch operations take the same float64 sum. torch sums in float32,
so the norm may differ from torch's by float32 rounding (a few units in the
last place; tests/lib/test_grad_clip.py), and a finite gradient whose square
overflows float32 gives a finite norm here where torch's is inf. A non-finite
norm is used as torch uses it (error_if_nonfinite=False): the coefficient is
0 for inf and NaN for NaN, but the pruned weights stay 0 (the step masks
after scaling); the loop stops a run whose loss is not finite.

A dense run goes through the same path with nothing masked, so a pruned arm
and its dense baseline clip with the same arithmetic. Any other optimizer
(SGD, AdamWSPAM) keeps the pruner's masking pass and `clip_grad_norm_`.
"""

from __future__ import annotations

import math

import torch

from lib import fused_adam
from lib.pruning.masks import unpack_bits

PIECE = 1 << 22  # elements per float64 piece of the torch sum: bounds its temporaries (32 MB)


def takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer masks and scales the gradients inside its step (kprune's Adam/AdamW)."""
    return hasattr(optimizer, "masked_params")  # what the pruner checks before it masks inside the step


def _torch_sumsq(w: torch.Tensor, g: torch.Tensor, mask: bool, pruned: torch.Tensor | None) -> torch.Tensor:
    """The C pass's sum on any device and dtype, as torch operations: float64, 0-d, on g's device."""
    w, g = w.reshape(-1), g.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for start in range(0, g.numel(), PIECE):  # PIECE is a multiple of 8: a piece starts at a byte of bits
        x = g[start:start + PIECE].double()
        if mask and pruned is not None:
            x.masked_fill_(unpack_bits(pruned[start // 8:(start + x.numel() + 7) // 8], x.numel()), 0.0)
        elif mask:
            x.masked_fill_(w[start:start + PIECE] == 0, 0.0)
        total += torch.dot(x, x)
    return total


@torch.no_grad()
def masked_grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The float32 L2 norm of every gradient `optimizer` (kprune's Adam/AdamW) will use, 0-d on the
    parameters' device, leaving out for its `masked_params` the pruned weights' entries: those whose bit is
    set in the pruner's mask bits (`pruned_bits`), or, for a parameter masked without bits, whose weight
    is exactly 0."""
    masked, bits = optimizer.masked_params, getattr(optimizer, "pruned_bits", {})
    in_c, in_torch = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            pruned = bits.get(id(p))
            item = (p.detach(), p.grad, id(p) in masked, pruned)
            c_bits = pruned is None or (pruned.device.type == "cpu" and pruned.dtype == torch.uint8
                                        and pruned.is_contiguous())
            (in_c if c_bits and fused_adam.c_ready(p.detach(), p.grad) else in_torch).append(item)
    c_sum = fused_adam.grad_sumsq(in_c) if in_c else 0.0
    if c_sum is None:  # no C compiler: the same sum as torch operations
        in_torch, c_sum = in_c + in_torch, 0.0
    if not in_torch:  # every gradient on the CPU: the square root of the float64 sum, rounded once
        return torch.tensor(math.sqrt(c_sum), dtype=torch.float32)
    total = torch.stack([_torch_sumsq(*item) for item in in_torch]).sum() + c_sum
    return torch.sqrt(total).to(torch.float32)  # no wait for the device


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) in float32, with torch's clip_grad_norm_'s own operations."""
    return torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)


def clipped_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> None:
    """optimizer.step() with the gradients' global norm clipped to `max_norm` (0: no clipping).

    kprune's Adam/AdamW take the coefficient into their step; any other optimizer gets torch's
    clip_grad_norm_ over `params` first (the pruner's masking pass has then already run).
    """
    if max_norm <= 0:
        optimizer.step()
    elif takes_grad_scale(optimizer):
        optimizer.step(grad_scale=clip_coefficient(masked_grad_norm(optimizer), max_norm))
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
