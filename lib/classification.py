"""Loss and evaluation shared by the image-classification trainers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib import distributed


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> dict:
    """Mean loss and accuracy over the whole held-out set (under DDP each rank takes a share of the batches)."""
    def sums(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb).float()
        loss = F.cross_entropy(logits, yb, reduction="sum").double()
        return torch.stack([loss, (logits.argmax(1) == yb).sum().double()])
    batches = zip(x.split(batch_size), y.split(batch_size))
    total_loss, correct = distributed.shard_sum(((lambda b=b: sums(*b)) for b in batches), device)
    return {"val_loss": total_loss / len(y), "val_accuracy": int(correct) / len(y)}
