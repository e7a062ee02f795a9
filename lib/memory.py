"""Memory accounting: bytes by kind, counted from the real tensors."""

from __future__ import annotations

import torch
from torch import nn


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_by_kind(model: nn.Module, optimizer: torch.optim.Optimizer, pruner=None) -> dict[str, int]:
    """Weights, gradients, each optimizer state and pruning state, in bytes.

    Tied parameters are counted once. Keys: weights, grads, optimizer.<state>
    (for example optimizer.exp_avg), masks, scores (persistent method buffers)
    and total.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    # Every trainable weight has a gradient during a step (a mask update may have
    # set them to None since, so they are counted from the weights).
    out: dict[str, int] = {"weights": sum(_nbytes(p) for p in params),
                           "grads": sum(_nbytes(p) for p in params if p.requires_grad)}
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"optimizer.{key}"] = out.get(f"optimizer.{key}", 0) + _nbytes(value)
    out["masks"] = pruner.masks.state_bytes() if pruner is not None else 0
    out["scores"] = sum(_nbytes(t) for t in pruner.score_buffers) if pruner is not None else 0
    out["total"] = sum(out.values())
    # Transient, not in the total: the most score memory a mask update held at once beyond the
    # spent gradients it writes scores into: buffers it had to allocate, the score's declared
    # chunk-sized intermediates, group scores (lib/pruning/update_pass.py; checked by tests with torch.profiler).
    out["mask_update_peak"] = pruner.peak_score_bytes if pruner is not None else 0
    return out
