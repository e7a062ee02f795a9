"""The sampled window of the global selection on the CPU (lib/pruning/window.py, select.c's kprune_score_window).

A sample of the keys picks a window [lo, hi]; the pass that scores the weights writes the bits of the keys
below it and keeps those inside with their positions, the k-th key is found among the kept ones, and one pass
zeroes the selected weights. Whatever the sample, the result must be the exact selection: the same masks,
weights and states as the histogram passes give (a window that misses the k-th key, or holds more keys than
a buffer keeps, falls back to them before anything is changed), ties broken alike; and it adds no memory.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.pruning import selection, update_pass, window
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.pruning.update_pass import UpdatePass
from tests.allocations import allocation_peaks

SHAPES = [(2048, 2048), (700, 300), (37, 9)]  # 4,404,637 weights: a pool that takes the window (the last
# tensor ends inside a byte of its bits)


def _run(variant: str, use_window: bool, monkeypatch, weights=None, lr: float = 1e-2,
         peaks: list | None = None, spent: bool = True) -> tuple[Pruner, list]:
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
        monkeypatch.setattr(UpdatePass, "_sample_window", lambda *args: (0, None))
    g = torch.Generator().manual_seed(7)
    for step in (1, 2, 3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        update = (lambda: pruner.after_step(step)) if spent else (lambda: pruner.update(step))
        if peaks is not None and step == 3:
            peaks.append(allocation_peaks(update))
        else:
            update()
    monkeypatch.undo()
    return pruner, params


def _state(pruner: Pruner, params) -> list[torch.Tensor]:
    out = [b.clone() for b in pruner.masks.bits] + [p.detach().clone() for p in params]
    for p in params:
        out += [pruner.optimizer.state[p]["exp_avg"].clone(), pruner.optimizer.state[p]["exp_avg_sq"].clone()]
    return out


def _spy_window(monkeypatch) -> list:
    """Records what each selection's window gave: its threshold, or None (a fallback)."""
    results = []
    real = window.window_threshold

    def spy(finds, below, k, spare):
        found = real(finds, below, k, spare)
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
    assert len(found) == 2 and all(f is not None for f in found)
    assert any(f.ties < f.equal for f in found)  # a tie the window's threshold leaves to be broken
    histograms = _state(*_run("magnitude", False, monkeypatch, weights=grid, lr=0.0))
    assert all(torch.equal(a, b) for a, b in zip(windowed, histograms))
    # More tied keys to choose among than the C passes take on: the window gives up, the histograms select.
    monkeypatch.setattr(window, "TIES_SETTLED_AT_MOST", 10)
    found = _spy_window(monkeypatch)
    many = _state(*_run("magnitude", True, monkeypatch, weights=grid, lr=0.0))
    assert found == [None, None]
    assert all(torch.equal(a, b) for a, b in zip(many, histograms))


@pytest.mark.parametrize("miss", ["below", "above"])
def test_a_window_that_misses_the_kth_key_falls_back_to_the_histograms(miss, monkeypatch):
    real = window.choose_window

    def bad(sample, n, k):
        lo, hi = real(sample, n, k)
        if miss == "below":  # the whole window below the k-th key: too few keys below and inside
            return lo - 2 ** 20, lo - 2 ** 20 + 1
        return hi + 1, hi + 2  # above it: more than k keys below the window
    monkeypatch.setattr(window, "choose_window", bad)
    found = _spy_window(monkeypatch)
    windowed = _state(*_run("bitter7", True, monkeypatch))
    assert found == [None, None]  # both updates fell back
    histograms = _state(*_run("bitter7", False, monkeypatch))
    assert all(torch.equal(a, b) for a, b in zip(windowed, histograms))


def test_a_window_holding_more_keys_than_its_buffer_keeps_falls_back_to_the_histograms(monkeypatch):
    # Every key inside the window: no part of a buffer can keep them all (about half of it can), so each
    # update gives up the window before it changes anything and selects with the histograms; still exact.
    monkeypatch.setattr(window, "choose_window", lambda sample, n, k: (selection.INT32_MIN + 1, 2 ** 31 - 1))
    overflowed, real = [], update_pass.score_window

    def spy(*args):
        found = real(*args)
        overflowed.append(found is None)
        return found
    monkeypatch.setattr(update_pass, "score_window", spy)
    found = _spy_window(monkeypatch)
    windowed = _state(*_run("bitter7", True, monkeypatch))
    assert found == [] and overflowed == [True, True]  # each update's first tensor overflowed
    histograms = _state(*_run("bitter7", False, monkeypatch))
    assert all(torch.equal(a, b) for a, b in zip(windowed, histograms))


@pytest.mark.parametrize("variant", ["bitter5", "bitter9"])
def test_a_window_across_zero_is_exact(variant, monkeypatch):
    # Signed scores give negative keys: a window from a negative lo to a positive hi spans less than 2**32 key
    # values, tested in 32 bits; widened across zero here.
    real = window.choose_window
    monkeypatch.setattr(window, "choose_window", lambda sample, n, k: (lambda lo, hi: (min(lo, 0) - (1 << 20), max(
        hi, 0) + (1 << 20)))(*real(sample, n, k)))
    found = _spy_window(monkeypatch)
    windowed = _state(*_run(variant, True, monkeypatch))
    assert len(found) == 2 and all(f is not None for f in found)
    histograms = _state(*_run(variant, False, monkeypatch))
    assert all(torch.equal(a, b) for a, b in zip(windowed, histograms))


def test_window_bounds_come_from_the_sample_and_a_mass_of_equal_keys_gets_none():
    torch.manual_seed(0)
    sample = torch.randint(-2 ** 30, 2 ** 30, (1 << 16,), dtype=torch.int32)
    n, k = 1 << 24, 1 << 23
    lo, hi = window.choose_window(sample, n, k)
    ordered = torch.sort(sample).values
    median = int(ordered[(1 << 15) - 1])
    assert lo < median < hi  # the k-th key's quantile lies inside
    inside = int(((sample >= lo) & (sample <= hi)).sum())
    assert 0.01 < inside / sample.numel() < 0.05  # a few percent of a 65,536-key sample
    # Half the keys exactly 0 (an earlier update's zeroed weights): the window would hold all of them.
    sample[: 1 << 15] = 0
    assert window.choose_window(sample, n, k) is None
    # The k-th key among pruned weights' (the lowest key): the window starts above them.
    sample[: 1 << 15] = selection.INT32_MIN
    chosen = window.choose_window(sample, n, k - (1 << 20))
    assert chosen is None or chosen[0] > selection.INT32_MIN


@pytest.mark.parametrize("spent", [True, False], ids=["spent-gradients", "own-buffers"])
def test_the_window_adds_no_memory(spent, monkeypatch):
    # In training (spent gradients) the sample's keys go into a spent gradient and the second pass counts in
    # the histogram's own counters: the update allocates what it does without the window, and records 0.
    # Called with live gradients it allocates the sample (recorded) beside its own score buffers.
    found = _spy_window(monkeypatch)
    peaks = []
    pruner, _ = _run("bitter7", True, monkeypatch, peaks=peaks, spent=spent)
    assert len(found) == 2 and found[1] is not None
    plain_peaks = []
    plain, _ = _run("bitter7", False, monkeypatch, peaks=plain_peaks, spent=spent)
    n = sum(a * b for a, b in SHAPES)
    if spent:
        assert pruner.peak_score_bytes == plain.peak_score_bytes == 0
        assert peaks[0].overall <= plain_peaks[0].overall, (peaks[0].overall, plain_peaks[0].overall)
    else:
        sample = 4 * sum(runs * length for runs, _, length in (window.sample_lines(a * b, n, window.sample_budget(n))
                                                               for a, b in SHAPES))
        assert plain.peak_score_bytes == 4 * n  # its own score buffers
        assert pruner.peak_score_bytes == 4 * n  # the sample is freed before they are made
        assert peaks[0].overall - plain_peaks[0].overall <= sample
