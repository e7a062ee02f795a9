"""What each step of the exact mask update buys, measured in one process.

`python -m bench.update_variants` builds bench-pruning's layers (BENCH_SCALE,
BENCH_THREADS as there; BENCH_ROUNDS rounds, default 3) and runs the same
bitter7 update to 50% with later steps switched off one by one, the variants
alternating round by round (best of the rounds each), plus bench-pruning's
streaming pass:

  now           everything: scores in cache-sized pieces, C histograms, bits and zeroing in one C pass
  whole_scores  scores over whole tensors at once
  torch_store   and the bits and zeroing as torch passes (iter_selection, pack_bits, multiplies)
  before        and torch's histograms: the update as it was before issue 18

Prints one JSON line: each variant's seconds and its ratio to the streaming
pass, and `same_masks` (every variant selected the same weights). Like every figure here, compare the ratios within one run.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from bench.knobs import knob
from bench.output import emit
from bench.pruning import layer_shapes
from lib.optim import OPTIMIZERS
from lib.pruning import pruner as pruner_module
from lib.pruning import selection
from lib.pruning import scores as scores_module
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.settings import Settings


def main() -> int:
    scale = knob("BENCH_SCALE", 1.0, minimum=0.02)
    torch.set_num_threads(knob("BENCH_THREADS", 2, minimum=1))
    rounds = knob("BENCH_ROUNDS", 3, minimum=1)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape) * 0.02) for shape in layer_shapes(scale)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    settings = Settings(lr=1e-4, beta1=0.9, beta2=0.999, adam_eps=1e-8, amsgrad=False, weight_decay=0.1)
    optimizer = OPTIMIZERS["adamw"]([{"params": params, "weight_decay": 0.1}], settings)
    optimizer.step()
    pruner = Pruner([(f"w{i}", p) for i, p in enumerate(params)], Schedule("one-shot", start=1, end=1, final=0.5),
                    build_method("state", "bitter7"), optimizer)
    gradients = [p.grad.clone() for p in params]
    native, store, piece = selection._native, pruner_module.store_selection, scores_module.SCORE_CHUNK
    whole = 1 << 62
    variants = {"now": (native, store, piece), "whole_scores": (native, store, whole),
                "torch_store": (native, lambda *a: False, whole), "before": (lambda: None, lambda *a: False, whole)}

    def update(name: str) -> float:
        selection._native, pruner_module.store_selection, scores_module.SCORE_CHUNK = variants[name]
        pruner.clear()  # the weights pruned last time stay 0: half the scores are 0, as in bench-pruning
        for p, g in zip(params, gradients):
            if p.grad is None:
                p.grad = g.clone()
        t0 = time.perf_counter()
        pruner.after_step(1)
        return time.perf_counter() - t0

    outs = [torch.empty_like(p) for p in params]

    def stream() -> float:
        t0 = time.perf_counter()
        for p, out in zip(params, outs):
            torch.mul(p.detach(), optimizer.state[p]["exp_avg_sq"], out=out)
        return time.perf_counter() - t0

    update("now")
    stream()  # first touch
    best = {name: float("inf") for name in [*variants, "stream"]}
    masks = {}
    for _ in range(rounds):
        for name in variants:
            best[name] = min(best[name], update(name))
            masks[name] = torch.cat([b.clone() for b in pruner.masks.bits])
        best["stream"] = min(best["stream"], stream())
    selection._native, pruner_module.store_selection, scores_module.SCORE_CHUNK = native, store, piece
    emit({"benchmark": "update-variants", "params": sum(p.numel() for p in params), "scale": scale,
          "same_masks": all(torch.equal(m, masks["now"]) for m in masks.values()),
          **{f"{name}_s": round(t, 6) for name, t in best.items()},
          **{f"{name}_vs_stream": round(best[name] / best["stream"], 2) for name in variants}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
