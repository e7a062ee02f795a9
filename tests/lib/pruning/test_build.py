"""build_pruner honours every configured value, zeros included, or the configuration refuses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.optim import build_optimizer
from lib.pruning.build import build_pruner
from lib.pruning.methods import Observation
from lib.pruning.schedules import ScheduleError, schedule_from_settings
from lib.pruning.scores import ScoreContext, bitter3, bitter8
from lib.settings import BY_SYMBOL, Settings


def _settings(**kw) -> Settings:
    values = dict(seed=0, lr=1e-2, optimizer="adamwprune", adamwprune_base="adamw", weight_decay=0.0, beta1=0.9,
                  beta2=0.999, adam_eps=1e-8, amsgrad=False, pruning_method="spt", state_variant="bitter7",
                  variant_budget=False, spt_epsilon=0.5, spt_alpha=0.9, adaptive_pruning=False,
                  target_sparsity=0.5, schedule="linear", schedule_start=1, schedule_end=9, initial_sparsity=0.0,
                  schedule_frequency=2)
    values.update(kw)
    return Settings(**values)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]


def test_spt_alpha_zero_is_honoured():
    # alpha = 0: a weight's reward is its latest loss change alone, no memory of earlier ones.
    model, pool = _model()
    pruner, _ = build_pruner(_settings(spt_alpha=0.0, spt_epsilon=0.9), pool, torch.optim.SGD(model.parameters()),
                             100)
    assert pruner.method.alpha == 0.0
    params = [p for _, p in pool]
    g = torch.Generator().manual_seed(1)

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    for step in (1, 2):
        batch = (torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g))
        probe = {}

        def spying_loss(m, b):  # the probe pass: the explored weights are the ones set to zero
            probe["explored"] = [p.detach() == 0 for p in params]
            probe["loss"] = loss_fn(m, b).item()
            return loss_fn(m, b)

        loss = loss_fn(model, batch).item()
        pruner.observe(Observation(step, model, batch, spying_loss, loss))
        change = torch.tensor(probe["loss"] - loss)
        for r, explored in zip(pruner.method.rewards, probe["explored"]):
            assert explored.any()
            assert torch.equal(r[explored], change.expand(int(explored.sum())))


def test_beta1_zero_reaches_the_scores():
    # BETA1 = 0: Adam keeps no first-moment history, so there is nothing to bias-correct; bitter8 must
    # score with beta1 = 0 (then it equals bitter3), not with a default of 0.9.
    model, pool = _model()
    s = _settings(pruning_method="state", state_variant="bitter8", beta1=0.0)
    optimizer = build_optimizer(model, s)
    assert optimizer.param_groups[0]["betas"][0] == 0.0
    pruner, _ = build_pruner(s, pool, optimizer, 100)
    assert pruner.beta1 == 0.0
    nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 2)).backward()
    optimizer.step()
    w = pool[0][1].detach()
    state = optimizer.state[pool[0][1]]
    a, b = torch.empty_like(w), torch.empty_like(w)
    bitter8(w, state, a, ScoreContext(step=1, beta1=pruner.beta1))
    bitter3(w, state, b, ScoreContext(step=1))
    assert torch.equal(a, b)


def test_schedule_frequency_zero_is_refused_not_replaced():
    with pytest.raises(ScheduleError) as info:
        schedule_from_settings(_settings(schedule_frequency=0))
    assert info.value.symbol == "SCHEDULE_FREQUENCY"
    assert schedule_from_settings(_settings(initial_sparsity=0.0)).initial == 0.0


def test_spt_epsilon_zero_is_refused_by_its_range():
    with pytest.raises(ValueError, match=r"out of range \(0, 1\)"):
        BY_SYMBOL["SPT_EPSILON"].parse("0")
    assert BY_SYMBOL["SPT_ALPHA"].parse("0") == 0.0 and BY_SYMBOL["BETA1"].parse("0") == 0.0


@pytest.mark.parametrize("grad_clip, optimizer, base, fused", [
    (0.0, "adamwprune", "adamw", True), (1.0, "adamwprune", "adamw", True), (1.0, "adam", "adamw", True),
    (0.0, "sgd", "adamw", False), (1.0, "adamwprune", "adamwspam", False)])
def test_masking_moves_into_kprunes_adam_step_with_or_without_clipping(grad_clip, optimizer, base, fused):
    # kprune's Adam/AdamW mask inside their step, clipped or not (lib/grad_clip.py leaves the pruned weights
    # out of the norm); SGD and AdamWSPAM have no such step and keep the separate masking pass.
    model, pool = _model()
    s = _settings(grad_clip=grad_clip, optimizer=optimizer, adamwprune_base=base, pruning_method="magnitude",
                  sgd_momentum=0.9, spam_theta=5000.0, spam_interval=500, spam_warmup=150)
    pruner, _ = build_pruner(s, pool, build_optimizer(model, s), 100)
    assert pruner.fused_masking is fused
