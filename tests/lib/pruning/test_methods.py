"""Pruning methods that watch training (movement, SPT), the method registry and score memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lib.memory import memory_by_kind
from lib.pruning.methods import SPT, FunctionMethod, Movement, Observation, build_method
from lib.pruning.pruner import Pruner, target_count
from lib.pruning.schedules import Schedule
from lib.pruning.registry import TEMPORARIES, VARIANT_NAMES
from lib.pruning.scores import STATE_VARIANTS, ScoreContext, magnitude

CTX = ScoreContext(step=1)
VARIANTS = list(VARIANT_NAMES)


def _obs(step=1, model=None, batch=(), loss_fn=None, loss=0.0) -> Observation:
    return Observation(step=step, model=model, batch=batch, loss_fn=loss_fn, loss=loss)


# --- movement ---------------------------------------------------------------

def test_movement_accumulates_minus_grad_times_weight():
    a = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.0]]))
    b = nn.Parameter(torch.tensor([3.0, -0.25, 1.0]))
    method = Movement()
    method.bind([a, b], [torch.zeros_like(a, dtype=torch.bool), torch.zeros_like(b, dtype=torch.bool)])
    history = [  # (grad a, grad b, new a, new b) per step
        ([[1.0, 2.0], [-0.5, 4.0]], [0.5, 0.5, -2.0], None, None),
        ([[-1.0, 0.5], [0.25, 1.0]], [1.0, -4.0, 0.0], [[0.25, -0.5], [1.0, 2.0]], [-1.0, 0.5, 1.5]),
        ([[2.0, -2.0], [0.0, -1.0]], [0.25, 2.0, 1.0], [[1.0, 1.0], [-2.0, 0.5]], None),
    ]
    expected_a = [[0.0, 0.0], [0.0, 0.0]]
    expected_b = [0.0, 0.0, 0.0]
    for step, (ga, gb, na, nb) in enumerate(history, start=1):
        with torch.no_grad():
            if na is not None:
                a.copy_(torch.tensor(na))
            if nb is not None:
                b.copy_(torch.tensor(nb))
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        wa, wb = a.detach().tolist(), b.detach().tolist()
        for i in range(2):
            for j in range(2):
                expected_a[i][j] -= ga[i][j] * wa[i][j]
        for i in range(3):
            expected_b[i] -= gb[i] * wb[i]
        method.observe(_obs(step))
        assert method.scores[0].tolist() == expected_a  # dyadic values: exact in fp32
        assert method.scores[1].tolist() == expected_b
    # hand-computed totals of the history above
    assert method.scores[0].tolist() == [[-2.25, 4.25], [0.75, -1.5]]
    assert method.scores[1].tolist() == [-0.25, 1.125, 0.5]
    # the score is a copy of the accumulated buffer
    out = torch.full((2, 2), float("nan"))
    method.score(0, a.detach(), {}, out, CTX)
    assert torch.equal(out, method.scores[0])
    out.fill_(99.0)
    assert not torch.equal(out, method.scores[0])  # writing the output does not touch the buffer


def test_movement_skips_parameters_without_gradient():
    a = nn.Parameter(torch.tensor([1.0, 2.0]))
    method = Movement()
    method.bind([a], [torch.zeros(2, dtype=torch.bool)])
    method.observe(_obs())
    assert method.scores[0].tolist() == [0.0, 0.0]


def test_movement_keeps_one_fp32_buffer_per_weight():
    params = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5, dtype=torch.bfloat16)),
              nn.Parameter(torch.zeros(2, 2, 3, dtype=torch.float64))]
    method = build_method("movement")
    method.bind(params, [torch.zeros_like(p, dtype=torch.bool) for p in params])
    bufs = method.buffers()
    assert len(bufs) == len(params)
    for buf, p in zip(bufs, params):
        assert buf.shape == p.shape and buf.dtype == torch.float32
    assert sum(b.numel() * b.element_size() for b in bufs) == 4 * sum(p.numel() for p in params)


def test_movement_pruner_keeps_weights_moving_away_from_zero():
    # Equal magnitudes; the gradient says which ones Sanh et al.'s movement keeps.
    w = nn.Parameter(torch.tensor([0.5, 0.5, -0.5, -0.5, 0.5, -0.5]))
    opt = torch.optim.SGD([w], lr=0.0)
    pruner = Pruner([("w", w)], Schedule("one-shot", start=3, end=4, final=0.5), build_method("movement"), opt)
    for step in range(1, 4):
        w.grad = torch.tensor([1.0, -1.0, -1.0, 1.0, -0.1, 0.2])  # -grad*w: -.5, .5, -.5, .5, .05, .1
        pruner.observe(_obs(step))
        pruner.after_backward()
        opt.step()
        pruner.after_step(step)
    assert pruner.masks.pruned[0].tolist() == [True, False, True, False, True, False]
    assert pruner.pruned_count == 3


# --- SPT ----------------------------------------------------------------------

def _linear_task(seed=0, n_in=6, n_out=3, batch=8):
    torch.manual_seed(seed)
    model = nn.Linear(n_in, n_out)
    g = torch.Generator().manual_seed(seed + 100)
    batches = [(torch.randn(batch, n_in, generator=g), torch.randn(batch, n_out, generator=g)) for _ in range(5)]

    def loss_fn(m, b):
        x, y = b
        return nn.functional.mse_loss(m(x), y)

    return model, batches, loss_fn


def _spt(params, pruned=None, epsilon=1.0, alpha=0.9, seed=0, last_step=10_000) -> SPT:
    method = build_method("spt", spt_epsilon=epsilon, spt_alpha=alpha, seed=seed, last_step=last_step)
    method.bind(params, pruned if pruned is not None else [torch.zeros_like(p, dtype=torch.bool) for p in params])
    return method


def test_spt_with_epsilon_one_explores_every_weight_and_follows_the_ema():
    model, batches, loss_fn = _linear_task()
    alpha = 0.8
    method = _spt([model.weight], epsilon=1.0, alpha=alpha)
    expected = 0.0
    for step, batch in enumerate(batches[:4], start=1):
        with torch.no_grad():
            # With epsilon = 1 every weight is removed at once: the output is the bias alone.
            x, y = batch
            removed = nn.functional.mse_loss(model.bias.expand(x.shape[0], -1), y).item()
        loss = loss_fn(model, batch).item()
        expected = alpha * expected + (1 - alpha) * (removed - loss)
        method.observe(_obs(step, model, batch, loss_fn, loss))
        r = method.rewards[0]
        assert r.dtype == torch.float32 and r.shape == model.weight.shape
        assert torch.allclose(r, torch.full_like(r, expected), rtol=1e-5, atol=1e-7), f"step {step}"
    assert expected != 0.0


def test_spt_rewards_follow_the_ema_per_weight():
    # Two weights explored on alternate steps (pruned masks steer the exploration): each keeps its own EMA.
    model, batches, loss_fn = _linear_task(n_in=2, n_out=1)
    alpha = 0.5
    pruned = [torch.zeros_like(model.weight, dtype=torch.bool)]
    method = _spt([model.weight], pruned=pruned, epsilon=1.0, alpha=alpha)
    expected = [0.0, 0.0]
    for step, batch in enumerate(batches[:4], start=1):
        explored = step % 2
        pruned[0].zero_()
        pruned[0][0, 1 - explored] = True  # the other weight is "pruned" this step, so not explored
        with torch.no_grad():
            saved = model.weight.detach().clone()
            model.weight[0, explored] = 0.0
            removed = loss_fn(model, batch).item()
            model.weight.copy_(saved)
        loss = loss_fn(model, batch).item()
        expected[explored] = alpha * expected[explored] + (1 - alpha) * (removed - loss)
        method.observe(_obs(step, model, batch, loss_fn, loss))
        assert method.rewards[0][0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_spt_never_explores_pruned_weights():
    model, batches, loss_fn = _linear_task()
    pruned = [torch.zeros_like(model.weight, dtype=torch.bool)]
    pruned[0][0, :3] = True
    pruned[0][2, 5] = True
    with torch.no_grad():
        model.weight[pruned[0]] = 0.0
    method = _spt([model.weight], pruned=pruned, epsilon=1.0)
    method.rewards[0][pruned[0]] = 7.0  # sentinel: must survive every observe()
    seen_nonzero_pruned = []

    def spying_loss(m, b):
        seen_nonzero_pruned.append(bool((m.weight[pruned[0]] != 0).any()))
        return loss_fn(m, b)

    for step, batch in enumerate(batches, start=1):
        method.observe(_obs(step, model, batch, spying_loss, loss_fn(model, batch).item()))
    assert (method.rewards[0][pruned[0]] == 7.0).all()
    assert (method.rewards[0][~pruned[0]] != 0.0).all()  # epsilon = 1: all the others were explored
    assert seen_nonzero_pruned == [False] * len(batches)


def test_spt_unexplored_weights_keep_reward_zero():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 4))
    params = [model[0].weight, model[2].weight]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, generator=g), torch.randn(16, 4, generator=g)
    epsilon = 0.1
    method = _spt(params, epsilon=epsilon)
    explored = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    originals = [p.detach().clone() for p in params]

    def loss_fn(m, b):
        # record which weights are removed for this forward pass
        for e, p, o in zip(explored, params, originals):
            e |= (p == 0) & (o != 0)
        return nn.functional.mse_loss(m(b[0]), b[1])

    per_step = []
    for step in range(1, 4):
        before = sum(int(e.sum()) for e in explored)
        method.observe(_obs(step, model, (x, y), loss_fn, nn.functional.mse_loss(model(x), y).item()))
        per_step.append(sum(int(e.sum()) for e in explored) - before)
    numel = sum(p.numel() for p in params)
    assert 0 < per_step[0] < 3 * epsilon * numel  # a fraction about epsilon, not all of them
    for r, e in zip(method.rewards, explored):
        assert (r[~e] == 0.0).all(), "a weight that was never explored has a reward"
        assert (r[e] != 0.0).sum() > 0
    assert 0 < sum(int(e.sum()) for e in explored) < numel


def test_spt_leaves_global_rng_weights_and_grads_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    model.train()
    params = [model[0].weight, model[2].weight]
    x, y = torch.randn(8, 10), torch.randn(8, 2)

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])  # dropout draws from the global RNG

    loss = loss_fn(model, (x, y))
    loss.backward()
    method = _spt(params, epsilon=0.5)
    weights = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    rng = torch.get_rng_state()
    method.observe(_obs(1, model, (x, y), loss_fn, loss.item()))
    assert torch.equal(torch.get_rng_state(), rng), "exploring changed the dropout masks training will see"
    for p, w, g in zip(params, weights, grads):
        assert torch.equal(p.detach(), w), "a weight was not restored exactly"
        assert torch.equal(p.grad, g)
    assert any((r != 0).any() for r in method.rewards)


def test_spt_stops_exploring_after_the_last_mask_update():
    model, batches, loss_fn = _linear_task()
    calls = []

    def counting_loss(m, b):
        calls.append(1)
        return loss_fn(m, b)

    method = _spt([model.weight], epsilon=1.0, last_step=2)
    for step in (1, 2, 3, 4):
        method.observe(_obs(step, model, batches[0], counting_loss, loss_fn(model, batches[0]).item()))
    assert len(calls) == 2


def test_spt_buffers_are_its_rewards_one_fp32_per_weight():
    params = [nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(7))]
    method = _spt(params)
    assert [b.shape for b in method.buffers()] == [p.shape for p in params]
    assert all(b.dtype == torch.float32 for b in method.buffers())
    method.rewards[1][3] = -2.5
    out = torch.empty(7)
    method.score(1, params[1].detach(), {}, out, CTX)
    assert out.tolist() == [0.0, 0.0, 0.0, -2.5, 0.0, 0.0, 0.0]


# --- registry -----------------------------------------------------------------

def test_build_method_for_every_name():
    m = build_method("magnitude")
    assert isinstance(m, FunctionMethod) and m.fn is magnitude and m.name == "magnitude"
    assert isinstance(build_method("movement"), Movement) and build_method("movement").name == "movement"
    s = build_method("spt", spt_epsilon=0.02, spt_alpha=0.7, seed=5, last_step=123)
    assert isinstance(s, SPT) and s.name == "spt"
    assert (s.epsilon, s.alpha, s.last_step) == (0.02, 0.7, 123)
    for variant in VARIANTS:
        v = build_method("state", variant)
        assert isinstance(v, FunctionMethod) and v.name == variant and v.fn is STATE_VARIANTS[variant]
    with pytest.raises(ValueError):
        build_method("random")
    with pytest.raises((KeyError, ValueError)):
        build_method("state", None)


def test_spt_exploration_is_reproducible_from_its_seed():
    def rewards(seed):
        model, batches, loss_fn = _linear_task(seed=0, n_in=30, n_out=10)
        method = _spt([model.weight], epsilon=0.2, seed=seed)
        for step, batch in enumerate(batches, start=1):
            method.observe(_obs(step, model, batch, loss_fn, loss_fn(model, batch).item()))
        return method.rewards[0]

    assert torch.equal(rewards(1), rewards(1))
    assert not torch.equal(rewards(1), rewards(2))


# --- memory -------------------------------------------------------------------

@pytest.mark.parametrize("scoring", ["c", "torch"])
@pytest.mark.parametrize("method, variant, per_weight", [
    ("magnitude", None, 0), ("movement", None, 4), ("spt", None, 4),
    *[("state", v, 0) for v in VARIANTS],
])
def test_memory_reports_score_bytes(method, variant, per_weight, scoring, request):
    if scoring == "torch":
        request.getfixturevalue("torch_scores")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    prunable = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(prunable, Schedule("linear", start=1, end=3, final=0.5),
                    build_method(method, variant, last_step=3), opt)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    for step in (1, 2, 3):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.observe(Observation(step, model, (x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                                   loss.item()))
        pruner.after_backward()
        opt.step()
        pruner.after_step(step)
    numel = 5 * 7 + 7 * 3
    assert pruner.pruned_count == target_count(0.5, numel)
    mem = memory_by_kind(model, opt, pruner)
    assert mem["scores"] == per_weight * numel
    assert mem["masks"] == (5 * 7 + 7) // 8 + (7 * 3 + 7) // 8  # one bit per prunable weight, per tensor
    # Updates in after_step write the scores into the spent gradients: no extra buffer, only the
    # score's declared intermediates, here as large as the largest weight (5 x 7); none at all where
    # select.c scores in one pass (magnitude and every state variant, on the CPU).
    one_pass = scoring == "c" and method in ("magnitude", "state")
    assert mem["mask_update_peak"] == (0 if one_pass else 4 * TEMPORARIES[variant or method] * 5 * 7)
    assert mem["grads"] == 4 * sum(p.numel() for p in model.parameters())


def test_mask_update_writes_scores_into_spent_gradients_only():
    # Two identical, independent copies, built and trained alike before any mask update: one
    # updates with a score buffer of its own, the other writes the scores into its spent gradients.
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))]
    models.append(copy.deepcopy(models[0]))
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    schedule = Schedule("one-shot", start=1, end=1, final=0.5)
    pruners = []
    for model in models:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        prunable = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
        pruners.append(Pruner(prunable, schedule, build_method("state", "bitter7"), opt))
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    own, spent = pruners
    assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b)
               for a, b in zip(models[0].parameters(), models[1].parameters()))
    weights = [list(p for p in own.masks.params), list(p for p in spent.masks.params)]
    grads = [p.grad.clone() for p in weights[0]]

    # Not after a step: the gradients may still be needed, so they are left alone and
    # the scores get a buffer of their own.
    own.update(1)
    assert all(torch.equal(p.grad, g) for p, g in zip(weights[0], grads))
    assert own.peak_score_bytes == 4 * sum(p.numel() for p in weights[0])

    assert spent.after_step(1) is not None  # the same update, scores written into the spent gradients
    assert spent.peak_score_bytes == 0
    assert all(p.grad is None for p in weights[1])  # nothing can read the scores as gradients
    assert models[1][0].bias.grad is not None  # parameters that are not pruned keep theirs

    assert own.pruned_count == spent.pruned_count == target_count(0.5, own.numel)
    assert all(torch.equal(a, b) for a, b in zip(own.masks.pruned, spent.masks.pruned))
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    for a, b in zip(weights[0], weights[1]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(own.optimizer.state[a][key], spent.optimizer.state[b][key])


def test_memory_counts_a_tied_prunable_weight_once():
    from gpt2.model import GPT, GPTConfig
    from gpt2.train import prunable_parameters

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128))
    pool = prunable_parameters(model, True)
    unique = {id(p): p for _, p in pool}
    numel = sum(p.numel() for p in unique.values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for method in ("movement", "spt"):
        pruner = Pruner(pool, Schedule("one-shot", start=1, end=2, final=0.5), build_method(method), opt)
        assert pruner.numel == numel
        assert memory_by_kind(model, opt, pruner)["scores"] == 4 * numel


class _ForwardCounter(nn.Module):
    """Counts its forward passes in a buffer: stands for any buffer a forward pass updates."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return x


def test_spt_probe_leaves_every_buffer_as_it_found_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), _ForwardCounter(), nn.Linear(16, 2))
    model.train()
    params = [model[0].weight, model[4].weight]
    x, y = torch.randn(8, 10), torch.randn(8, 2)

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    loss = loss_fn(model, (x, y))  # the training step's own forward pass moves the buffers
    before = {name: b.clone() for name, b in model.named_buffers()}
    assert set(before) == {"1.running_mean", "1.running_var", "1.num_batches_tracked", "3.calls"}
    assert int(before["1.num_batches_tracked"]) == 1 and int(before["3.calls"]) == 1
    method = _spt(params, epsilon=0.5)
    for step in (1, 2, 3):
        method.observe(_obs(step, model, (x, y), loss_fn, loss.item()))
    assert any((r != 0).any() for r in method.rewards)  # the probe really ran its forward passes ...
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"the SPT probe changed buffer {name}"  # ... and undid their effects
    assert model.training
