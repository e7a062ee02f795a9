"""Importance scores on hand-made tensors with known values."""

from __future__ import annotations

import pytest
import torch

from lib.pruning.methods import build_method
from lib.pruning.scores import EPS, ScoreContext, bitter7, magnitude

CTX = ScoreContext(step=10)


def _score(fn, w, state):
    out = torch.full_like(w, float("nan"), dtype=torch.float32)
    fn(w, state, out, CTX)
    return out


def test_magnitude_writes_abs_w_in_place():
    w = torch.tensor([[-2.0, 0.0], [3.5, -0.25]])
    out = torch.full((2, 2), -7.0)
    ptr = out.data_ptr()
    magnitude(w, {}, out, CTX)
    assert out.data_ptr() == ptr
    assert torch.equal(out, torch.tensor([[2.0, 0.0], [3.5, 0.25]]))
    assert torch.equal(w, torch.tensor([[-2.0, 0.0], [3.5, -0.25]]))  # weight untouched


def test_magnitude_ignores_state():
    w = torch.tensor([1.0, -4.0])
    state = {"exp_avg_sq": torch.tensor([100.0, 1e-6]), "exp_avg": torch.tensor([5.0, -5.0])}
    assert torch.equal(_score(magnitude, w, state), torch.tensor([1.0, 4.0]))


def test_bitter7_known_values():
    w = torch.tensor([-2.0, 3.0, 0.5, 1.0, 0.0])
    v = torch.tensor([16.0, 1.0, 0.0625, 0.0, 81.0])
    state = {"exp_avg": torch.zeros(5), "exp_avg_sq": v.clone()}
    got = _score(bitter7, w, state)
    expected = [
        2.0 * (16.0 + 1e-8) ** 0.25,    # ~4.0
        3.0 * (1.0 + 1e-8) ** 0.25,     # ~3.0
        0.5 * (0.0625 + 1e-8) ** 0.25,  # ~0.25
        1.0 * (0.0 + 1e-8) ** 0.25,     # 0.01: eps keeps a zero-v weight from scoring 0
        0.0,
    ]
    assert got.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert got[0].item() == pytest.approx(4.0, rel=1e-6)
    assert got[3].item() == pytest.approx(0.01, rel=1e-4)
    # the state is read, never modified
    assert torch.equal(state["exp_avg_sq"], v)


def test_bitter7_uses_abs_of_v_and_w():
    w = torch.tensor([-3.0, 3.0])
    state = {"exp_avg_sq": torch.tensor([-16.0, 16.0])}
    got = _score(bitter7, w, state)
    assert got[0].item() == got[1].item() == pytest.approx(3.0 * (16 + EPS) ** 0.25, rel=1e-6)
    assert (got > 0).all()


def test_bitter7_without_state_falls_back_to_magnitude():
    w = torch.tensor([[-1.5, 2.0, 0.0]])
    assert torch.equal(_score(bitter7, w, {}), torch.tensor([[1.5, 2.0, 0.0]]))
    # a state without exp_avg_sq (e.g. before Adam's first step) is the same
    assert torch.equal(_score(bitter7, w, {"step": torch.tensor(0.0)}), torch.tensor([[1.5, 2.0, 0.0]]))


def test_bitter7_larger_v_ranks_higher_for_equal_magnitude():
    w = torch.tensor([0.7, -0.7, 0.7])
    state = {"exp_avg_sq": torch.tensor([1e-6, 1e-2, 1e-4])}
    got = _score(bitter7, w, state)
    assert got[1] > got[2] > got[0]
    # and magnitude alone cannot tell them apart
    m = _score(magnitude, w, state)
    assert m[0] == m[1] == m[2]


def test_bitter7_writes_into_a_view_of_a_larger_buffer():
    # A score writes only into `out`, which may be a view of a larger tensor.
    buffer = torch.full((10,), -1.0)
    w = torch.tensor([[2.0, -1.0], [0.5, 4.0]])
    v = torch.tensor([[1.0, 16.0], [0.0, 1.0]])
    bitter7(w, {"exp_avg_sq": v}, buffer[3:7].view(2, 2), CTX)
    assert buffer[:3].tolist() == [-1.0] * 3 and buffer[7:].tolist() == [-1.0] * 3
    expected = (v + EPS).pow(0.25) * w.abs()
    assert buffer[3:7].tolist() == pytest.approx(expected.reshape(-1).tolist(), rel=1e-6)


def test_method_lookup():
    assert build_method("state", "bitter7").fn is bitter7
    assert build_method("magnitude").fn is magnitude
    with pytest.raises((KeyError, ValueError)):
        build_method("state", "bitter-unknown")
    with pytest.raises((KeyError, ValueError)):
        build_method("no-such-method")


# --- every state variant against SPEC §4, computed independently ------------

import math  # noqa: E402

from lib.pruning.registry import VARIANT_NAMES, VARIANTS  # noqa: E402
from lib.pruning.scores import STATE_VARIANTS, bitter3  # noqa: E402

# Hand-made values: signs of w and m in every combination, v from tiny to large, a zero m and a zero v.
W = [0.5, -0.5, 2.0, -3.0, 0.25, 1.0, -0.75, 0.0]
M = [0.1, -0.2, -0.04, 0.3, 0.0, 1e-3, -1e-3, 0.5]
V = [0.04, 0.01, 1e-4, 0.25, 0.09, 0.0, 1e-6, 1.0]
T_STATE = 3          # Adam step recorded in the state
BETA1 = 0.9


def _state(t=T_STATE):
    return {"exp_avg": torch.tensor(M), "exp_avg_sq": torch.tensor(V), "step": torch.tensor(float(t))}


def _mtz(w, m, v):
    sign = (w > 0) - (w < 0)
    return sign * m / (math.sqrt(v) + 1e-8)


def _spec(variant, w, m, v, t=T_STATE, beta1=BETA1):
    """SPEC §4's table, one element at a time in float64."""
    e = 1e-8
    aw = abs(w)
    if variant == "bitter0":
        return aw * abs(m) * aw / (math.sqrt(v) + e)
    if variant in ("bitter1", "bitter2"):
        return aw
    if variant in ("bitter3", "bitter4"):
        return aw * math.sqrt(abs(m) + e)
    if variant == "bitter5":
        return -_mtz(w, m, v) + 0.1 * aw
    if variant == "bitter6":
        return aw * math.sqrt(abs(m) + e) * math.sqrt(m * m / (v + e))
    if variant == "bitter7":
        return aw * (abs(v) + e) ** 0.25
    if variant == "bitter8":
        return aw * math.sqrt(abs(m / (1 - beta1 ** t)) + e)
    if variant == "bitter9":
        return aw * math.sqrt(abs(m) + e) - 0.1 * _mtz(w, m, v)
    raise AssertionError(f"{variant}: add its formula here (README: Adding a pruning method or variant)")


def _score_ctx(fn, w, state, ctx):
    out = torch.full_like(w, float("nan"), dtype=torch.float32)
    fn(w, state, out, ctx)
    return out


ALL_VARIANTS = list(VARIANT_NAMES)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_state_variant_matches_spec_formula(variant):
    w = torch.tensor(W)
    state = _state()
    before = {k: v.clone() for k, v in state.items()}
    # ctx.step differs from state["step"]: the state's t is the one the formula uses
    got = _score_ctx(STATE_VARIANTS[variant], w, state, ScoreContext(step=1000, beta1=BETA1))
    expected = [_spec(variant, *x) for x in zip(W, M, V)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert torch.isfinite(got).all()
    assert torch.equal(w, torch.tensor(W))  # inputs are read, never written
    assert all(torch.equal(state[k], before[k]) for k in before)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_state_variant_through_build_method(variant):
    # what the pruner calls: Method.score(index, w, state, out, ctx)
    method = build_method("state", variant)
    assert method.name == variant
    out = torch.full((len(W),), float("nan"))
    method.score(0, torch.tensor(W), _state(), out, ScoreContext(step=1000, beta1=BETA1))
    assert out.tolist() == pytest.approx([_spec(variant, *x) for x in zip(W, M, V)], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("state", [{}, {"step": torch.tensor(0.0)}], ids=["empty", "step-only"])
def test_every_variant_falls_back_to_magnitude_without_adam_state(variant, state):
    w = torch.tensor([[-1.5, 2.0, 0.0], [0.125, -7.0, 3.0]])
    got = _score_ctx(STATE_VARIANTS[variant], w, dict(state), CTX)
    assert torch.equal(got, w.abs())


@pytest.mark.parametrize("variant", ["bitter1", "bitter2"])
def test_bitter1_and_bitter2_are_magnitude_whatever_the_state(variant):
    w = torch.tensor(W)
    got = _score_ctx(STATE_VARIANTS[variant], w, _state(), CTX)
    assert torch.equal(got, w.abs())


def test_bitter4_score_equals_bitter3():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g)
    state = {"exp_avg": torch.randn(7, 5, generator=g), "exp_avg_sq": torch.rand(7, 5, generator=g),
             "step": torch.tensor(12.0)}
    a = _score_ctx(STATE_VARIANTS["bitter4"], w, state, CTX)
    b = _score_ctx(bitter3, w, state, CTX)
    assert torch.equal(a, b)
    # and bitter3 is not magnitude: the state matters
    assert not torch.equal(b, w.abs())


def test_bitter8_uses_the_step_recorded_in_the_state():
    w = torch.tensor(W)
    fn = STATE_VARIANTS["bitter8"]
    ctx = ScoreContext(step=500, beta1=BETA1)
    early = _score_ctx(fn, w, _state(t=1), ctx)
    later = _score_ctx(fn, w, _state(t=4), ctx)
    live = torch.tensor(M) != 0
    assert (early[live & (w != 0)] != later[live & (w != 0)]).all()
    for t, got in ((1, early), (4, later)):
        # bitter3 of the bias-corrected momentum m / (1 - beta1^t)
        c = 1 - BETA1 ** t
        corrected = {"exp_avg": torch.tensor(M) / c, "exp_avg_sq": torch.tensor(V)}
        assert got.tolist() == pytest.approx(_score_ctx(bitter3, w, corrected, ctx).tolist(), rel=1e-6, abs=1e-9)
        assert got.tolist() == pytest.approx([_spec("bitter8", *x, t=t) for x in zip(W, M, V)], rel=1e-5)
    # t = 1 divides m by 0.1: much larger than bitter3 for a weight with momentum
    plain = _score_ctx(bitter3, w, _state(), ctx)
    assert (early[live & (w != 0)] > plain[live & (w != 0)]).all()
    # a long way into training the correction vanishes
    late = _score_ctx(fn, w, _state(t=10_000), ctx)
    assert late.tolist() == pytest.approx(plain.tolist(), rel=1e-6)


def test_bitter8_uses_beta1_from_the_context():
    w = torch.tensor(W)
    fn = STATE_VARIANTS["bitter8"]
    a = _score_ctx(fn, w, _state(t=2), ScoreContext(step=2, beta1=0.9))
    b = _score_ctx(fn, w, _state(t=2), ScoreContext(step=2, beta1=0.5))
    assert b.tolist() == pytest.approx([_spec("bitter8", *x, t=2, beta1=0.5) for x in zip(W, M, V)], rel=1e-5)
    assert not torch.equal(a, b)


def test_bitter8_after_one_real_adamw_step_sees_the_gradient():
    # After AdamW's first step m = (1 - beta1) g, so the bias-corrected momentum is g itself.
    p = torch.nn.Parameter(torch.tensor([0.5, -2.0, 1.0]))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.tensor([0.3, 0.01, -4.0])
    p.grad = g.clone()
    opt.step()
    w = p.detach().clone()
    got = _score_ctx(STATE_VARIANTS["bitter8"], w, opt.state[p], ScoreContext(step=1, beta1=0.9))
    expected = [abs(wi) * math.sqrt(abs(gi) + 1e-8) for wi, gi in zip(w.tolist(), g.tolist())]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


# --- bitter5 and bitter9: a weight Adam drives toward zero ranks lower -------

def _adam_direction_moves_toward_zero(w, m, v, lr=1e-3):
    """Adam's update is -lr * m / (sqrt(v) + eps): does it shrink |w|?"""
    return abs(w - lr * m / (math.sqrt(v) + 1e-8)) < abs(w)


@pytest.mark.parametrize("variant", ["bitter5", "bitter9"])
@pytest.mark.parametrize("w_value, m_toward, m_away", [
    (0.5, 0.1, -0.1),     # w > 0: m > 0 shrinks it
    (-0.5, -0.1, 0.1),    # w < 0: m < 0 shrinks it
    (2.0, 3e-3, -3e-3),   # small momentum, large weight
])
def test_weight_moving_toward_zero_ranks_lower(variant, w_value, m_toward, m_away):
    w = torch.tensor([w_value, w_value])
    v = 0.01
    assert _adam_direction_moves_toward_zero(w_value, m_toward, v)
    assert not _adam_direction_moves_toward_zero(w_value, m_away, v)
    state = {"exp_avg": torch.tensor([m_toward, m_away]), "exp_avg_sq": torch.tensor([v, v]),
             "step": torch.tensor(5.0)}
    got = _score_ctx(STATE_VARIANTS[variant], w, state, CTX)
    assert got[0] < got[1], f"{variant}: the weight Adam shrinks must score lower ({got.tolist()})"


@pytest.mark.parametrize("variant", ["bitter5", "bitter9"])
def test_weight_moving_toward_zero_is_pruned_first_by_a_real_adam_step(variant):
    # Two weights of equal |w|: after one Adam step the moments say which one Adam shrinks.
    p = torch.nn.Parameter(torch.tensor([0.5, 0.5, -0.5, -0.5]))
    opt = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.tensor([1.0, -1.0, -1.0, 1.0])  # shrinks p[0] and p[2], grows p[1] and p[3]
    opt.step()
    w = p.detach().clone()
    assert w.abs()[0] < w.abs()[1] and w.abs()[2] < w.abs()[3]  # Adam really did that
    got = _score_ctx(STATE_VARIANTS[variant], w, opt.state[p], CTX)
    assert got[0] < got[1] and got[2] < got[3]
    assert got[0] < got[3] and got[2] < got[1]


# --- scores marked non-negative: their float bits are the selection keys -------------

NONNEGATIVE_ROWS = [v for v in VARIANTS if v.nonnegative]


@pytest.mark.parametrize("variant", NONNEGATIVE_ROWS, ids=lambda v: v.name)
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_nonnegative_scores_never_produce_negatives_or_minus_zero(variant, beta1):
    # A -0.0 or negative score would read as a huge int32 key and rank as the most important weight.
    g = torch.Generator().manual_seed(0)
    n = 20_000
    w = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4)
    m = torch.randn(n, generator=g) * 1e-3
    v = torch.rand(n, generator=g).pow(6) * 1e-4
    for t, zeros in ((w, 0.2), (m, 0.2), (v, 0.1)):  # -0.0 and +0.0 entries, as pruning and resets leave them
        t[torch.rand(n, generator=g) < zeros / 2] = -0.0
        t[torch.rand(n, generator=g) < zeros / 2] = 0.0
    assert torch.signbit(w[w == 0]).any() and torch.signbit(m[m == 0]).any() and torch.signbit(v[v == 0]).any()
    for state in ({}, {"exp_avg": m, "exp_avg_sq": v, "step": torch.tensor(3.0)}):
        out = torch.full_like(w, float("nan"))
        build_method("state", variant.name).score(0, w, state, out, ScoreContext(step=3, beta1=beta1))
        assert not torch.isnan(out).any()
        assert not torch.signbit(out).any(), f"{variant.name}: a negative or -0.0 score"


def test_magnitude_is_nonnegative_on_minus_zero():
    w = torch.tensor([-0.0, 0.0, -1.5, 2.0])
    out = torch.empty(4)
    build_method("magnitude").score(0, w, {}, out, CTX)
    assert not torch.signbit(out).any()
