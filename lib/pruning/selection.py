"""Exact global selection of the k lowest scores, without sorting or concatenating.

Scores are float32 values in one tensor per parameter, written by the pruner
(into the parameter's spent gradient where it can). Their bit patterns are
turned in place into int32 keys whose integer order is the float order; a
two-level radix histogram (top 16 bits, then low 16 bits within the one bin
that holds the k-th key) finds the exact k-th key. The k lowest are every key
below that threshold plus `ties` of the keys equal to it. On the CPU each
histogram is one C pass over the keys (lib/pruning/select.c, built by
lib/native.py); elsewhere, or without a C compiler, torch counts the same bins.

Which of the tied keys are taken must not depend on where they sit: SPT's
never-explored weights all score exactly 0, and taking them tensor by tensor
would prune the first layers wholesale. Each weight's global index (its
position in the whole pool) is passed through a fixed bijective 32-bit
integer hash, and the tied weights with the smallest hashes are taken, found
by a second exact selection over the hashes of the tied weights only (a hash
is recomputed where needed, never stored for every weight). The order is
pseudo-random in position yet fixed: the same inputs give the same selection
on every rank and every run.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from lib import native

INT32_MIN = -(2 ** 31)
_CHUNK = 1 << 20  # elements per chunk: the temporaries of each pass stay in cache
SMALL_SELECTION = 1 << 18  # up to this many keys, sort instead of histogramming


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
    """The k lowest keys are those < key, plus `ties` of the `equal` keys == key (which: see iter_selection)."""

    key: int
    ties: int
    equal: int


def _first_bin_reaching(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, count strictly below it) of the bin where the cumulative count reaches k."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device=cum.device)).item())
    below = int(cum[b - 1].item()) if b > 0 else 0
    return b, below


def kth_threshold(keys: list[torch.Tensor], k: int, first_histogram: "Counters | None" = None,
                  spare: "Counters | None" = None) -> Threshold:
    """Exact threshold for the k lowest of the flat int32 tensors `keys`, taken together (1 <= k <= total).

    `first_histogram`: counters that already hold the first histogram of exactly these keys
    (counted while the keys were written: score_keys); it is used, and closed, here. `spare`: empty
    counters to count in instead of new ones; they are left open and empty.
    """
    n = sum(t.numel() for t in keys)
    lib = _native() if n > SMALL_SELECTION and all(_native_ready(t) for t in keys) else None
    if lib is None:
        if first_histogram is not None:
            first_histogram.close()
        return _kth(lambda: _chunks(keys), n, k, keys[0].device)
    _check_k(k, n)
    threads = torch.get_num_threads()
    with first_histogram or (contextlib.nullcontext(spare) if spare else Counters(threads)) as counters:
        counted = first_histogram is not None

        def histogram(hist: torch.Tensor, high: int | None, inside: int) -> int:
            nonlocal counted
            if not counted:
                # pass 2 skips groups of keys outside the bin when few keys are inside it (an eighth at most)
                kind = 0 if high is None else 2 if inside * 8 <= n else 1
                for t in keys:  # one C pass per tensor, reading each key once
                    lib.kprune_histogram(t.data_ptr(), t.numel(), kind, high or 0, counters.handle, threads)
            counted = False
            return counters.take(hist)

        return _radix(histogram, k)


class Counters:
    """The C histogram's per-thread counters (1 MiB a thread), kept over the passes of one selection."""

    def __init__(self, threads: int):
        self.lib = _native()
        self.threads = max(1, min(threads, 64))  # select.c's MAX_THREADS
        self.handle = self.lib.kprune_counters_new(threads)
        if not self.handle:
            raise MemoryError("no memory for the selection's histogram counters")

    def take(self, hist: torch.Tensor) -> int:
        """hist (int64, 65,536 bins) += every count so far; returns how many keys of a first histogram
        were exactly 0. The counters start again from zero."""
        return self.lib.kprune_counters_take(self.handle, hist.data_ptr())

    def close(self) -> None:
        if self.handle:
            self.lib.kprune_counters_free(self.handle)
            self.handle = None

    def __enter__(self) -> "Counters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NATIVE: ctypes.CDLL | None = None
_NATIVE_FAILED = False


def _native() -> ctypes.CDLL | None:
    """lib/pruning/select.c, built once per machine (lib/native.py); None without a C compiler, and then
    the torch passes below count the same bins (kprune's Adam kernel has already warned about the compiler)."""
    global _NATIVE, _NATIVE_FAILED
    if _NATIVE is None and not _NATIVE_FAILED:
        try:
            lib = native.build(Path(__file__).with_name("select.c"))
        except native.BuildError:
            _NATIVE_FAILED = True
            return None
        ptr, i64, i32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int
        signatures = {
            "kprune_counters_new": ([cint], ptr),
            "kprune_counters_take": ([ptr, ptr], i64),
            "kprune_counters_free": ([ptr], None),
            "kprune_histogram": ([ptr, i64, cint, i32, ptr, cint], None),
            "kprune_score_keys": ([cint, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_float, ptr, cint], cint),
            "kprune_score_window": ([cint, ptr, ptr, ptr, ptr, i64, ctypes.c_float, i32, i32, ptr, cint, ptr], cint),
            "kprune_window_set": ([ptr, ptr, ptr, i64, i32, cint, i64, ptr, i64, ptr], None),
            "kprune_zero_selected": ([ptr, ptr, cint, i64, cint], None),
            "kprune_sample_keys": ([cint, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_float, ptr], cint),
            "kprune_select_store": ([ptr, i64, i32, ptr, ptr, cint, cint, i32, i64, ptr, i64, ptr], cint),
            "kprune_nm_cap": ([ptr, i64, cint, i64, cint, cint], None),
        }
        for name, (args, result) in signatures.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = result
        _NATIVE = lib
    return _NATIVE


# select.c's formulas (its enum, in this order), by the score function's name in lib/pruning/scores.py
NATIVE_FORMULAS = {name: i for i, name in enumerate(
    ["magnitude", "bitter0", "bitter3", "bitter5", "bitter6", "bitter7", "bitter8", "bitter9"])}


def scorable(w: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether select.c's score passes read these: CPU, float32, contiguous, all of w's shape (None: absent)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.shape == w.shape
               for t in (w, *others) if t is not None)


def score_keys(formula: str, w: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None, out: torch.Tensor,
               pruned_bits: torch.Tensor | None, correction: float = 1.0, counters: Counters | None = None,
               keys: bool = True) -> bool:
    """scores.<formula> of w written into `out` as selection keys, in one C pass per tensor.

    The values are the torch formula's, one rounding per operation in its order, except that the
    square roots are correctly rounded (torch's CPU square root may be one unit off in the last
    place); the keys are what floats_to_keys_ makes of them; pruned weights (`pruned_bits`, packed
    as MaskSet keeps them) get the lowest key; with `counters`, the keys' first histogram is
    counted in the same pass. m and v are Adam's moments (None where the formula reads neither),
    `correction` bitter8's 1 - beta1^t. With keys=False the float scores themselves are written
    (what a block or channel structure sums into its group scores; pruned_bits and counters unused).

    False, writing nothing, where the C pass cannot serve (not on the CPU, not contiguous float32,
    no C compiler, a formula it does not have): the caller scores with torch then.
    """
    lib = _native()
    if lib is None or formula not in NATIVE_FORMULAS or not scorable(w, m, v, out):
        return False
    if pruned_bits is not None and not (pruned_bits.device.type == "cpu" and pruned_bits.dtype == torch.uint8
                                        and pruned_bits.is_contiguous()):
        return False

    def address(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    code = NATIVE_FORMULAS[formula] if keys else -1 - NATIVE_FORMULAS[formula]
    return lib.kprune_score_keys(code, address(w), address(m), address(v), address(out),
                                 address(pruned_bits), w.numel(), correction,
                                 counters.handle if counters else None, torch.get_num_threads()) == 0


def sample_keys(formula: str, w: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None,
                pruned_bits: torch.Tensor | None, runs: int, stride: int, length: int, out: torch.Tensor,
                correction: float = 1.0) -> bool:
    """Write into `out` (int32, contiguous, runs * length) the keys score_keys would write for `runs` runs
    of `length` consecutive weights of w, the r-th from r * stride; False, writing nothing, where
    score_keys could not serve."""
    lib = _native()
    if lib is None or formula not in NATIVE_FORMULAS or runs * stride > w.numel() or stride < length \
            or not scorable(w, m, v):
        return False
    assert out.dtype == torch.int32 and out.is_contiguous() and out.numel() == runs * length
    ptr = [None if t is None else t.data_ptr() for t in (w, m, v, pruned_bits)]
    return lib.kprune_sample_keys(NATIVE_FORMULAS[formula], *ptr, runs, stride, length, correction,
                                  out.data_ptr()) == 0


def native_selection() -> bool:
    """Whether select.c's passes serve here (a C compiler built them)."""
    return _native() is not None


def count_first_histogram(key: torch.Tensor, counters: Counters) -> None:
    """Add the CPU int32 keys `key` (written by torch, not score_keys) to the counters' first histogram."""
    _native().kprune_histogram(key.data_ptr(), key.numel(), 0, 0, counters.handle, torch.get_num_threads())


TIES_SETTLED_AT_MOST = 1 << 20  # tied keys store_selection takes on (8 MiB of positions); beyond, iter_selection


def store_selection(keys: list[torch.Tensor], thr: Threshold, bits: list[torch.Tensor],
                    targets: list[list[torch.Tensor]], first_index: int = 0) -> bool:
    """In one C pass per tensor: bits[j] = which keys[j] are selected (packed, as MaskSet keeps them), and
    every tensor of targets[j] zeroed where they are. Where only some of the keys equal to the threshold are
    selected, the pass selects those below it and finds where the equal ones are (from the keys it reads
    anyway); then the thr.ties whose global indices (`first_index` for keys[0][0]) hash lowest, those
    iter_selection takes, are set and zeroed. False, nothing written, where it cannot serve: not on the CPU,
    more than TIES_SETTLED_AT_MOST tied keys, a tie among pruned weights' keys or in a pool of more than
    2**32 weights (iter_selection then runs, or says why)."""
    lib = _native()
    if lib is None or not all(_native_ready(k) for k in keys):
        return False
    if not all(b.device.type == "cpu" and b.dtype == torch.uint8 and b.is_contiguous() for b in bits):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for group in targets for t in group):
        return False
    partial = thr.ties != thr.equal
    if partial and (thr.equal > TIES_SETTLED_AT_MOST or thr.key == INT32_MIN
                    or first_index + sum(k.numel() for k in keys) > 1 << 32):
        return False
    tie = TiedKeys(thr)
    threads, offset = torch.get_num_threads(), first_index
    for key, b, group in zip(keys, bits, targets):
        pointers = (ctypes.c_void_p * len(group))(*[t.data_ptr() for t in group])
        lib.kprune_select_store(key.data_ptr(), key.numel(), thr.key - 1 if partial else thr.key, b.data_ptr(),
                                pointers, len(group), threads, thr.key, offset, *tie.arguments())
        offset += key.numel()
    tie.take(first_index, keys, bits, targets)
    return True


class TiedKeys:
    """Where only some of the keys equal to a threshold are selected: the C pass that sets the bits writes the
    pool indices of the equal keys here (`arguments`), and `take` selects the thr.ties of them whose indices
    hash lowest (iter_selection's choice)."""

    def __init__(self, thr: Threshold):
        self.thr = thr
        self.partial = thr.ties != thr.equal
        self.tied = torch.empty(thr.equal if self.partial else 0, dtype=torch.int64)
        self.count = ctypes.c_int64(0)

    def arguments(self) -> tuple:
        """The C passes' last three arguments: where the indices go, their room, their count."""
        return self.tied.data_ptr() if self.partial else None, self.tied.numel(), ctypes.byref(self.count)

    def take(self, first_index: int, keys: list, bits: list[torch.Tensor], targets: list[list[torch.Tensor]]) -> None:
        """Set the bits (and zero the targets) of the chosen tied keys; keys[j] (anything with numel) gives
        the size of the j-th tensor, whose first element has pool index first_index + the sizes before."""
        if self.partial:
            assert self.count.value == self.thr.equal, "selection bug: the tied keys were miscounted"
            _take_tied(self.tied, self.thr.ties, first_index, keys, bits, targets)


def score_window(formula: str, w: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None,
                 pruned_bits: torch.Tensor | None, correction: float, lo: int, hi: int,
                 buffer: torch.Tensor) -> "WindowFinds | None":
    """select.c's kprune_score_window over w (its checks are the sample's: sample_keys served these tensors):
    the bits of the keys below lo and the keys inside [lo, hi] with their positions, in `buffer` (int32, w's
    size, contiguous). None where a part of the buffer could not hold its keys inside the window."""
    out = torch.empty(6 * 64, dtype=torch.int64)  # select.c's MAX_THREADS parts
    ptr = [None if t is None else t.data_ptr() for t in (w, m, v, pruned_bits)]
    parts = _native().kprune_score_window(NATIVE_FORMULAS[formula], *ptr, w.numel(), correction, lo, hi,
                                          buffer.data_ptr(), torch.get_num_threads(), out.data_ptr())
    assert parts > 0, formula
    table = out[:6 * parts].view(parts, 6).tolist()
    if any(kept < 0 for _, _, _, _, kept, _ in table):
        return None
    return WindowFinds(buffer, [tuple(row[:5]) for row in table], sum(row[5] for row in table))


class WindowFinds:
    """What kprune_score_window left in one tensor's buffer: per part (begin, end, first, cap, kept) the bits
    of the keys below the window at byte 4 * begin and the kept keys and their positions from int32 first."""

    def __init__(self, buffer: torch.Tensor, parts: list[tuple[int, int, int, int, int]], below: int):
        self.buffer, self.parts, self.below = buffer, parts, below
        self.inside = sum(kept for *_, kept in parts)

    def kept_keys(self) -> list[torch.Tensor]:
        return [self.buffer[first:first + kept] for _, _, first, _, kept in self.parts if kept]

    def write_bits(self, bits: torch.Tensor, thr: Threshold, offset: int, tie: TiedKeys) -> None:
        """bits = the keys below the window, and of the kept ones those below thr (with every equal one where
        all are selected; otherwise their pool indices, offset + position, go to `tie`)."""
        raw = self.buffer.view(torch.uint8)
        lib = _native()
        for begin, end, first, cap, kept in self.parts:
            nbytes = (end - begin + 7) // 8
            bits[begin // 8:begin // 8 + nbytes] = raw[4 * begin:4 * begin + nbytes]
            if kept:
                keys = self.buffer[first:first + kept]
                lib.kprune_window_set(bits.data_ptr(), keys.data_ptr(), self.buffer[first + cap:].data_ptr(), kept,
                                      thr.key, int(not tie.partial), offset, *tie.arguments())


def zero_selected(bits: torch.Tensor, targets: list[torch.Tensor]) -> None:
    """Every tensor of `targets` (CPU, float32, contiguous, as many elements as bits has bits) zeroed where
    its bit is set, in one threaded C pass."""
    pointers = (ctypes.c_void_p * len(targets))(*[t.data_ptr() for t in targets])
    _native().kprune_zero_selected(bits.data_ptr(), pointers, len(targets), targets[0].numel(),
                                   torch.get_num_threads())


def _take_tied(tied: torch.Tensor, ties: int, first_index: int, keys: list[torch.Tensor],
               bits: list[torch.Tensor], targets: list[list[torch.Tensor]]) -> None:
    """Select the `ties` of the tied keys at global indices `tied` whose indices hash lowest (iter_selection's
    choice): set their bits and zero their targets."""
    hashes = tie_hash(tied)
    chosen = tied[hashes <= torch.sort(hashes).values[ties - 1]]
    offset = first_index
    for key, b, group in zip(keys, bits, targets):
        local = chosen[(chosen >= offset) & (chosen < offset + key.numel())] - offset
        offset += key.numel()
        if not local.numel():
            continue
        byte, bit = local >> 3, (torch.ones_like(local) << (local & 7))
        touched, where = torch.unique(byte, return_inverse=True)
        # a byte's chosen bits are distinct: their sum is their OR
        b[touched] |= torch.zeros(touched.numel(), dtype=torch.int64).scatter_add_(0, where, bit).to(torch.uint8)
        for t in group:
            t.view(-1)[local] = 0.0


def nm_cap_native(key: torch.Tensor, rows_groups: int, m: int, rest: int, n: int) -> bool:
    """kprune_nm_cap in one C pass (structure.nm_cap_'s rule) when the keys are on the CPU; else False."""
    lib = _native()
    if lib is None or not _native_ready(key) or m not in (4, 8):
        return False
    lib.kprune_nm_cap(key.data_ptr(), rows_groups, m, rest, n, torch.get_num_threads())
    return True


def _native_ready(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.int32 and t.is_contiguous() and t.dim() == 1


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of keys ({n})")


def _kth(chunks, n: int, k: int, device: torch.device) -> Threshold:
    """Exact threshold for the k lowest of the n int32 keys that `chunks()` yields (it may be called twice).

    The chunks are read, never written.
    """
    _check_k(k, n)
    if n <= SMALL_SELECTION:
        # Below this size a sort (of a small concatenation) is cheaper than two 65,536-bin histograms.
        ordered = torch.sort(torch.cat(list(chunks()))).values
        key = int(ordered[k - 1])
        below = int(torch.searchsorted(ordered, key))
        equal = int(torch.searchsorted(ordered, key, right=True)) - below
        return Threshold(key=key, ties=k - below, equal=equal)

    def histogram(hist: torch.Tensor, high: int | None, inside: int) -> None:  # (no count of zero keys)
        for chunk in chunks():
            if high is None:
                hist += torch.bincount((chunk >> 16).add_(1 << 15), minlength=1 << 16)
                continue
            inside = chunk[(chunk >> 16) == high]
            if inside.numel():
                hist += torch.bincount(inside.bitwise_and_(0xFFFF), minlength=1 << 16)

    return _radix(histogram, k, device)


def _radix(histogram, k: int, device: torch.device | str = "cpu") -> Threshold:
    """The k-th key from two 65,536-bin counts: `histogram(hist, None, 0)` adds every key to the bin of its
    top 16 bits (offset by 2**15) and returns how many keys are exactly 0 (or None if it does not count
    them), `histogram(hist, high, inside)` the keys whose top 16 bits are `high` (`inside` of them) to
    the bin of their low 16 bits."""
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    zeros = histogram(hist, None, 0)
    high, below = _first_bin_reaching(hist, k)
    inside = int(hist[high])
    high_signed = high - (1 << 15)
    if high_signed == 0 and zeros == inside:  # the bin holds only keys 0 (C passes count them): no pass 2
        return Threshold(key=0, ties=k - below, equal=zeros)
    hist.zero_()
    histogram(hist, high_signed, inside)
    low, below_low = _first_bin_reaching(hist, k - below)
    return Threshold(key=(high_signed << 16) | low, ties=k - below - below_low, equal=int(hist[low]))


def _chunks(keys: list[torch.Tensor]):
    for t in keys:
        yield from t.split(_CHUNK)


TIE_SEED = 0x5BD1E995  # fixed: the tie order is the same on every rank and in every run
_M32 = 0xFFFFFFFF


def tie_hash(index: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mix of int64 global indices (< 2**32), as int32 keys in hash order.

    xor-shift and multiply-by-odd steps are each invertible modulo 2**32, so
    distinct indices get distinct hashes: the tie order has no ties of its
    own. The multipliers stay below 2**31 so int64 products never overflow.
    """
    x = (index + TIE_SEED) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    return (x - (1 << 31)).to(torch.int32)  # unsigned order -> signed int32 order


def _tied_hashes(keys: list[torch.Tensor], key: int, first_index: int, chunk: int):
    """Hashes of the global indices of every key equal to `key`, chunk by chunk."""
    offset = first_index
    for seg in keys:
        for start in range(0, seg.numel(), chunk):
            where = (seg[start:start + chunk] == key).nonzero().squeeze(1)
            if where.numel():
                yield tie_hash(where.add_(offset + start))
        offset += seg.numel()


def iter_selection(keys: list[torch.Tensor], thr: Threshold, chunk: int = _CHUNK, first_index: int = 0):
    """Yield (tensor index, start, bool chunk): which keys of each tensor are among the k lowest.

    Chunks are `chunk` elements of one tensor (the last one shorter), tensors
    in list order. Of the keys equal to the threshold, the `thr.ties` whose
    global indices (`first_index` for the first key of `keys[0]`, counting on
    through the list) hash lowest are selected.
    """
    total = first_index + sum(seg.numel() for seg in keys)
    if total > 1 << 32:
        raise ValueError(f"{total:,} prunable weights: the tie order hashes 32-bit indices, so at most 2**32 "
                         "weights can be pruned as one pool")
    every_equal = thr.ties == thr.equal  # the usual case: no tie to break
    tie_key = None
    if not every_equal:
        tie_key = _kth(lambda: _tied_hashes(keys, thr.key, first_index, min(chunk, _CHUNK)), thr.equal, thr.ties,
                       keys[0].device).key
    offset, taken = first_index, 0
    for index, seg in enumerate(keys):
        for start in range(0, seg.numel(), chunk):
            piece = seg[start:start + chunk]
            if every_equal:
                yield index, start, piece <= thr.key
                continue
            selected = piece < thr.key
            # The tied keys' indices and hashes are int64, several times the keys' size: found in pieces
            # of at most _CHUNK keys, so that a GPU, which passes whole tensors, holds no more than a CPU.
            for sub in range(0, piece.numel(), _CHUNK):
                where = (piece[sub:sub + _CHUNK] == thr.key).nonzero().squeeze(1)
                if where.numel():
                    where += sub
                    chosen = where[tie_hash(where + (offset + start)) <= tie_key]
                    selected[chosen] = True
                    taken += chosen.numel()
            yield index, start, selected
        offset += seg.numel()
    assert every_equal or taken == thr.ties, "selection bug: wrong number of tied keys taken"
