"""The Pruner and its masks in a real (tiny) training loop.

The loop order is the one of lib/train_loop.py: zero_grad, backward,
pruner.after_backward(), clip_grad_norm_, optimizer.step(), pruner.after_step(step).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.pruning.masks import MaskSet
from lib.pruning.pruner import Pruner, target_count
from lib.pruning.schedules import Schedule
from lib.pruning.scores import ScoreContext, bitter7, magnitude
from lib.pruning.selection import tie_hash

STEPS = 200
SCHEDULE = Schedule("linear", start=20, end=160, final=0.8, frequency=15)
STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"),
              "adam_l2": ("exp_avg", "exp_avg_sq"),
              "adamw_amsgrad": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
SCORES = {"magnitude": magnitude, "bitter7": bitter7}


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def _prunable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    if kind == "adam_l2":  # L2 penalty added to the gradient
        return torch.optim.Adam([{"params": decay, "weight_decay": 0.1},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, amsgrad=(kind == "adamw_amsgrad"))


def _train(opt_kind: str, score_name: str, schedule: Schedule = SCHEDULE, steps: int = STEPS,
           check=True, seed: int = 0) -> Pruner:
    model = _model(seed)
    optimizer = _optimizer(opt_kind, model)
    pruner = Pruner(_prunable(model), schedule, SCORES[score_name], optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    g = torch.Generator().manual_seed(seed + 1)
    x_all = torch.randn(256, 8, generator=g)
    y_all = torch.sin(x_all[:, :4] * 2.0) + 0.1 * torch.randn(256, 4, generator=g)
    numel = pruner.numel
    ever_pruned = [torch.zeros_like(m) for m in pruner.masks.pruned]
    last_count = 0
    update_steps = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        pruner.after_backward()
        if check:
            for p, m in zip(pruner.masks.params, pruner.masks.pruned):
                assert (p.grad[m] == 0).all(), f"step {step}: pruned weight has a gradient"
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        assert torch.isfinite(loss)

        # scores the update will see (after the optimizer step, before the mask update)
        scores = None
        if check and schedule.is_update(step):
            scores = []
            for i, p in enumerate(pruner.masks.params):
                out = torch.empty_like(p, dtype=torch.float32)
                pruner.method.score(i, p.detach().float(), optimizer.state.get(p, {}), out,
                                    ScoreContext(step=step))
                scores.append(out)
        before = [m.clone() for m in pruner.masks.pruned]

        update = pruner.after_step(step)

        if not check:
            continue
        count = pruner.masks.count()
        if schedule.is_update(step):
            update_steps.append(step)
            assert update is not None and update.step == step
            expected = target_count(schedule.target(step), numel)
            assert count == expected, f"step {step}: {count} pruned, schedule asks {expected}"
            assert update.pruned_count == update.target_count == expected
            assert update.target_sparsity == schedule.target(step)
            # the newly pruned weights are the lowest-scoring of those still unpruned
            new_scores = torch.cat([s[m & ~b] for s, m, b in zip(scores, pruner.masks.pruned, before)])
            kept_scores = torch.cat([s[~m] for s, m in zip(scores, pruner.masks.pruned)])
            if new_scores.numel() and kept_scores.numel():
                assert new_scores.max() <= kept_scores.min()
        else:
            assert update is None
            assert all(torch.equal(a, b) for a, b in zip(before, pruner.masks.pruned))
        assert count == pruner.masks.pruned_count == pruner.pruned_count
        assert count >= last_count
        last_count = count
        for i, (p, m) in enumerate(zip(pruner.masks.params, pruner.masks.pruned)):
            # once pruned, always pruned (masks) and exactly zero (weights and states)
            assert not (ever_pruned[i] & ~m).any(), f"step {step}: a pruned weight was revived in the mask"
            ever_pruned[i] |= m
            assert (p.detach()[ever_pruned[i]] == 0.0).all(), f"step {step}: a pruned weight is not 0"
            state = optimizer.state[p]
            for key in STATE_KEYS[opt_kind]:
                assert (state[key][ever_pruned[i]] == 0).all(), f"step {step}: {key} of a pruned weight is not 0"
    if check:
        assert update_steps == schedule.update_steps()
    return pruner


@pytest.mark.parametrize("score_name", ["magnitude", "bitter7"])
@pytest.mark.parametrize("opt_kind", ["adamw", "adam_l2", "adamw_amsgrad"])
def test_training_with_pruning_hits_exact_counts_and_never_revives(opt_kind, score_name):
    pruner = _train(opt_kind, score_name)
    numel = 8 * 24 + 24 * 24 + 24 * 4
    assert pruner.numel == numel
    assert pruner.masks.count() == target_count(0.8, numel)
    assert pruner.achieved_sparsity == pytest.approx(0.8, abs=1 / numel)
    assert len(pruner.updates) == len(SCHEDULE.update_steps())
    # the weights themselves show at least as many exact zeros as the masks
    assert sum(pruner.masks.zeros_in_weights()) >= pruner.masks.count()


def test_l2_decay_and_amsgrad_states_really_exist():
    # guards the test above: the states it checks are the ones the optimizers keep
    l2 = _optimizer("adam_l2", _model())
    assert type(l2) is torch.optim.Adam and l2.param_groups[0]["weight_decay"] == 0.1
    pruner = _train("adamw_amsgrad", "magnitude", steps=40, check=False)
    p = pruner.masks.params[0]
    state = pruner.optimizer.state[p]
    assert {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"} <= set(state)
    assert pruner.masks.count() > 0


def test_magnitude_and_bitter7_prune_identical_counts():
    runs = {}
    for name in ("magnitude", "bitter7"):
        pruner = _train("adamw", name, check=False)
        runs[name] = [(u.step, u.target_count, u.pruned_count) for u in pruner.updates]
    assert runs["magnitude"] == runs["bitter7"]
    numel = 8 * 24 + 24 * 24 + 24 * 4
    expected = [(t, target_count(SCHEDULE.target(t), numel), target_count(SCHEDULE.target(t), numel))
                for t in SCHEDULE.update_steps()]
    assert runs["magnitude"] == expected


def test_bitter7_and_magnitude_choose_differently():
    # same counts, but the scores matter: the two methods do not select the same weights
    masks = {}
    for name in ("magnitude", "bitter7"):
        pruner = _train("adamw", name, check=False)
        masks[name] = torch.cat([m.reshape(-1) for m in pruner.masks.pruned])
    assert int(masks["magnitude"].sum()) == int(masks["bitter7"].sum())
    assert not torch.equal(masks["magnitude"], masks["bitter7"])


@pytest.mark.parametrize("kind", ["one-shot", "zhu-gupta", "cubic-ramp"])
def test_other_schedules_hit_exact_counts(kind):
    schedule = Schedule(kind, start=10, end=90, final=0.6, initial=0.0, frequency=20)
    pruner = _train("adamw", "bitter7", schedule=schedule, steps=100)
    assert pruner.masks.count() == target_count(0.6, pruner.numel)


def test_update_selects_smallest_magnitudes_and_breaks_ties_by_the_tie_hash():
    a = nn.Parameter(torch.tensor([[0.125, -5.0, 0.25], [2.0, -0.0625, 1.0]]))
    b = nn.Parameter(torch.tensor([0.25, 0.25, 4.0, -0.25]))
    opt = torch.optim.AdamW([a, b], lr=1e-3)
    sched = Schedule("one-shot", start=0, end=1, final=0.5)
    pruner = Pruner([("a", a), ("b", b)], sched, magnitude, opt)
    record = pruner.update(0)
    assert record.pruned_count == 5 == pruner.masks.count()  # 0.5 * 10
    # 0.0625 and 0.125 are lowest; three of the four tied 0.25s (pool indices 2, 6, 7, 9) follow:
    # all but the one whose index hashes highest.
    tied = torch.tensor([2, 6, 7, 9])
    spared = int(tied[tie_hash(tied).argmax()])
    expected = torch.zeros(10, dtype=torch.bool)
    expected[[4, 0, *[i for i in tied.tolist() if i != spared]]] = True
    got = torch.cat([m.reshape(-1) for m in pruner.masks.pruned])
    assert got.tolist() == expected.tolist()
    flat = torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)])
    assert (flat[got] == 0).all() and (flat[~got] != 0).all()


def test_already_pruned_weights_stay_pruned_even_if_others_score_lower():
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    opt = torch.optim.AdamW([w], lr=1e-3)
    sched = Schedule("linear", start=0, end=2, final=0.5, frequency=1)
    pruner = Pruner([("w", w)], sched, magnitude, opt)
    pruner.update(1)  # target 0.25 -> 1 weight: the 1.0
    assert pruner.masks.pruned[0].tolist() == [True, False, False, False]
    with torch.no_grad():
        w[3] = -0.001  # now the smallest live weight
        w[1] = 0.5
    pruner.update(2)  # target 0.5 -> 2 weights: keep w[0], add the lowest live one
    assert pruner.masks.pruned[0].tolist() == [True, False, False, True]
    assert w.detach().tolist() == [0.0, 0.5, 3.0, 0.0]


def test_update_zeroes_optimizer_states_of_newly_pruned():
    w = nn.Parameter(torch.tensor([[0.5, -3.0], [0.01, 2.0]]))
    opt = torch.optim.AdamW([w], lr=1e-3, amsgrad=True)
    w.grad = torch.ones_like(w)
    opt.step()
    state = opt.state[w]
    assert (state["exp_avg"] != 0).all() and (state["exp_avg_sq"] != 0).all()
    sched = Schedule("one-shot", start=1, end=2, final=0.5)
    pruner = Pruner([("w", w)], sched, magnitude, opt)
    assert pruner.after_step(0) is None
    pruner.after_step(1)
    m = pruner.masks.pruned[0]
    assert m.tolist() == [[True, False], [True, False]]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert (state[key][m] == 0).all()
        assert (state[key][~m] != 0).all()  # kept weights keep their state
    assert state["step"].item() == 1.0  # scalar state is not a moment


def test_tied_parameter_counted_once():
    shared = nn.Parameter(torch.randn(6, 5))
    other = nn.Parameter(torch.randn(3, 4))
    masks = MaskSet([("wte.weight", shared), ("lm_head.weight", shared), ("fc.weight", other)])
    assert masks.numel == 30 + 12
    assert masks.names == ["wte.weight", "fc.weight"]
    assert len(masks.pruned) == 2
    assert [p.numel() for p in masks.params] == [30, 12]

    opt = torch.optim.AdamW([shared, other], lr=1e-3)
    pruner = Pruner([("wte.weight", shared), ("lm_head.weight", shared), ("fc.weight", other)],
                    Schedule("one-shot", start=0, end=1, final=0.5), magnitude, opt)
    assert pruner.numel == 42
    pruner.update(0)
    assert pruner.masks.count() == 21
    assert int((shared == 0).sum() + (other == 0).sum()) >= 21


def test_pruner_without_parameters_is_an_error():
    with pytest.raises(ValueError):
        Pruner([], Schedule("one-shot", start=0, end=1, final=0.5), magnitude,
               torch.optim.AdamW([nn.Parameter(torch.zeros(2))]))


@pytest.mark.parametrize("sparsity, numel, expected", [
    (0.5, 3, 2),      # 1.5 rounds half up
    (0.25, 2, 1),     # 0.5 rounds up
    (0.25, 6, 2),     # 1.5 -> 2
    (0.1, 10, 1),
    (0.7, 10, 7),     # 7.000000000000001 -> 7
    (0.8, 864, 691),  # 691.2 -> 691
    (0.5, 1, 1),
    (0.0, 0, 0),
    (0.0, 1, 0),
    (0.0, 12345, 0),
    (0.999, 10, 10),  # 9.99 -> 10, never more than numel
])
def test_target_count_rounds_half_up(sparsity, numel, expected):
    assert target_count(sparsity, numel) == expected


@pytest.mark.parametrize("variant", ["bitter5", "bitter7", "bitter8", "bitter9"])
def test_element_wise_scores_in_pieces_select_what_whole_tensor_scores_select(variant, monkeypatch):
    # A parameter larger than a score piece (SCORE_CHUNK) is scored piece by piece on CPUs; every
    # weight must get the score it gets from the whole tensor, so the masks are the same.
    from lib.pruning import scores as scores_module
    from lib.pruning.methods import build_method

    def masks(piece: int) -> list[torch.Tensor]:
        monkeypatch.setattr(scores_module, "SCORE_CHUNK", piece)
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(700, 1000)), nn.Parameter(torch.randn(30, 40))]
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        pruner = Pruner([("a", params[0]), ("b", params[1])], Schedule("one-shot", start=1, end=1, final=0.4),
                        build_method("state", variant), opt)
        pruner.update(1)
        return [pruner.masks.pruned_mask(i) for i in range(2)]

    piece = scores_module.SCORE_CHUNK
    assert 700 * 1000 > piece
    whole, pieces = masks(1 << 30), masks(piece)
    assert all(torch.equal(a, b) for a, b in zip(whole, pieces))
    assert int(whole[0].sum()) > 0
