"""Exact global k-lowest selection against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from lib.pruning import selection
from lib.pruning.selection import floats_to_keys_, kth_threshold, select_lowest


def _keys(values: torch.Tensor) -> torch.Tensor:
    return floats_to_keys_(values.detach().clone().to(torch.float32).reshape(-1))


def _reference_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest values, ties broken by flat index (stable sort)."""
    order = torch.sort(flat, stable=True).indices
    ref = torch.zeros(flat.numel(), dtype=torch.bool)
    ref[order[:k]] = True
    return ref


def _run_select(flat: torch.Tensor, shapes: list[tuple[int, ...]], k: int) -> torch.Tensor:
    """select_lowest on `flat` split into `shapes`; returns the masks flattened and concatenated."""
    out = [torch.zeros(shape, dtype=torch.bool) for shape in shapes]
    # Fill with garbage so a mask that is not fully written shows up.
    for m in out:
        m.fill_(True)
    sizes = [math.prod(shape) for shape in shapes]
    assert sum(sizes) == flat.numel()
    select_lowest(list(_keys(flat).split(sizes)), k, out)
    for m, shape in zip(out, shapes):
        assert m.shape == torch.Size(shape) and m.dtype == torch.bool
    return torch.cat([m.reshape(-1) for m in out])


# --- floats_to_keys_ -----------------------------------------------------------

def test_keys_preserve_float_order():
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([
        float("inf"), float("-inf"), 0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.1754944e-38, -1.1754944e-38,
        3.4028235e38, -3.4028235e38, 1.0, -1.0, 1.0000001, 0.99999994, -1.0000001, 2.0, -2.0,
        65536.0, -65536.0, 65537.0, 1e30, -1e30, 1e-30, -1e-30,
    ], dtype=torch.float32)
    randoms = torch.cat([
        torch.randn(2000, generator=g),
        torch.randn(500, generator=g) * 1e30,
        torch.randn(500, generator=g) * 1e-40,           # denormals of both signs
        torch.randint(-3, 4, (500,), generator=g).float(),  # duplicates (integer 0 is +0.0)
    ]).to(torch.float32)
    values = torch.cat([specials, randoms])
    values = values[values != 0]  # drop any zero (sign ambiguity) ...
    values = torch.cat([values, torch.zeros(3)])  # ... and add back only +0.0
    assert not torch.isnan(values).any()
    assert not (torch.signbit(values) & (values == 0)).any()
    perm = torch.randperm(values.numel(), generator=g)
    values = values[perm]

    keys = _keys(values)
    assert keys.dtype == torch.int32
    assert torch.equal(torch.sort(keys, stable=True).indices, torch.sort(values, stable=True).indices)


def test_keys_are_strictly_monotone_on_distinct_floats():
    values = torch.tensor([float("-inf"), -3e38, -1.0, -1e-45, 0.0, 1e-45, 1.0, 3e38, float("inf")])
    keys = _keys(values).tolist()
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


def test_floats_to_keys_works_in_place():
    buf = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float32)
    keys = floats_to_keys_(buf)
    assert keys.data_ptr() == buf.data_ptr()
    assert keys.dtype == torch.int32
    # non-negative floats keep their bit pattern
    assert keys[1].item() == torch.tensor([0.5]).view(torch.int32).item()


# --- select_lowest ---------------------------------------------------------------

SHAPE_POOL = [(1,), (3,), (7,), (2, 3), (4, 5), (3, 1, 4), (16,), (5, 5), (1, 1), (33,)]


def _random_case(g: torch.Generator, dist: int):
    nseg = int(torch.randint(1, 5, (1,), generator=g))
    shapes = [SHAPE_POOL[int(i)] for i in torch.randint(0, len(SHAPE_POOL), (nseg,), generator=g)]
    n = sum(math.prod(s) for s in shapes)
    if dist == 0:    # continuous
        flat = torch.randn(n, generator=g)
    elif dist == 1:  # heavy ties, small integer set
        flat = torch.randint(0, 3, (n,), generator=g).float()
    elif dist == 2:  # heavy ties incl. negatives, scaled so several high-16-bit bins share values
        flat = torch.randint(-2, 3, (n,), generator=g).float() * 0.25 + 1.0
    elif dist == 3:  # all equal
        flat = torch.full((n,), 0.75)
    else:            # values differing only in low mantissa bits (same high-16-bit bin)
        base = torch.tensor([1.0]).view(torch.int32)
        flat = (base + torch.randint(0, 4, (n,), generator=g, dtype=torch.int32)).view(torch.float32)
    return shapes, flat.to(torch.float32)


def test_select_lowest_matches_brute_force():
    g = torch.Generator().manual_seed(1234)
    cases = 0
    for i in range(400):
        shapes, flat = _random_case(g, i % 5)
        n = flat.numel()
        ks = {0, 1, max(0, n - 1), n, int(torch.randint(1, n + 1, (1,), generator=g))}
        for k in sorted(ks):
            got = _run_select(flat, shapes, k)
            ref = _reference_mask(flat, k)
            assert int(got.sum()) == k, (shapes, k)
            assert torch.equal(got, ref), (shapes, flat.tolist(), k)
            cases += 1
    assert cases >= 1200


def test_all_equal_scores_select_first_k_by_position():
    shapes = [(2, 3), (4,), (1, 5)]
    flat = torch.full((15,), 2.5)
    for k in range(0, 16):
        got = _run_select(flat, shapes, k)
        expected = torch.arange(15) < k
        assert torch.equal(got, expected)


def test_ties_at_threshold_broken_by_position_across_segments():
    # Values: the two 1.0s in segment 0 are below, then 2.0 appears in every segment.
    shapes = [(4,), (3,), (2,)]
    flat = torch.tensor([2.0, 1.0, 2.0, 1.0,   2.0, 3.0, 2.0,   2.0, 0.5])
    got = _run_select(flat, shapes, 5)
    # 0.5, 1.0, 1.0 then the first two 2.0s by flat index: positions 0 and 2
    expected = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert torch.equal(got, expected)
    got = _run_select(flat, shapes, 7)
    expected = torch.tensor([1, 1, 1, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    assert torch.equal(got, expected)


def test_k_zero_selects_nothing_and_k_numel_everything():
    shapes = [(3, 3), (5,)]
    flat = torch.randn(14, generator=torch.Generator().manual_seed(5))
    assert not _run_select(flat, shapes, 0).any()
    assert _run_select(flat, shapes, 14).all()


def test_negative_and_infinite_scores_are_selected_first():
    shapes = [(6,)]
    flat = torch.tensor([0.0, float("-inf"), -1e-40, 5.0, -3.0, float("inf")])
    assert torch.equal(_run_select(flat, shapes, 1), torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool))
    assert torch.equal(_run_select(flat, shapes, 3), torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool))
    assert torch.equal(_run_select(flat, shapes, 5), torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool))


def test_select_lowest_across_chunk_boundary():
    # More elements than one chunk, so the histogram passes run over several chunks.
    n = selection._CHUNK + 4099
    g = torch.Generator().manual_seed(7)
    flat = torch.randint(0, 50, (n,), generator=g).float() * 0.125
    shapes = [(selection._CHUNK - 3,), (4102,)]
    for k in (1, n // 3, n - 17):
        got = _run_select(flat, shapes, k)
        assert int(got.sum()) == k
        assert torch.equal(got, _reference_mask(flat, k))


# --- kth_threshold ---------------------------------------------------------------

@pytest.mark.parametrize("k", [0, -1, 11, 100])
def test_kth_threshold_rejects_out_of_range_k(k):
    keys = _keys(torch.arange(10, dtype=torch.float32))
    with pytest.raises(ValueError):
        kth_threshold([keys], k)


def test_kth_threshold_is_the_kth_key_with_ties():
    flat = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    keys = list(_keys(flat).split([2, 4]))  # one threshold over several tensors
    thr = kth_threshold(keys, 3)
    assert thr.key == _keys(torch.tensor([2.0])).item()
    assert thr.ties == 2  # 1.0 below, then two of the three 2.0s
    thr = kth_threshold(keys, 6)
    assert thr.key == _keys(torch.tensor([5.0])).item()
    assert thr.ties == 1
    thr = kth_threshold(keys, 1)
    assert thr.key == _keys(torch.tensor([1.0])).item() and thr.ties == 1
