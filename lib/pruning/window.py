"""The sampled window of the exact global selection on the CPU (select.c's kprune_score_window).

The exact k-th key of n keys takes two 65,536-bin histogram passes over every
key, and the selection one more pass that reads the keys again to write the
bits and zero the weights. A sample of the keys tells, before any is written,
a narrow window [lo, hi] that holds the k-th key unless the sample was very
unlucky. Then the pass that scores the weights writes no keys: each key below
lo is selected whatever the threshold (its bit is written at once), each key
above hi is not, and the few keys inside (0.4% for GPT-2 124M) are kept with
their positions. The k-th key is found among the kept keys, their bits set,
and one pass zeroes the selected weights from the bits. No memory is added:
the bits and the kept keys go into the memory the keys would have taken (a
spent gradient), and the sample's keys into a spent gradient before them.
The result is exact whatever the sample: when the window misses the k-th key
(or a part of a buffer cannot hold the keys inside), nothing has been changed
yet, and the selection scores the keys again and counts the histograms over
them (slower, same answer).

The sample is 16 consecutive weights (one cache line) every so many weights,
spread over every tensor in proportion to its size, scored by the same C pass.
The window is the sample's quantiles WINDOW_SIGMAS binomial standard
deviations either side of k / n: about n * 2 * WINDOW_SIGMAS * sqrt(q (1 - q) / S)
keys (q = k / n, S the sample's size), 0.4% of the keys for GPT-2 124M.
"""

from __future__ import annotations

import math

import torch

from lib.pruning.selection import (INT32_MIN, TIES_SETTLED_AT_MOST, Counters, Threshold, WindowFinds,
                                   kth_threshold)

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


def window_threshold(finds: list[WindowFinds], below: int, k: int, spare: Counters) -> Threshold | None:
    """After kprune_score_window over every tensor (`below` keys below the window, `finds` the kept ones):
    the exact threshold of the k lowest keys, found among the kept keys (counted in `spare`, left empty);
    None if the window does not hold the k-th key, or more tied keys than store_selection takes on would
    have to be chosen among (the caller selects without the window then)."""
    inside = sum(f.inside for f in finds)
    if not below < k <= below + inside:
        return None
    # Every key equal to the threshold lies in the window: `equal` is the pool's count, `ties` k's share of it.
    thr = kth_threshold([t for f in finds for t in f.kept_keys()], k - below, spare=spare)
    return None if thr.ties != thr.equal and thr.equal > TIES_SETTLED_AT_MOST else thr
