"""select.c's one pass from weights to selection keys (selection.score_keys), as a mask update uses it on the CPU.

The pass must be the score functions of lib/pruning/scores.py (same operations, same order, one
rounding each, square roots correctly rounded), their keys as floats_to_keys_ makes them, pruned
weights the lowest key, and the first radix histogram of exactly those keys; and an update that
scores through it must select what the torch scores select.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.pruning import selection
from lib.pruning.masks import pack_bits
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.pruning.scores import NATIVE_READS, STATE_VARIANTS, ScoreContext, magnitude, native_arguments
from lib.pruning.selection import INT32_MIN, Counters, floats_to_keys_, score_keys
from lib.pruning.structure import Block
from lib.pruning.update_pass import UpdatePass

N = 70_001  # above the pass's one-thread limit (2**16): two threads split it, not at a multiple of 64
FORMULAS = {fn.__name__: fn for fn in NATIVE_READS}


def _inputs(seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, generator=g) * 0.05
    m = torch.randn(N, generator=g) * 1e-3
    v = torch.rand(N, generator=g) ** 2 * 1e-5
    w[::97], w[1::97] = 0.0, -0.0  # pruned-like zeros of both signs
    m[::89], v[::83] = 0.0, 0.0
    v[5::101] = 1e-42  # subnormal second moments
    state = {"exp_avg": m, "exp_avg_sq": v, "step": torch.tensor(7.0)}
    return w, state


def _correctly_rounded_sqrt(monkeypatch) -> None:
    """torch's CPU square root may be one unit off in the last place: round it once from float64, as C's sqrtf."""
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda self: torch.sqrt(self.double()).to(self.dtype))
    monkeypatch.setattr(torch.Tensor, "sqrt_", lambda self: self.copy_(torch.sqrt(self.double())))


@pytest.mark.parametrize("name", list(FORMULAS))
def test_the_c_pass_is_the_score_formula_bit_for_bit(name, monkeypatch):
    torch.set_num_threads(2)
    w, state = _inputs()
    ctx = ScoreContext(step=7, beta1=0.9)
    formula, m, v, correction = native_arguments(FORMULAS[name], state, ctx)
    keys = torch.empty(N)
    assert score_keys(formula, w, m, v, keys, None, correction)
    _correctly_rounded_sqrt(monkeypatch)
    expected = torch.empty(N)
    FORMULAS[name](w, state, expected, ctx)
    assert torch.equal(keys.view(torch.int32), floats_to_keys_(expected.clone())), name
    # and the scores are not all alike (a pass writing |w| for every formula would fail the others)
    assert len(torch.unique(keys.view(torch.int32))) > N // 2


@pytest.mark.parametrize("name", ["bitter5", "bitter7"])
def test_the_c_pass_writes_the_scores_themselves_for_a_group_structure(name, monkeypatch):
    w, state = _inputs()
    ctx = ScoreContext(step=7)
    formula, m, v, correction = native_arguments(FORMULAS[name], state, ctx)
    scores = torch.empty(N)
    pruned = pack_bits(torch.ones(N, dtype=torch.bool))  # ignored: a group structure prunes groups
    assert score_keys(formula, w, m, v, scores, pruned, correction, keys=False)
    _correctly_rounded_sqrt(monkeypatch)
    expected = torch.empty(N)
    FORMULAS[name](w, state, expected, ctx)
    assert torch.equal(scores.view(torch.int32), expected.view(torch.int32))
    assert bool((scores < 0).any()) == (name == "bitter5")  # floats, not order-preserving keys


def test_a_variant_without_its_adam_state_scores_magnitude_as_the_torch_function_does():
    w, _ = _inputs()
    for fn in STATE_VARIANTS.values():
        formula, m, v, _ = native_arguments(fn, {}, ScoreContext(step=1))
        keys, expected = torch.empty(N), torch.empty(N)
        assert score_keys(formula, w, m, v, keys, None)
        fn(w, {}, expected, ScoreContext(step=1))
        magnitude(w, {}, expected, ScoreContext(step=1))
        assert torch.equal(keys.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("threads", [1, 2])
def test_pruned_weights_get_the_lowest_key_and_the_first_histogram_counts_the_keys(threads):
    torch.set_num_threads(threads)
    w, state = _inputs(1)
    pruned = torch.zeros(N, dtype=torch.bool)
    pruned[torch.randperm(N, generator=torch.Generator().manual_seed(2))[:N // 3]] = True
    keys = torch.empty(N)
    with Counters(threads) as counters:
        assert score_keys("bitter5", w, state["exp_avg"], state["exp_avg_sq"], keys, pack_bits(pruned), 1.0, counters)
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        counters.take(hist)
    k = keys.view(torch.int32)
    assert bool((k[pruned] == INT32_MIN).all()) and not bool((k[~pruned] == INT32_MIN).any())
    unpruned = torch.empty(N)
    assert score_keys("bitter5", w, state["exp_avg"], state["exp_avg_sq"], unpruned, None)
    assert torch.equal(k[~pruned], unpruned.view(torch.int32)[~pruned])
    assert torch.equal(hist, torch.bincount((k.long() >> 16) + (1 << 15), minlength=1 << 16))


def test_the_c_pass_refuses_what_it_cannot_take():
    w, state = _inputs()
    out = torch.empty(N)
    assert not score_keys("movement", w, None, None, out, None)  # no such formula in select.c
    assert not score_keys("magnitude", w.double(), None, None, out, None)
    assert not score_keys("magnitude", w[::2], None, None, torch.empty(N // 2 + 1), None)  # not contiguous


def _pruner(params, scope: str = "global", kind: str = "unstructured") -> Pruner:
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return Pruner([(f"w{i}", p) for i, p in enumerate(params)], Schedule("linear", start=1, end=3, final=0.6),
                  build_method("magnitude"), opt, scope=scope,
                  structure=Block(4, 4) if kind == "block" else None)


@pytest.mark.parametrize("kind, scope", [("unstructured", "global"), ("unstructured", "layer"), ("block", "global")])
def test_an_update_through_the_c_pass_selects_what_the_torch_scores_select(kind, scope, monkeypatch):
    # Magnitude has no square root, so both paths score alike bit for bit. Two updates (the second keeps
    # the first's pruned weights), a pool above the sort's limit (the histograms run, the first counted
    # in the score pass under global scope).
    torch.set_num_threads(2)
    shapes = [(384, 512), (700, 300), (36, 8)]
    assert sum(a * b for a, b in shapes) > selection.SMALL_SELECTION
    bits, passes = {}, {}
    for path in ("c", "torch"):
        torch.manual_seed(0)  # the same gradients, so the same weights, for both
        params = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
        pruner = _pruner(params, scope, kind)
        calls = []
        native = UpdatePass._native_keys_

        def counted(self, *args, path=path, **kwargs):
            calls.append(1)
            return native(self, *args, **kwargs) if path == "c" else False
        monkeypatch.setattr(UpdatePass, "_native_keys_", counted)
        for step in (2, 3):  # sparsity 0.3, then 0.6
            for p in params:
                p.grad = torch.randn_like(p)
            pruner.after_step(step)
        bits[path], passes[path] = [b.clone() for b in pruner.masks.bits], len(calls)
        assert pruner.masks.count() == pruner.pruned_count > 0
        assert pruner.structure.pruned_groups() == pruner.target_groups(0.6)  # weights, or 4 x 4 tiles
    assert passes["c"] == passes["torch"] == 2 * len(shapes)
    assert all(torch.equal(a, b) for a, b in zip(bits["c"], bits["torch"]))
