"""AdamWSPAM: AdamW parity, spike clipping, momentum reset, cosine re-warm, pruned weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lib.spam import REWARM_FLOOR, SPIKE_CLIP_DELAY, AdamWSPAM, cosine_rewarm


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _adam_term(state, beta1, beta2, eps):
    """m_hat / (sqrt(v_hat) + eps) from a parameter's state after a step."""
    step = state["step"].item()
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    return (state["exp_avg"] / bc1) / (state["exp_avg_sq"].sqrt() / bc2_sqrt + eps)


# 1. base update and weight decay are AdamW's --------------------------------------------------

@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_torch_adamw_when_spam_mechanisms_are_off(amsgrad):
    shapes = [(6, 4), (4,), (3, 5), (5,)]
    a, b = _params(shapes), _params(shapes)
    initial = [p.detach().clone() for p in a]

    def groups(ps):  # kprune's layout: decayed matrices, non-decayed vectors
        return [{"params": [ps[0], ps[2]], "weight_decay": 0.1}, {"params": [ps[1], ps[3]], "weight_decay": 0.0}]

    hp = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-7, amsgrad=amsgrad)
    ref = torch.optim.AdamW(groups(a), foreach=False, **hp)
    spam = AdamWSPAM(groups(b), theta=1e12, interval=10**9, warmup=0, **hp)
    gen = torch.Generator().manual_seed(1)
    n = 60
    for i in range(n):
        lr = 1e-2 * 0.5 * (1 + math.cos(math.pi * i / n))  # an external schedule sets lr before step()
        for opt in (ref, spam):
            for g in opt.param_groups:
                g["lr"] = lr
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=gen) * (100.0 if i == 40 else 1.0)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        ref.step()
        spam.step()
    for pa, pb, p0 in zip(a, b, initial):
        assert not torch.allclose(pa, p0)  # the run really moved the weights
        assert torch.allclose(pb, pa, rtol=1e-6, atol=0), (pb - pa).abs().max()
    for pa, pb in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert torch.allclose(spam.state[pb][key], ref.state[pa][key], rtol=1e-6, atol=0)
        assert spam.state[pb]["step"].item() == n
    assert spam.rewarm_factor(0) == 1.0 and spam.rewarm_factor(spam.param_groups[1]) == 1.0


# 2. spike clipping ----------------------------------------------------------------------------

def test_spiked_element_is_clipped_to_sign_sqrt_theta_v():
    theta, beta1, beta2, eps, lr = 5000.0, 0.9, 0.999, 1e-8, 1e-3
    p = nn.Parameter(torch.zeros(4))
    opt = AdamWSPAM([p], lr=lr, theta=theta, interval=1000, warmup=150)
    base = torch.tensor([0.01, -0.02, 0.03, -0.01])
    for _ in range(30):
        p.grad = base.clone()
        opt.step()
    st = opt.state[p]
    m_prev, v_prev, w_prev = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), p.detach().clone()

    spiked = base.clone()
    spiked[1] *= 1000.0
    assert spiked[1] ** 2 > theta * v_prev[1]  # it is a spike
    assert (base ** 2 < theta * v_prev).all()  # the ordinary values are not
    p.grad = spiked.clone()
    opt.step()

    limit = torch.sqrt(theta * v_prev[1])
    used = base.clone()
    used[1] = -limit  # sign(g) * sqrt(theta * v), v from before this step
    torch.testing.assert_close(st["exp_avg"], beta1 * m_prev + (1 - beta1) * used)
    torch.testing.assert_close(st["exp_avg_sq"], beta2 * v_prev + (1 - beta2) * used ** 2)
    # non-spiked elements saw their own gradient, bit for bit as an unclipped update would
    for i in (0, 2, 3):
        assert st["exp_avg"][i] == beta1 * m_prev[i] + (1 - beta1) * base[i]
    # the clipped value is far below the raw spike
    unclipped_m1 = beta1 * m_prev[1] + (1 - beta1) * spiked[1]
    assert st["exp_avg"][1].abs() < 0.05 * unclipped_m1.abs()
    # the parameter moved by the clipped Adam update
    torch.testing.assert_close(p.detach(), w_prev - lr * _adam_term(st, beta1, beta2, eps))
    # the caller's gradient is left alone
    assert torch.equal(p.grad, spiked)


def test_no_clipping_until_v_has_enough_updates_since_start_or_reset():
    interval = 60

    def run(spike_at):
        p = nn.Parameter(torch.zeros(2))
        opt = AdamWSPAM([p], lr=1e-3, interval=interval, warmup=10)
        for t in range(1, spike_at + 1):
            g = torch.tensor([0.01, 0.01])
            if t == spike_at:
                g[0] = 10.0
            p.grad = g
            opt.step()
        return opt.state[p]["exp_avg"][0].item(), opt.state[p]["exp_avg"][1].item()

    def spike_kept(spike_at):  # m[0] - m[1] is 0.1 * (used spike - 0.01)
        m0, m1 = run(spike_at)
        return abs((m0 - m1) / 0.1 - (10.0 - 0.01)) < 1e-3

    assert spike_kept(SPIKE_CLIP_DELAY)  # call 20: v has 19 updates, not clipped
    assert not spike_kept(SPIKE_CLIP_DELAY + 1)  # call 21: v has 20 updates, clipped
    assert spike_kept(interval + SPIKE_CLIP_DELAY)  # 20th call after the reset: not clipped
    assert not spike_kept(interval + SPIKE_CLIP_DELAY + 1)  # 21st call after the reset: clipped


# 3. momentum reset ----------------------------------------------------------------------------

@pytest.mark.parametrize("amsgrad", [False, True])
def test_moments_restart_from_zero_at_the_first_call_of_every_interval(amsgrad):
    interval, (beta1, beta2) = 10, (0.9, 0.999)
    p, q = _params([(3, 4), (5,)])
    opt = AdamWSPAM([p, q], lr=1e-3, amsgrad=amsgrad, interval=interval, warmup=3, betas=(beta1, beta2))
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 26):
        p.grad = torch.randn(p.shape, generator=gen)
        # q has no gradient on the reset call itself: its moments are reset all the same
        q.grad = None if t == 2 * interval + 1 else torch.randn(q.shape, generator=gen)
        before = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} if t > 1 else None
        opt.step()
        st = opt.state[p]
        if t > 1 and (t - 1) % interval == 0:
            # the moments were zeroed before this call's update: they hold this gradient only
            torch.testing.assert_close(st["exp_avg"], (1 - beta1) * p.grad, rtol=0, atol=0)
            torch.testing.assert_close(st["exp_avg_sq"], (1 - beta2) * p.grad * p.grad, rtol=0, atol=0)
        elif before is not None:
            # otherwise the history carries over (not a reset)
            torch.testing.assert_close(st["exp_avg"], beta1 * before["exp_avg"] + (1 - beta1) * p.grad)
        if t == 2 * interval + 1:
            assert all(bool((opt.state[q][k] == 0).all()) for k in ("exp_avg", "exp_avg_sq"))
        elif t < 2 * interval + 1 or t > 2 * interval + 1:
            assert not bool((opt.state[q]["exp_avg"] == 0).all())
    # bias correction is not restarted: the step counter kept counting through both resets
    assert opt.state[p]["step"].item() == 25
    assert opt.state[q]["step"].item() == 24
    assert opt.param_groups[0]["spam_step"] == 25


def test_reset_timing_is_pinned_one_call_after_the_authors_code():
    """Resets (and the 0.01 re-warm) fall on calls 5, 9, 13 for interval 4: one call later than the
    authors' code, which resets at the start of calls 4, 8, 12. On purpose: see lib/spam.py."""
    beta1 = 0.9
    p, = _params([(6,)])
    opt = AdamWSPAM([p], lr=1e-3, interval=4, warmup=2, betas=(beta1, 0.999))
    gen = torch.Generator().manual_seed(4)
    fresh_calls, floor_calls = [], []
    for t in range(1, 14):
        p.grad = torch.randn(p.shape, generator=gen) + 3.0  # never zero: a fresh m is (1 - beta1) * g exactly
        opt.step()
        if torch.equal(opt.state[p]["exp_avg"], (1 - beta1) * p.grad):
            fresh_calls.append(t)
        if opt.rewarm_factor() == REWARM_FLOOR:
            floor_calls.append(t)
    assert fresh_calls == [1, 5, 9, 13]  # call 1 starts from zero moments too
    assert floor_calls == [5, 9, 13]


def test_moments_stay_informative_between_calls_at_a_reset_boundary():
    """State-based pruning reads the moments after call 10: they must still hold the history."""
    p, = _params([(4, 4)])
    opt = AdamWSPAM([p], lr=1e-3, interval=10, warmup=3)
    for _ in range(10):
        p.grad = torch.randn(p.shape)
        opt.step()
    assert not bool((opt.state[p]["exp_avg"] == 0).any())
    assert not bool((opt.state[p]["exp_avg_sq"] == 0).any())


def test_first_update_after_reset_uses_the_global_bias_correction():
    interval, beta1, beta2, eps, lr = 10, 0.9, 0.999, 1e-8, 1e-2
    p = nn.Parameter(torch.ones(3))
    opt = AdamWSPAM([p], lr=lr, interval=interval, warmup=4)
    g = torch.tensor([0.5, -1.0, 2.0])
    for _ in range(interval):
        p.grad = g.clone()
        opt.step()
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()  # call 11: moments start from zero, t = 11
    t = interval + 1
    m, v = (1 - beta1) * g, (1 - beta2) * g * g
    expected = before - lr * cosine_rewarm(0, 4) * (m / (1 - beta1 ** t)) / (v.sqrt() / (1 - beta2 ** t) ** 0.5 + eps)
    torch.testing.assert_close(p.detach(), expected)


# 4. cosine re-warm ----------------------------------------------------------------------------

def test_rewarm_factor_follows_the_cosine_after_each_reset():
    interval, warmup = 20, 8
    p = nn.Parameter(torch.zeros(3))
    opt = AdamWSPAM([p], lr=1e-3, interval=interval, warmup=warmup)
    assert opt.rewarm_factor() == 1.0
    factors = []
    for _ in range(3 * interval):
        p.grad = torch.full((3,), 0.1)
        opt.step()
        factors.append(opt.rewarm_factor(opt.param_groups[0]))
    assert factors[:interval] == [1.0] * interval  # no re-warm before the first reset
    for start in (interval, 2 * interval):  # index `start` is the first call after a reset
        ramp = factors[start:start + warmup]
        expected = [0.01 + 0.99 * 0.5 * (1 - math.cos(math.pi * k / (warmup + 1))) for k in range(warmup)]
        assert ramp == pytest.approx(expected, rel=1e-12)
        assert ramp[0] == pytest.approx(0.01)
        assert all(b > a for a, b in zip(ramp, ramp[1:]))
        assert ramp[-1] < 1.0
        assert factors[start + warmup:start + interval] == [1.0] * (interval - warmup)
    assert [cosine_rewarm(k, 0) for k in range(3)] == [1.0, 1.0, 1.0]


def test_update_shrinks_right_after_reset_and_multiplies_the_external_lr():
    interval, warmup, beta1, beta2, eps, lr = 20, 8, 0.9, 0.999, 1e-8, 1e-2
    p = nn.Parameter(torch.zeros(4))
    opt = AdamWSPAM([p], lr=lr, interval=interval, warmup=warmup)
    g = torch.tensor([0.3, -0.2, 0.1, 0.05])
    deltas = []
    for t in range(1, interval + warmup + 2):
        group_lr = lr * (0.5 if t == interval + 3 else 1.0)  # the schedule changes lr on one call
        opt.param_groups[0]["lr"] = group_lr
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        delta = p.detach() - before
        deltas.append(delta.abs().max().item())
        if t > interval:  # every re-warm step: lr (as set) * factor * Adam term
            k = t - interval - 1
            assert opt.rewarm_factor() == cosine_rewarm(k, warmup)
            expected = -group_lr * cosine_rewarm(k, warmup) * _adam_term(opt.state[p], beta1, beta2, eps)
            torch.testing.assert_close(delta, expected)
        assert opt.param_groups[0]["lr"] == group_lr  # never overwritten
    just_before, just_after = deltas[interval - 1], deltas[interval]
    assert just_after < 0.02 * just_before
    after_warmup = deltas[interval + warmup]
    assert after_warmup > 20 * just_after
    assert all(deltas[i] < deltas[i + 1] for i in range(interval + 3, interval + warmup))


# 5. pruned weights stay exactly zero ----------------------------------------------------------

@pytest.mark.parametrize("amsgrad", [False, True])
def test_zero_grad_zero_state_weights_stay_exactly_zero(amsgrad):
    torch.manual_seed(0)
    dead = nn.Parameter(torch.zeros(4, 3))  # fully pruned matrix
    w = nn.Parameter(torch.randn(5, 6))  # partially pruned below
    b = nn.Parameter(torch.randn(6))
    opt = AdamWSPAM([{"params": [dead, w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                    lr=1e-2, amsgrad=amsgrad, theta=50.0, interval=7, warmup=3)
    mask = torch.rand(w.shape) < 0.5
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 121):
        dead.grad = torch.zeros_like(dead)
        w.grad = torch.randn(w.shape, generator=gen) * (1000.0 if t == 50 else 1.0)
        b.grad = torch.randn(b.shape, generator=gen)
        if t == 30:  # a mask update as kprune does it: weights and same-shaped states zeroed
            with torch.no_grad():
                w.masked_fill_(mask, 0.0)
                for key, value in opt.state[w].items():
                    if key != "step" and value.shape == w.shape:
                        value.masked_fill_(mask, 0.0)
        if t >= 30:
            w.grad.masked_fill_(mask, 0.0)
        opt.step()
        assert torch.equal(dead, torch.zeros_like(dead))
        if t >= 30:
            assert (w[mask] == 0).all()
            assert torch.isfinite(w).all()
    for key, value in opt.state[dead].items():
        if key != "step":
            assert torch.equal(value, torch.zeros_like(value))
    assert (w[~mask] != 0).all()


# 6. invalid arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, -0.1)}, "betas"),
    ({"betas": (0.9,)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"amsgrad": "yes"}, "amsgrad"),
    ({"theta": 0.0}, "theta"),
    ({"theta": -5000.0}, "theta"),
    ({"theta": float("nan")}, "theta"),
    ({"interval": 0}, "interval"),
    ({"interval": 2.5}, "interval"),
    ({"interval": True}, "interval"),
    ({"warmup": -1}, "warmup"),
    ({"warmup": 1.5}, "warmup"),
    ({"warmup": 500, "interval": 500}, "warmup"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        AdamWSPAM([nn.Parameter(torch.zeros(2))], **kwargs)


def test_invalid_group_override_is_rejected():
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"\bweight_decay="):
        AdamWSPAM([{"params": [p]}, {"params": [q], "weight_decay": -1.0}])
    opt = AdamWSPAM([p])
    with pytest.raises(ValueError, match=r"\bwarmup="):
        opt.add_param_group({"params": [q], "warmup": 600})
    assert len(opt.param_groups) == 1


def test_defaults_are_the_papers():
    opt = AdamWSPAM([nn.Parameter(torch.zeros(2))])
    g = opt.param_groups[0]
    assert (g["theta"], g["interval"], g["warmup"]) == (5000.0, 500, 150)
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0, False)


# checkpointing --------------------------------------------------------------------------------

def test_state_dict_round_trip_continues_the_same_trajectory():
    a, b = _params([(3, 3)]), _params([(3, 3)])
    opt_a = AdamWSPAM(a, lr=1e-2, interval=5, warmup=3, amsgrad=True)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(3, 3, generator=gen) for _ in range(20)]
    for grad in grads[:12]:
        a[0].grad = grad.clone()
        opt_a.step()
    with torch.no_grad():
        b[0].copy_(a[0])
    opt_b = AdamWSPAM(b, lr=1.0, interval=5, warmup=3, amsgrad=True)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as a checkpoint file would: no shared tensors
    assert opt_b.param_groups[0]["spam_step"] == 12
    for grad in grads[12:]:
        a[0].grad, b[0].grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
        assert opt_a.rewarm_factor() == opt_b.rewarm_factor()
    assert torch.equal(a[0], b[0])



def test_a_step_never_asks_the_device_whether_anything_spiked(monkeypatch):
    # On a GPU, `if tensor` waits for the device: once per parameter per step. The clip is applied
    # unconditionally instead, and gives, bit for bit, what clipping only the spiked elements gives.
    theta, beta2 = 5000.0, 0.999
    params = _params([(64, 32), (32,)], seed=3)
    opt = AdamWSPAM(params, lr=1e-3, theta=theta, interval=1000, warmup=10)
    g = torch.Generator().manual_seed(4)
    for call in range(SPIKE_CLIP_DELAY + 3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        if call >= SPIKE_CLIP_DELAY:
            grads[0][::7, ::5] *= 300.0  # spikes in one parameter, none in the other
        v_before = [opt.state[p]["exp_avg_sq"].clone() if opt.state[p] else None for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("the step read a tensor's truth value"))
            opt.step()
        if call < SPIKE_CLIP_DELAY:
            continue
        spiked_counts = []
        for p, grad, v in zip(params, grads, v_before):
            limit_sq = v * theta
            spiked = grad * grad > limit_sq
            clipped = grad.clone()
            clipped[spiked] = grad.sign()[spiked] * limit_sq.sqrt()[spiked]
            spiked_counts.append(int(spiked.sum()))
            assert torch.equal(opt.state[p]["exp_avg_sq"], v.mul(beta2).addcmul(clipped, clipped, value=1 - beta2))
        assert spiked_counts[0] > 0 and spiked_counts[1] == 0
