"""Exact global k-lowest selection against a brute-force (sort-based) answer, and unbiased tie-breaking.

The selection is defined as: the k lowest keys, ties at the threshold taken in
the order of `tie_hash(global index)`. The brute-force reference sorts every
element by (key, tie hash) with torch.argsort; the code under test finds the
same set with histograms, chunk by chunk, without sorting.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib.pruning import selection
from lib.pruning.masks import unpack_bits
from lib.pruning.methods import SPT, Observation, build_method
from lib.pruning.pruner import Pruner, target_count
from lib.pruning.schedules import Schedule
from lib.pruning.selection import floats_to_keys_, iter_selection, kth_threshold, tie_hash


def _keys(values: torch.Tensor) -> torch.Tensor:
    return floats_to_keys_(values.detach().clone().to(torch.float32).reshape(-1))


def _brute_force(keys: torch.Tensor, k: int, first_index: int = 0) -> torch.Tensor:
    """The k lowest int32 `keys` by (key, tie hash of the global index): a full argsort."""
    index = torch.arange(keys.numel(), dtype=torch.int64) + first_index
    unsigned_hash = tie_hash(index).to(torch.int64) + (1 << 31)
    order = torch.argsort(keys.to(torch.int64) * (1 << 32) + unsigned_hash)
    ref = torch.zeros(keys.numel(), dtype=torch.bool)
    ref[order[:k]] = True
    return ref


def _select(flat_keys: torch.Tensor, sizes: list[int], k: int, chunk: int = selection._CHUNK,
            first_index: int = 0) -> torch.Tensor:
    """kth_threshold + iter_selection (what Pruner.update runs) over `flat_keys` split into `sizes`."""
    keys = list(flat_keys.split(sizes))
    before = [t.clone() for t in keys]
    out = [torch.ones(n, dtype=torch.bool) for n in sizes]  # garbage: a chunk never written shows up
    written = [torch.zeros(n, dtype=torch.bool) for n in sizes]
    if k:
        for index, start, chosen in iter_selection(keys, kth_threshold(keys, k), chunk=chunk,
                                                   first_index=first_index):
            out[index][start:start + chosen.numel()] = chosen
            written[index][start:start + chosen.numel()] = True
        assert all(w.all() for w in written)
    else:
        out = [torch.zeros(n, dtype=torch.bool) for n in sizes]
    assert all(torch.equal(a, b) for a, b in zip(keys, before)), "selection wrote into the keys"
    return torch.cat(out)


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


# --- the tie order --------------------------------------------------------------

def test_tie_hash_is_a_bijection_on_its_range():
    # Distinct indices never share a hash: the tie order itself has no ties.
    index = torch.cat([torch.arange(1 << 20), torch.arange((1 << 32) - (1 << 16), 1 << 32)])
    hashes = tie_hash(index)
    assert hashes.dtype == torch.int32
    assert torch.unique(hashes).numel() == index.numel()


def test_tie_hash_order_has_no_positional_trend():
    # The ranks of consecutive indices under the hash are uncorrelated with position.
    n = 100_000
    rank = torch.argsort(torch.argsort(tie_hash(torch.arange(n)))).double()
    position = torch.arange(n, dtype=torch.float64)
    corr = torch.corrcoef(torch.stack([rank, position]))[0, 1].item()
    assert abs(corr) < 0.01
    first_tenth = (rank[: n // 10] < n // 2).double().mean().item()
    assert abs(first_tenth - 0.5) < 0.02  # the first 10% of positions is not favoured


# --- small inputs (the sort path) -----------------------------------------------------

SHAPE_POOL = [(1,), (3,), (7,), (2, 3), (4, 5), (3, 1, 4), (16,), (5, 5), (1, 1), (33,)]


def _random_case(g: torch.Generator, dist: int):
    nseg = int(torch.randint(1, 5, (1,), generator=g))
    sizes = [math.prod(SHAPE_POOL[int(i)]) for i in torch.randint(0, len(SHAPE_POOL), (nseg,), generator=g)]
    n = sum(sizes)
    if dist == 0:    # continuous
        flat = torch.randn(n, generator=g)
    elif dist == 1:  # heavy ties, small integer set
        flat = torch.randint(0, 3, (n,), generator=g).float()
    elif dist == 2:  # heavy ties incl. negatives
        flat = torch.randint(-2, 3, (n,), generator=g).float() * 0.25 - 0.25
    elif dist == 3:  # all equal
        flat = torch.full((n,), 0.75)
    else:            # values differing only in low mantissa bits (same high-16-bit bin)
        base = torch.tensor([1.0]).view(torch.int32)
        flat = (base + torch.randint(0, 4, (n,), generator=g, dtype=torch.int32)).view(torch.float32)
    return sizes, flat.to(torch.float32)


def test_small_selections_match_brute_force():
    g = torch.Generator().manual_seed(1234)
    cases = 0
    for i in range(300):
        sizes, flat = _random_case(g, i % 5)
        n = flat.numel()
        keys = _keys(flat)
        first_index = int(torch.randint(0, 1000, (1,), generator=g))
        for k in sorted({0, 1, max(0, n - 1), n, int(torch.randint(1, n + 1, (1,), generator=g))}):
            got = _select(keys, sizes, k, first_index=first_index)
            assert int(got.sum()) == k, (sizes, k)
            assert torch.equal(got, _brute_force(keys, k, first_index)), (sizes, flat.tolist(), k)
            cases += 1
    assert cases >= 900


def test_negative_and_infinite_scores_are_selected_first():
    flat = torch.tensor([0.0, float("-inf"), -1e-40, 5.0, -3.0, float("inf")])
    keys = _keys(flat)
    assert _select(keys, [6], 1).tolist() == [False, True, False, False, False, False]
    assert _select(keys, [6], 3).tolist() == [False, True, True, False, True, False]
    assert _select(keys, [6], 5).tolist() == [True, True, True, True, True, False]


def test_kth_threshold_rejects_out_of_range_k():
    keys = _keys(torch.arange(10, dtype=torch.float32))
    for k in (0, -1, 11, 100):
        with pytest.raises(ValueError):
            kth_threshold([keys], k)


def test_kth_threshold_is_the_kth_key_with_ties():
    flat = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    keys = list(_keys(flat).split([2, 4]))  # one threshold over several tensors
    thr = kth_threshold(keys, 3)
    assert thr.key == _keys(torch.tensor([2.0])).item()
    assert (thr.ties, thr.equal) == (2, 3)  # 1.0 below, then two of the three 2.0s
    thr = kth_threshold(keys, 6)
    assert thr.key == _keys(torch.tensor([5.0])).item() and thr.ties == 1


# --- large inputs (the histogram path, several chunks) --------------------------------------

@pytest.mark.parametrize("native", [True, False], ids=["c-histogram", "torch-histogram"])
def test_large_selection_matches_brute_force_on_the_histogram_path(native, monkeypatch, request):
    # More than SMALL_SELECTION keys (histograms, not a sort), one tensor longer than a chunk, negative
    # scores, values that share their top 16 bits, and heavy exact ties at every threshold tried.
    # Both ways of counting: lib/pruning/select.c (the CPU's) and torch's (other devices, no compiler).
    if native:
        assert selection._native() is not None, "the C histogram must build here (CI has a C compiler)"
        calls = []
        real = selection._native()
        monkeypatch.setattr(selection, "_native", lambda: calls.append(1) or real)
    else:
        monkeypatch.setattr(selection, "_native", lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the C passes split a tensor between threads, each with its own counters
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    g = torch.Generator().manual_seed(7)
    sizes = [selection._CHUNK + 4099, 70_001, 3, 150_000]
    n = sum(sizes)
    assert n > selection.SMALL_SELECTION and max(sizes) > selection._CHUNK
    flat = torch.randint(-40, 40, (n,), generator=g).float() * 0.125            # 640 distinct values, ties
    fine = torch.rand(n, generator=g) < 0.3
    flat[fine] = (1.0 + torch.randint(0, 300, (int(fine.sum()),), generator=g) * 2 ** -20)  # same high bits
    keys = _keys(flat)
    for k in (1, n // 3, n // 2 + 12_345, n - 17):
        thr = kth_threshold(list(keys.split(sizes)), k)
        assert thr.equal > thr.ties  # the tie-break really runs
        got = _select(keys, sizes, k)
        assert int(got.sum()) == k
        assert torch.equal(got, _brute_force(keys, k))
    assert bool(calls) if native else True  # the C path really ran


def test_many_ties_take_the_histogram_path_for_the_hashes_too():
    n = selection.SMALL_SELECTION * 2 + 1001
    flat = torch.zeros(n)
    flat[::7] = -1.0
    flat[1::11] = 2.5
    keys = _keys(flat)
    sizes = [n // 3, n - n // 3]
    k = n // 2
    thr = kth_threshold(list(keys.split(sizes)), k)
    assert thr.equal > selection.SMALL_SELECTION  # more tied keys than the sort path takes
    got = _select(keys, sizes, k)
    assert int(got.sum()) == k and torch.equal(got, _brute_force(keys, k))


def test_selection_does_not_depend_on_the_chunk_size():
    g = torch.Generator().manual_seed(3)
    flat = torch.randint(0, 4, (50_000,), generator=g).float()
    keys, sizes = _keys(flat), [20_000, 30_000]
    masks = [_select(keys, sizes, 21_000, chunk=c) for c in (1 << 20, 4096, 999)]
    assert all(torch.equal(m, masks[0]) for m in masks)


# --- equal scores are not taken by position ---------------------------------------------

def test_equal_scores_are_pruned_evenly_across_and_within_tensors():
    sizes = [5_000, 20_000, 3_000, 40_000, 10_000]
    n, k = sum(sizes), int(0.4 * sum(sizes))
    keys = _keys(torch.full((n,), 0.25))
    got = _select(keys, sizes, k)
    assert int(got.sum()) == k
    assert torch.equal(got, _select(keys, sizes, k)), "not deterministic"
    for part in got.split(sizes):
        assert part.float().mean().item() == pytest.approx(0.4, abs=0.03)  # not the first tensors wholesale
        half = part.numel() // 2
        assert part[:half].float().mean().item() == pytest.approx(part[half:].float().mean().item(), abs=0.05)


def test_pruner_prunes_tied_weights_evenly_and_deterministically():
    def run():
        torch.manual_seed(0)
        layers = [nn.Linear(100, 100, bias=False) for _ in range(4)]
        with torch.no_grad():
            for layer in layers:
                layer.weight.fill_(0.5)  # every magnitude equal
        pool = [(f"l{i}", layer.weight) for i, layer in enumerate(layers)]
        opt = torch.optim.SGD([p for _, p in pool], lr=0.0)
        pruner = Pruner(pool, Schedule("one-shot", start=1, end=1, final=0.3), build_method("magnitude"), opt)
        pruner.update(1)
        return pruner

    a, b = run(), run()
    assert a.pruned_count == target_count(0.3, 40_000) == a.masks.count()
    assert all(torch.equal(x, y) for x, y in zip(a.masks.bits, b.masks.bits))
    fractions = [int(m.sum()) / m.numel() for m in a.masks.pruned]
    assert all(f == pytest.approx(0.3, abs=0.03) for f in fractions), fractions


def test_spt_sparsity_is_not_front_loaded():
    # SPT's never-explored weights all score exactly 0: an update that reaches into them
    # must spread over the layers, not take the first layers first.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64),
                          nn.Tanh(), nn.Linear(64, 8))
    pool = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    method = build_method("spt", spt_epsilon=0.002, spt_alpha=0.5, seed=1, last_step=5)
    assert isinstance(method, SPT)
    pruner = Pruner(pool, Schedule("one-shot", start=5, end=5, final=0.5), method, opt)
    g = torch.Generator().manual_seed(2)

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    for step in range(1, 6):
        batch = (torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g))
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        pruner.observe(Observation(step, model, batch, loss_fn, loss.item()))
        pruner.after_backward()
        opt.step()
        pruner.after_step(step)
    unexplored = sum(int((r == 0).sum()) for r in method.rewards)
    assert unexplored > 0.9 * pruner.numel  # the update reaches deep into the zeros
    assert pruner.pruned_count == target_count(0.5, pruner.numel)
    sparsity = [int(m.sum()) / m.numel() for m in pruner.masks.pruned]
    assert all(s == pytest.approx(0.5, abs=0.06) for s in sparsity), sparsity


def _signed(w, state, out, ctx) -> None:
    """A score that is negative for negative weights: selection must transform its keys."""
    out.copy_(w)


@pytest.mark.parametrize("score", [_signed, "magnitude"])
def test_pruner_update_matches_brute_force(score):
    # The real path: scores written by the method, pruned weights kept lowest, one parameter
    # longer than a chunk, more keys than the sort path takes, exact ties, negative scores.
    g = torch.Generator().manual_seed(11)
    big = nn.Parameter(torch.randint(-30, 30, (selection._CHUNK + 3001,), generator=g).float() * 0.5)
    small = nn.Parameter(torch.randint(-30, 30, (300, 500), generator=g).float() * 0.25)
    params = [big, small]
    method = build_method("magnitude") if score == "magnitude" else score
    pruner = Pruner([("big", big), ("small", small)], Schedule("linear", start=1, end=2, final=0.6, initial=0.2),
                    method, torch.optim.SGD(params, lr=0.0))
    assert pruner.method.nonnegative is (score == "magnitude")

    def expected(k: int, pruned_before: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        keys = _keys(flat.abs() if score == "magnitude" else flat)
        keys[pruned_before] = selection.INT32_MIN
        return _brute_force(keys, k)

    nothing = torch.zeros(pruner.numel, dtype=torch.bool)
    want = expected(target_count(0.2, pruner.numel), nothing)
    pruner.update(1)
    got = torch.cat([m.reshape(-1) for m in pruner.masks.pruned])
    assert torch.equal(got, want)
    with torch.no_grad():  # live weights now score below the pruned ones' old values: pruned stay pruned anyway
        big[~got[:big.numel()]] -= 3.0
    want = expected(target_count(0.6, pruner.numel), got)
    pruner.update(2)
    got2 = torch.cat([m.reshape(-1) for m in pruner.masks.pruned])
    assert int(got2.sum()) == target_count(0.6, pruner.numel)
    assert torch.equal(got2, want)
    assert not (got & ~got2).any()


@pytest.mark.parametrize("first_index", [0, 12_345])
def test_the_store_takes_a_tie_at_the_threshold_as_iter_selection_takes_it(first_index):
    # Keys from a small range: every threshold has many tied keys, of which only some are taken. The C store
    # selects the keys below the threshold, finds the tied ones in the same pass and takes the same share.
    g = torch.Generator().manual_seed(3)
    sizes = [300_001, 77, 190_000]
    for k in (1, 5_000, 250_000, 489_000):
        keys = [torch.randint(-50, 50, (n,), generator=g, dtype=torch.int32) for n in sizes]
        thr = selection.kth_threshold(keys, k)
        assert thr.ties < thr.equal  # a tie to break
        expected = torch.cat([torch.cat([c for j, _, c in selection.iter_selection(keys, thr, first_index=first_index)
                                         if j == i]) for i in range(len(keys))])
        bits = [torch.full(((n + 7) // 8,), 0xA5, dtype=torch.uint8) for n in sizes]  # old bits: overwritten
        targets = [[torch.ones(n), torch.full((n,), 2.0)] for n in sizes]
        assert selection.store_selection(keys, thr, bits, targets, first_index)
        got = torch.cat([unpack_bits(b, n) for b, n in zip(bits, sizes)])
        assert torch.equal(got, expected) and int(got.sum()) == k
        for t in range(2):
            zeroed = torch.cat([group[t] == 0 for group in targets])
            assert torch.equal(zeroed, expected)


def test_too_many_tied_keys_are_left_to_iter_selection(monkeypatch):
    monkeypatch.setattr(selection, "TIES_SETTLED_AT_MOST", 10)
    keys = [torch.zeros(1000, dtype=torch.int32)]
    thr = selection.kth_threshold(keys, 500)
    bits, target = [torch.zeros(125, dtype=torch.uint8)], torch.ones(1000)
    assert not selection.store_selection(keys, thr, bits, [[target]])
    assert bool((bits[0] == 0).all()) and bool((target == 1).all())  # nothing written


@pytest.mark.parametrize("others_in_the_zero_bin", [False, True])
def test_a_threshold_among_exact_zeros_is_found_with_or_without_the_second_pass(others_in_the_zero_bin):
    # Half the keys exactly 0 (the scores of weights an earlier pruning zeroed): the k-th key is 0 and the
    # C passes skip the second histogram when its bin holds nothing else. With tiny positive keys in the
    # same bin (subnormal scores) the second pass must run and find them.
    g = torch.Generator().manual_seed(5)
    n = selection.SMALL_SELECTION * 2
    keys = torch.randint(1 << 20, 1 << 30, (n,), generator=g, dtype=torch.int32)
    keys[torch.randperm(n, generator=g)[:n // 2]] = 0
    if others_in_the_zero_bin:
        keys[torch.randperm(n, generator=g)[:1000]] = torch.randint(1, 1 << 16, (1000,), generator=g,
                                                                     dtype=torch.int32)
    ordered = torch.sort(keys).values
    for k in (1, n // 4, n // 2 - 500, n // 2 + 10):
        thr = selection.kth_threshold([keys], k)
        key = int(ordered[k - 1])
        assert thr.key == key and thr.equal == int((keys == key).sum()) and thr.ties == k - int((keys < key).sum())
