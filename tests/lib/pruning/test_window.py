"""The sampled window of the global selection on the CPU (lib/pruning/window.py, select.c's window mode).

A sample of the keys picks a window [lo, hi]; the pass that writes the keys counts those below it and
collects those inside with their positions, and the k-th key is found among those. Whatever the sample,
the result must be the exact selection: the same masks, weights and states as the histogram passes give
(a window that misses the k-th key, or overflows, falls back to them), ties broken alike.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.pruning import selection, window
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.pruning.update_pass import UpdatePass
from tests.allocations import allocation_peaks

SHAPES = [(2048, 2048), (700, 300), (36, 8)]  # 4,404,592 weights: a pool that takes the window


def _run(variant: str, use_window: bool, monkeypatch, weights=None, lr: float = 1e-2,
         peaks: list | None = None) -> tuple[Pruner, list]:
    """Two updates (sparsity 0.45, then 0.9: the second keeps the first's pruned weights) of an AdamW-trained
    pool, with or without the window; returns the pruner and its parameters (and in `peaks` the allocations
    of the last update, measured)."""
    torch.set_num_threads(2)  # the window's finds come from two threads' parts
    params = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)) if weights is None
                           else weights(i, s)) for i, s in enumerate(SHAPES)]
    opt = torch.optim.AdamW(params, lr=lr)
    method = build_method("state", variant) if variant != "magnitude" else build_method("magnitude", None)
    pruner = Pruner([(f"w{i}", p) for i, p in enumerate(params)], Schedule("linear", start=1, end=3, final=0.9),
                    method, opt)
    if not use_window:
        monkeypatch.setattr(UpdatePass, "_set_window", lambda *args: 0)
    g = torch.Generator().manual_seed(7)
    for step in (1, 2, 3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if peaks is not None and step == 3:
            peaks.append(allocation_peaks(lambda: pruner.after_step(step)))
        else:
            pruner.after_step(step)
    monkeypatch.undo()
    return pruner, params


def _state(pruner: Pruner, params) -> list[torch.Tensor]:
    out = [b.clone() for b in pruner.masks.bits] + [p.detach().clone() for p in params]
    for p in params:
        out += [pruner.optimizer.state[p]["exp_avg"].clone(), pruner.optimizer.state[p]["exp_avg_sq"].clone()]
    return out


def _spy_window(monkeypatch) -> list:
    """Records what each selection's window gave: (threshold, tied positions) or None (a fallback)."""
    results = []
    real = window.window_threshold

    def spy(counters, k):
        found = real(counters, k)
        results.append(found)
        return found
    monkeypatch.setattr(window, "window_threshold", spy)
    return results


@pytest.mark.parametrize("variant", ["magnitude", "bitter7", "bitter5"])
def test_the_window_selects_exactly_what_the_histograms_select(variant, monkeypatch):
    found = _spy_window(monkeypatch)
    windowed = _state(*_run(variant, True, monkeypatch))
    assert len(found) == 2 and all(f is not None for f in found), found  # both updates took the window
    histograms = _state(*_run(variant, False, monkeypatch))
    assert all(torch.equal(a, b) for a, b in zip(windowed, histograms))
    assert len(windowed) == len(histograms)


def test_tied_keys_at_the_threshold_are_taken_as_the_histograms_take_them(monkeypatch):
    # Weights on a grid of 2,001 values (kept there: lr 0): hundreds of keys tie with the k-th, some selected.
    def grid(i, shape):
        return torch.randint(-1000, 1001, shape, generator=torch.Generator().manual_seed(i)).float() / 1000

    found = _spy_window(monkeypatch)
    windowed = _state(*_run("magnitude", True, monkeypatch, weights=grid, lr=0.0))
    ties = [f for f in found if f is not None and f[1] is not None]
    assert ties and all(f[0].ties < f[0].equal == f[1].numel() for f in ties)  # the window gave the tied positions
    histograms = _state(*_run("magnitude", False, monkeypatch, weights=grid, lr=0.0))
    assert all(torch.equal(a, b) for a, b in zip(windowed, histograms))


@pytest.mark.parametrize("miss", ["below", "above", "overflow"])
def test_a_window_that_misses_the_kth_key_falls_back_to_the_histograms(miss, monkeypatch):
    real = window.choose_window

    def bad(sample, n, k, threads):
        lo, hi, room = real(sample, n, k, threads)
        if miss == "below":  # the whole window below the k-th key: too few keys below and inside
            return lo - 2 ** 20, lo - 2 ** 20 + 1, room
        if miss == "above":  # above it: more than k keys below the window
            return hi + 1, hi + 2, room
        return lo, hi, 16  # room for 16 finds a thread
    monkeypatch.setattr(window, "choose_window", bad)
    found = _spy_window(monkeypatch)
    windowed = _state(*_run("bitter7", True, monkeypatch))
    assert found == [None, None]  # both updates fell back
    histograms = _state(*_run("bitter7", False, monkeypatch))
    assert all(torch.equal(a, b) for a, b in zip(windowed, histograms))


def test_window_bounds_come_from_the_sample_and_a_mass_of_equal_keys_gets_none():
    torch.manual_seed(0)
    sample = torch.randint(-2 ** 30, 2 ** 30, (1 << 16,), dtype=torch.int32)
    n, k = 1 << 24, 1 << 23
    lo, hi, room = window.choose_window(sample, n, k, 2)
    ordered = torch.sort(sample).values
    median = int(ordered[(1 << 15) - 1])
    assert lo < median < hi  # the k-th key's quantile lies inside
    inside = int(((sample >= lo) & (sample <= hi)).sum())
    assert 0.01 < inside / sample.numel() < 0.05  # a few percent of a 65,536-key sample
    assert room >= window.SLACK * n * inside / sample.numel() / 2
    # Half the keys exactly 0 (an earlier update's zeroed weights): the window would hold all of them.
    sample[: 1 << 15] = 0
    assert window.choose_window(sample, n, k, 2) is None
    # The k-th key among pruned weights' (the lowest key): the window starts above them.
    sample[: 1 << 15] = selection.INT32_MIN
    chosen = window.choose_window(sample, n, k - (1 << 20), 2)
    assert chosen is None or chosen[0] > selection.INT32_MIN


def test_the_window_memory_is_recorded_and_small(monkeypatch):
    found = _spy_window(monkeypatch)
    peaks = []
    pruner, _ = _run("bitter7", True, monkeypatch, peaks=peaks)
    assert len(found) == 2 and found[1] is not None
    n = sum(a * b for a, b in SHAPES)
    # The keys are in the spent gradients: what the update adds is the sample's keys (a cache line in 16
    # weights) and the finds (a few percent of the pool here, a fraction of a percent at GPT-2's size).
    recorded = pruner.peak_score_bytes
    assert 0 < recorded < 4 * n / 8
    plain_peaks = []
    plain, _ = _run("bitter7", False, monkeypatch, peaks=plain_peaks)
    assert plain.peak_score_bytes == 0
    # Recorded is what the window held, really held (measured) and all it adds to the update's allocations.
    assert recorded <= peaks[0].overall, (recorded, peaks[0].overall)
    assert peaks[0].overall - plain_peaks[0].overall <= recorded, (peaks[0].overall, plain_peaks[0].overall, recorded)
