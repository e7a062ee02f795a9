"""The sampled window of the exact global selection on the CPU (select.c's window mode).

The exact k-th key of n keys takes two 65,536-bin histogram passes over every
key. The first histogram's increments cost about as much as scoring the
weights. A sample of the keys tells, before they are written, a narrow window
[lo, hi] that holds the k-th key unless the sample was very unlucky: then the
pass that writes the keys counts the keys below lo (vector compares) and each
of the few inside in its own bin of the histogram's counters (otherwise idle
in window mode), and the k-th key is read off those bins, with no second pass
over the keys (one narrowing pass where the window spans more key values than
the counters have bins). No memory is added: the sample's keys are written
into a spent gradient (dead until the update writes its keys there). The
result is exact whatever the sample: when the window misses the k-th key, the
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
SAMPLE_AT_MOST = 1 << 20  # sampled keys (4 MiB of keys)
SAMPLE_EVERY = 16  # at most one weight in this many is sampled (a cache line in 16)
WINDOW_SIGMAS = 4.0  # the window misses the k-th key with probability ~6e-5 (then: the histograms)
WINDOW_AT_MOST = 1 / 16  # a window expected to hold more of the keys (a mass of equal keys) is not used


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


def choose_window(sample: torch.Tensor, n: int, k: int) -> tuple[int, int] | None:
    """(lo, hi) for the k lowest of n keys from a sample of them (flat int32); None where a window would not
    pay (it would hold a mass of equal keys)."""
    s = sample.numel()
    q = k / n
    spread = WINDOW_SIGMAS * math.sqrt(q * (1 - q) * s) + 1
    a, b = math.floor(q * s - spread), math.ceil(q * s + spread)
    # The sampled keys below lo and up to hi, from the two order statistics (no temporaries of the sample's size).
    lo, below_lo = INT32_MIN + 1, 0  # pruned weights (the lowest key) are counted below the window, never inside
    if a >= 1:
        t = kth_threshold([sample], a)
        lo, below_lo = (t.key, a - t.ties) if t.key > INT32_MIN else (INT32_MIN + 1, t.equal)
    hi, upto_hi = 2 ** 31 - 1, s
    if b <= s:
        t = kth_threshold([sample], b)
        hi, upto_hi = t.key, b - t.ties + t.equal
    if hi < lo or n * (upto_hi - below_lo) / s > n * WINDOW_AT_MOST:
        return None
    return lo, hi


def window_threshold(counters: Counters, keys: list[torch.Tensor], k: int) -> Threshold | None:
    """After a first pass in window mode over `keys`: the exact threshold of the k lowest keys, read off the
    window's bins (`keys` are read again only where the window was wider than the bins); None if the window
    does not hold the k-th key (the caller counts the histograms instead)."""
    below, inside = counters.window_counts()
    if not below < k <= below + inside:
        counters.windowed = False
        return None
    # Every key equal to the threshold lies in the window: `equal` is the pool's count, `ties` k's share of it.
    return counters.window_kth(keys, k - below)
