"""The sampled window of the exact global selection on the CPU (select.c's window mode).

The exact k-th key of n keys takes two 65,536-bin histogram passes over every
key. The histogram's increments cost about as much as scoring the weights, and
the second pass reads every key again. A sample of the keys tells, before they
are written, a narrow window [lo, hi] that holds the k-th key unless the sample
was very unlucky: then the pass that writes the keys only counts the keys below
lo and collects the few inside the window (key and pool position), and the k-th
key is found among those. The result is exact whatever the sample: when the
window misses the k-th key (or holds more keys than were provided for), the
selection counts the histograms over the written keys instead (slower, same
answer).

The sample is 16 consecutive weights (one cache line) every so many weights,
spread over every tensor in proportion to its size, scored by the same C pass.
The window is the sample's quantiles WINDOW_SIGMAS binomial standard
deviations either side of k / n: about n * 2 * WINDOW_SIGMAS * sqrt(q (1 - q) / S)
keys (q = k / n, S the sample's size), 0.4% of the keys for GPT-2 124M.
"""

from __future__ import annotations

import math

import torch

from lib.pruning.selection import INT32_MIN, Counters, Threshold, kth_threshold

WINDOW_FROM = 1 << 22  # pools from this many weights (4M) take the window; below, the histograms are cheap
LINE = 16  # weights per sampled run: one 64-byte cache line of float32
SAMPLE_AT_MOST = 1 << 20  # sampled keys (4 MiB of keys, plus a tensor's sampled inputs while it is scored)
SAMPLE_EVERY = 16  # at most one weight in this many is sampled (a cache line in 16)
WINDOW_SIGMAS = 4.0  # the window misses the k-th key with probability ~6e-5 (then: the histograms)
WINDOW_AT_MOST = 1 / 16  # a window expected to hold more of the keys (a mass of equal keys) is not used
SLACK = 1.25  # each thread's room for finds, over its expected share


def sample_lines(numel: int, pool: int, budget: int) -> tuple[int, int, int]:
    """(runs, stride, length): `runs` runs of `length` (LINE, or a small tensor whole) consecutive elements,
    `stride` apart, that sample a tensor of `numel` of a pool of `pool` in proportion to its size,
    `budget` sampled elements in all."""
    if numel <= LINE:
        return 1, numel, numel
    runs = min(max(1, round(budget * numel / pool / LINE)), numel // LINE)
    return runs, numel // runs, LINE


def sample_budget(n: int) -> int:
    return min(SAMPLE_AT_MOST, max(LINE, n // SAMPLE_EVERY))


def choose_window(sample: torch.Tensor, n: int, k: int, threads: int) -> tuple[int, int, int] | None:
    """(lo, hi, room per thread) for the k lowest of n keys from a sample of them (flat int32); None where
    a window would not pay (it would hold a mass of equal keys, or the k-th key is a pruned weight's)."""
    s = sample.numel()
    q = k / n
    spread = WINDOW_SIGMAS * math.sqrt(q * (1 - q) * s) + 1
    a, b = math.floor(q * s - spread), math.ceil(q * s + spread)
    # The sampled keys below lo and up to hi, from the two order statistics (no temporaries of the sample's size).
    below_lo, lo = (a - t.ties, t.key) if a >= 1 and (t := kth_threshold([sample], a)).key > INT32_MIN else (0, None)
    upto_hi, hi = (b - t.ties + t.equal, t.key) if b <= s and (t := kth_threshold([sample], b)) else (s, 2 ** 31 - 1)
    if lo is None:  # pruned weights (the lowest key) are counted below the window, never collected
        lo, below_lo = INT32_MIN + 1, int((sample == INT32_MIN).sum()) if a >= 1 else 0
    if hi < lo:
        return None
    expected = n * (upto_hi - below_lo) / s
    if expected > n * WINDOW_AT_MOST:
        return None
    return lo, hi, math.ceil(SLACK * expected / threads) + 4096


def window_threshold(counters: Counters, k: int) -> tuple[Threshold, torch.Tensor | None] | None:
    """After a first pass in window mode: the exact threshold of the k lowest keys, and the pool positions of
    the keys equal to it when only some of those are selected (else None); None if the window did not hold
    the k-th key or overflowed (the caller counts the histograms instead)."""
    taken = counters.take_window()
    if taken is None:
        return None
    below, parts = taken
    inside = sum(part.numel() for part in parts)
    if not below < k <= below + inside:
        return None
    keys = [(part >> 32).to(torch.int32) for part in parts if part.numel()]
    thr = kth_threshold(keys, k - below)  # every key equal to it lies in the window: equal is the pool's count
    if thr.ties == thr.equal:
        return thr, None
    tied = torch.cat([part[key == thr.key] & 0xFFFFFFFF for part, key in zip((p for p in parts if p.numel()), keys)])
    return thr, tied
