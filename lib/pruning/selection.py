"""Exact global selection of the k lowest scores, without sorting or concatenating.

Scores are float32 values in one tensor per parameter, written by the pruner
(into the parameter's spent gradient where it can). Their bit patterns are
turned in place into int32 keys whose integer order is the float order; a
two-level radix histogram (top 16 bits, then low 16 bits within the one bin
that holds the k-th key) finds the exact k-th key. The k lowest are every key
below that threshold plus the first `ties` keys equal to it in order (tensor
by tensor, then by position), so equal scores are broken by position: the
same inputs always give the same selection, on every rank and every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT32_MIN = -(2 ** 31)
_CHUNK = 1 << 20  # elements per chunk: the temporaries of each pass stay in cache
_SMALL = 1 << 18  # up to this many keys, sort instead of histogramming


def floats_to_keys_(buffer: torch.Tensor) -> torch.Tensor:
    """Reinterpret float32 `buffer` in place as order-preserving int32 keys.

    Non-negative floats already order correctly as signed ints; for negative
    floats the magnitude bits are flipped so that larger magnitudes sort lower.
    """
    keys = buffer.view(torch.int32)
    for chunk in keys.split(_CHUNK):
        chunk.bitwise_xor_((chunk >> 31).bitwise_and_(0x7FFFFFFF))
    return keys


@dataclass(frozen=True)
class Threshold:
    """The k lowest keys are those < key, plus the first `ties` of the `equal` keys == key."""

    key: int
    ties: int
    equal: int


def _first_bin_reaching(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, count strictly below it) of the bin where the cumulative count reaches k."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device=cum.device)).item())
    below = int(cum[b - 1].item()) if b > 0 else 0
    return b, below


def kth_threshold(keys: list[torch.Tensor], k: int) -> Threshold:
    """Exact threshold for the k lowest of the flat int32 tensors `keys`, taken together (1 <= k <= total)."""
    n = sum(t.numel() for t in keys)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of keys ({n})")
    if n <= _SMALL:
        # Below this size a sort (of a small concatenation) is cheaper than two 65,536-bin histograms.
        ordered = torch.sort(torch.cat(keys)).values
        key = int(ordered[k - 1])
        below = int(torch.searchsorted(ordered, key))
        equal = int(torch.searchsorted(ordered, key, right=True)) - below
        return Threshold(key=key, ties=k - below, equal=equal)
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=keys[0].device)
    for chunk in _chunks(keys):
        hist += torch.bincount((chunk >> 16).add_(1 << 15), minlength=1 << 16)
    high, below = _first_bin_reaching(hist, k)
    high_signed = high - (1 << 15)
    hist.zero_()
    for chunk in _chunks(keys):
        inside = chunk[(chunk >> 16) == high_signed]
        if inside.numel():
            hist += torch.bincount(inside.bitwise_and_(0xFFFF), minlength=1 << 16)
    low, below_low = _first_bin_reaching(hist, k - below)
    return Threshold(key=(high_signed << 16) | low, ties=k - below - below_low, equal=int(hist[low]))


def _chunks(keys: list[torch.Tensor]):
    for t in keys:
        yield from t.split(_CHUNK)


def iter_selection(keys: list[torch.Tensor], thr: Threshold, chunk: int = _CHUNK):
    """Yield (tensor index, start, bool chunk): which keys of each tensor are among the k lowest.

    Chunks are `chunk` elements of one tensor (the last one shorter), tensors
    in list order, so ties are taken by position: the first `thr.ties` keys
    equal to the threshold are selected.
    """
    every_equal = thr.ties == thr.equal  # the usual case: no tie to break by position
    ties_left = 0 if every_equal else thr.ties
    for index, seg in enumerate(keys):
        for start in range(0, seg.numel(), chunk):
            piece = seg[start:start + chunk]
            selected = piece <= thr.key if every_equal else piece < thr.key
            if ties_left:
                equal = (piece == thr.key).nonzero().squeeze(1)[:ties_left]
                selected[equal] = True
                ties_left -= equal.numel()
            yield index, start, selected
    assert ties_left == 0, "selection bug: ties not exhausted"


def select_lowest(keys: list[torch.Tensor], k: int, out: list[torch.Tensor]) -> None:
    """Write into the bool tensors `out` which of the k lowest keys fall in each of `keys`.

    `out[i]` has as many elements as the flat int32 tensor `keys[i]`. Exactly
    k entries end up True across all of `out`.
    """
    if k == 0:
        for mask in out:
            mask.zero_()
        return
    thr = kth_threshold(keys, k)
    for index, start, selected in iter_selection(keys, thr):
        out[index].view(-1)[start:start + selected.numel()] = selected
