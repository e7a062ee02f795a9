"""Optimizers by name: a registry, so adding one is one entry.

`adamwprune` is not a separate update rule: it is an Adam-family base (a
Kconfig choice) whose own moments state-based pruning reads, so pruning
needs no extra score buffers. What it builds is exactly the base optimizer,
with the configured betas, epsilon, weight decay and AMSGrad.

Adam and AdamW run kprune's one-pass step (lib/fused_adam.py), dense and
pruned alike, so both arms of a comparison share the update arithmetic and
a pruned run's masking costs no pass of its own.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lib.fused_adam import KpruneAdam, KpruneAdamW
from lib.settings import Settings
from lib.spam import AdamWSPAM


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and kernels only; biases and norm parameters are never decayed."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _sgd(groups: list[dict], s: Settings) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.sgd_momentum)


def _adam(groups: list[dict], s: Settings) -> torch.optim.Optimizer:
    return KpruneAdam(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.adam_eps, amsgrad=s.amsgrad)


def _adamw(groups: list[dict], s: Settings) -> torch.optim.Optimizer:
    return KpruneAdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.adam_eps, amsgrad=s.amsgrad)


def _adamwspam(groups: list[dict], s: Settings) -> torch.optim.Optimizer:
    return AdamWSPAM(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.adam_eps, amsgrad=s.amsgrad,
                     theta=s.spam_theta, interval=s.spam_interval, warmup=s.spam_warmup)


OPTIMIZERS: dict[str, Callable[[list[dict], Settings], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adamwspam": _adamwspam,
}


def base_optimizer_name(s: Settings) -> str:
    return s.adamwprune_base if s.optimizer == "adamwprune" else s.optimizer


def build_optimizer(model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    return OPTIMIZERS[base_optimizer_name(s)](param_groups(model, s.weight_decay), s)


def describe(optimizer: torch.optim.Optimizer, s: Settings) -> dict:
    """What the run really optimised with, read back from the built optimizer, for summary.json."""
    g = optimizer.param_groups[0]
    keys = ("betas", "eps", "amsgrad", "momentum", "theta", "interval", "warmup")
    out = {"name": s.optimizer, "class": type(optimizer).__name__, "base": base_optimizer_name(s),
           "weight_decay": g["weight_decay"]}  # the decayed group's; 1-D parameters get 0
    out.update({k: list(g[k]) if isinstance(g[k], tuple) else g[k] for k in keys if k in g})
    return out
