"""What each step of the exact mask update buys, measured in one process.

`python -m bench.update_variants` builds bench-pruning's layers (BENCH_SCALE,
BENCH_THREADS as there; BENCH_ROUNDS rounds, default 3) and runs the same
bitter7 update to 50% with later steps switched off one by one, the variants
alternating round by round (best of the rounds each, each update from the same
trained weights and moments), plus bench-pruning's streaming pass:

  now             everything: a sample of the keys sets a window; one C pass per weight scores it,
                  writes the bits of the keys below the window and keeps the keys inside it (no
                  key written); the threshold among those, their bits; a second pass zeroes the
                  selected weights from the bits (kprune's AdamW takes a pruned weight's moments
                  as 0 in its next step)
  moments_zeroed  the same, the second pass zeroing the moments too
  no_window       without the window: the keys written by the score pass, which counts their
                  first histogram, the second histogram in a pass over the keys, the bits and
                  the zeroing of weights and moments in one more (session 6 without its window)
  torch_scores    `no_window` with the scores as torch operations in cache-sized pieces (a GPU's
                  path: no window), the moments zeroed by the step
  whole_scores    and scores over whole tensors at once
  torch_store     and the bits and zeroing as torch passes (iter_selection, pack_bits, multiplies)
  before          no C at all, no window, moments zeroed: the update as it was before issue 18

Prints one JSON line: each variant's seconds and its ratio to the streaming
pass, and `differing_masks`: how many weights `torch_scores` selected
differently from `now` (torch's CPU square root may be one unit off in the
last place where select.c's is correctly rounded, so a weight whose bitter7
score lies within a unit of the threshold may go either way: a handful at
most), each later variant from `torch_scores` and `moments_zeroed`/`no_window`
from `now` (the same scores: 0); and `paths`: what each variant's last update
ran (C score passes, windows that held the threshold, C stores of the bits
from the keys). Like every
figure here, compare the ratios within one run.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from bench.knobs import knob
from bench.output import emit
from bench.pruning import layer_shapes, restorer
from lib.device import keep_freed_memory
from lib.optim import OPTIMIZERS
from lib.pruning import selection
from lib.pruning import scores as scores_module
from lib.pruning import update_pass, window
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.pruning.update_pass import UpdatePass
from lib.settings import Settings


def main() -> int:
    scale = knob("BENCH_SCALE", 1.0, minimum=0.02)
    torch.set_num_threads(knob("BENCH_THREADS", 2, minimum=1))
    rounds = knob("BENCH_ROUNDS", 3, minimum=1)
    keep_freed_memory()  # as bench-pruning and every CPU run
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape) * 0.02) for shape in layer_shapes(scale)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    settings = Settings(lr=1e-4, beta1=0.9, beta2=0.999, adam_eps=1e-8, amsgrad=False, weight_decay=0.1)
    optimizer = OPTIMIZERS["adamw"]([{"params": params, "weight_decay": 0.1}], settings)
    optimizer.step()
    pruner = Pruner([(f"w{i}", p) for i, p in enumerate(params)], Schedule("one-shot", start=1, end=1, final=0.5),
                    build_method("state", "bitter7"), optimizer, fuse_masking=True)  # as a training run builds it
    gradients = [p.grad.clone() for p in params]
    native, store, piece = selection._native, update_pass.store_selection, scores_module.SCORE_CHUNK
    one_pass, torch_scores = UpdatePass._native_keys_, lambda *a, **k: False
    sampled, unsampled = UpdatePass._sample_window, lambda *a: (0, None)
    whole = 1 << 62
    # (select.c, its store, the score chunk, the scoring pass, the window, whether the step zeroes the moments)
    variants = {"now": (native, store, piece, one_pass, sampled, True),
                "moments_zeroed": (native, store, piece, one_pass, sampled, False),
                "no_window": (native, store, piece, one_pass, unsampled, False),
                "torch_scores": (native, store, piece, torch_scores, unsampled, True),
                "whole_scores": (native, store, whole, torch_scores, unsampled, True),
                "torch_store": (native, lambda *a: False, whole, torch_scores, unsampled, True),
                "before": (lambda: None, lambda *a: False, whole, torch_scores, unsampled, False)}
    paths: dict[str, int] = {}  # what the last update of a variant ran: C score passes, windows, C stores

    def counted(fn, key: str, hit=bool):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            paths[key] += int(hit(out))
            return out
        return run
    window_threshold, window_pass = window.window_threshold, update_pass.score_window
    window.window_threshold = counted(window_threshold, "windows", lambda found: found is not None)
    update_pass.score_window = counted(window_pass, "c_scores", lambda found: True)
    restore = restorer(params, optimizer)  # each update from the trained state: the last one zeroed half of it

    def switch(name: str) -> None:
        c_select, c_store, chunk, scoring, sampling, pruner.fused_masking = variants[name]
        (selection._native, scores_module.SCORE_CHUNK, UpdatePass._sample_window) = c_select, chunk, sampling
        update_pass.store_selection = counted(c_store, "c_stores")
        UpdatePass._native_keys_ = counted(scoring, "c_scores")

    def update(name: str) -> float:
        switch(name)
        paths.update(c_scores=0, windows=0, c_stores=0)
        pruner.clear()
        restore()
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
    taken = {}
    for _ in range(rounds):
        for name in variants:
            best[name] = min(best[name], update(name))
            masks[name] = torch.cat([b.clone() for b in pruner.masks.bits])
            taken[name] = dict(paths)
        best["stream"] = min(best["stream"], stream())
    switch("now")
    window.window_threshold, update_pass.score_window = window_threshold, window_pass

    def differing(name: str) -> int:
        other = masks["now" if name in ("torch_scores", "no_window", "moments_zeroed") else "torch_scores"]
        return int(torch.bitwise_xor(masks[name], other).view(-1, 1).bitwise_and(
            (1 << torch.arange(8, dtype=torch.uint8))).ne(0).sum())

    emit({"benchmark": "update-variants", "params": sum(p.numel() for p in params), "scale": scale,
          "differing_masks": {name: differing(name) for name in variants if name != "now"},
          "paths": taken,
          **{f"{name}_s": round(t, 6) for name, t in best.items()},
          **{f"{name}_vs_stream": round(best[name] / best["stream"], 2) for name in variants}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
