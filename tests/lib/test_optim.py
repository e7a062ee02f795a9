"""build_optimizer: the configured optimizer, its hyper-parameters and its groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.fused_adam import KpruneAdam, KpruneAdamW
from lib.optim import build_optimizer, describe, param_groups
from lib.settings import Settings


def _settings(**overrides) -> Settings:
    values = dict(optimizer="adamw", adamwprune_base="adamw", lr=3e-3, beta1=0.85, beta2=0.97,
                  adam_eps=1e-7, weight_decay=0.05, amsgrad=False)
    values.update(overrides)
    return Settings(**values)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3, bias=False),
                         nn.Conv1d(3, 2, kernel_size=1))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.ln = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def test_adamw_has_the_configured_hyper_parameters():
    s = _settings(amsgrad=True)
    opt = build_optimizer(_model(), s)
    assert type(opt) is KpruneAdamW
    for g in opt.param_groups:
        assert g["lr"] == 3e-3
        assert tuple(g["betas"]) == (0.85, 0.97)
        assert g["eps"] == 1e-7
        assert g["amsgrad"] is True
    assert build_optimizer(_model(), _settings(amsgrad=False)).param_groups[0]["amsgrad"] is False


def test_weight_decay_only_on_matrices_and_kernels():
    model = _model()
    opt = build_optimizer(model, _settings(weight_decay=0.05))
    decay_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in decay_of, "a parameter is in two groups"
            decay_of[id(p)] = g["weight_decay"]
    lin0, ln, _, lin1, conv = model
    assert decay_of[id(lin0.weight)] == 0.05
    assert decay_of[id(lin1.weight)] == 0.05
    assert decay_of[id(conv.weight)] == 0.05   # 3-D kernel
    assert decay_of[id(lin0.bias)] == 0.0
    assert decay_of[id(ln.weight)] == 0.0      # LayerNorm gain
    assert decay_of[id(ln.bias)] == 0.0
    assert decay_of[id(conv.bias)] == 0.0
    assert set(decay_of) == {id(p) for p in model.parameters()}  # nothing left out


def test_frozen_parameters_are_not_optimised():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, _settings())
    all_ids = [i for g in opt.param_groups for i in _ids(g["params"])]
    assert id(model[0].weight) not in all_ids
    assert len(all_ids) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("base, cls", [("adam", KpruneAdam), ("adamw", KpruneAdamW)])
def test_adamwprune_builds_its_configured_base(base, cls):
    s = _settings(optimizer="adamwprune", adamwprune_base=base, amsgrad=True)
    opt = build_optimizer(_model(), s)
    assert type(opt) is cls
    g = opt.param_groups[0]
    assert tuple(g["betas"]) == (0.85, 0.97) and g["eps"] == 1e-7 and g["lr"] == 3e-3
    assert g["amsgrad"] is True and g["weight_decay"] == 0.05


def test_plain_adam_is_adam():
    opt = build_optimizer(_model(), _settings(optimizer="adam"))
    assert type(opt) is KpruneAdam


def test_adamwprune_base_ignored_for_other_optimizers():
    opt = build_optimizer(_model(), _settings(optimizer="adamw", adamwprune_base="adam"))
    assert type(opt) is KpruneAdamW


def test_tied_parameter_appears_once():
    model = _Tied()
    assert model.wte.weight is model.lm_head.weight
    opt = build_optimizer(model, _settings())
    all_ids = [i for g in opt.param_groups for i in _ids(g["params"])]
    assert len(all_ids) == len(set(all_ids))
    assert all_ids.count(id(model.wte.weight)) == 1
    assert set(all_ids) == {id(model.wte.weight), id(model.ln.weight), id(model.ln.bias)}
    # param_groups directly, too
    groups = param_groups(model, 0.1)
    assert _ids(groups[0]["params"]) == [id(model.wte.weight)]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    # and torch accepts it (torch rejects a parameter given twice)
    opt.zero_grad()


@pytest.mark.parametrize("name, base, cls", [("adamw", "adam", "KpruneAdamW"), ("adamwprune", "adam", "KpruneAdam"),
                                              ("adamwprune", "adamw", "KpruneAdamW"), ("adam", "adamw", "KpruneAdam")])
def test_describe_reports_class_and_hyper_parameters(name, base, cls):
    s = _settings(optimizer=name, adamwprune_base=base, amsgrad=True, weight_decay=0.02)
    opt = build_optimizer(_model(), s)
    d = describe(opt, s)
    assert d["name"] == name
    assert d["class"] == cls
    assert d["base"] == (base if name == "adamwprune" else name)
    assert d["betas"] == [0.85, 0.97]
    assert d["eps"] == 1e-7
    assert d["weight_decay"] == 0.02
    assert d["amsgrad"] is True


def test_built_optimizer_trains():
    model = _model()
    opt = build_optimizer(model, _settings(optimizer="adamwprune", adamwprune_base="adam"))
    before = model[0].weight.detach().clone()
    loss = model[:4](torch.randn(5, 4)).pow(2).sum()  # Linear, LayerNorm, ReLU, Linear
    loss.backward()
    opt.step()
    assert not torch.equal(before, model[0].weight.detach())
    assert {"exp_avg", "exp_avg_sq"} <= set(opt.state[model[0].weight])


# --- sgd, adamwspam and adamwprune's adamwspam base -----------------------------

from lib.spam import AdamWSPAM  # noqa: E402

SPAM = dict(spam_theta=123.0, spam_interval=40, spam_warmup=7)


@pytest.mark.parametrize("momentum", [0.9, 0.0, 0.5])
def test_sgd_is_torch_sgd_with_the_configured_momentum(momentum):
    model = _model()
    s = _settings(optimizer="sgd", sgd_momentum=momentum, weight_decay=0.01)
    opt = build_optimizer(model, s)
    assert type(opt) is torch.optim.SGD
    for g in opt.param_groups:
        assert g["momentum"] == momentum and g["lr"] == 3e-3
        assert g["nesterov"] is False
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    d = describe(opt, s)
    assert d["class"] == "SGD" and d["name"] == d["base"] == "sgd"
    assert d["momentum"] == momentum and d["weight_decay"] == 0.01
    assert "betas" not in d and "theta" not in d


def test_sgd_momentum_buffer_is_used():
    model = _model()
    opt = build_optimizer(model, _settings(optimizer="sgd", sgd_momentum=0.9))
    model[:4](torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["momentum_buffer"].shape == model[0].weight.shape


@pytest.mark.parametrize("name, base", [("adamwspam", "adamw"), ("adamwprune", "adamwspam")])
def test_adamwspam_and_adamwprune_base_adamwspam(name, base):
    s = _settings(optimizer=name, adamwprune_base=base, amsgrad=True, **SPAM)
    opt = build_optimizer(_model(), s)
    assert type(opt) is AdamWSPAM
    for g in opt.param_groups:
        assert g["theta"] == 123.0 and g["interval"] == 40 and g["warmup"] == 7
        assert tuple(g["betas"]) == (0.85, 0.97) and g["eps"] == 1e-7 and g["lr"] == 3e-3
        assert g["amsgrad"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    d = describe(opt, s)
    assert d["name"] == name and d["class"] == "AdamWSPAM" and d["base"] == "adamwspam"
    assert (d["theta"], d["interval"], d["warmup"]) == (123.0, 40, 7)
    assert d["betas"] == [0.85, 0.97] and d["eps"] == 1e-7 and d["amsgrad"] is True
    assert d["weight_decay"] == 0.05
    assert "momentum" not in d


def test_adamwprune_base_adamwspam_really_resets_its_moments():
    # the built optimizer behaves as the configured SPAM: call interval + 1 starts from zeroed moments
    model = _model()
    s = _settings(optimizer="adamwprune", adamwprune_base="adamwspam", spam_theta=5000.0, spam_interval=3,
                  spam_warmup=1)
    opt = build_optimizer(model, s)
    x = torch.randn(5, 4)
    beta1 = opt.param_groups[0]["betas"][0]
    for call in range(1, 5):
        opt.zero_grad()
        model[:4](x).pow(2).sum().backward()
        opt.step()
        w = model[0].weight
        only_this_gradient = torch.equal(opt.state[w]["exp_avg"], (1 - beta1) * w.grad)
        assert only_this_gradient == (call in (1, 4)), call


def test_sgd_ignores_the_adamwprune_base():
    opt = build_optimizer(_model(), _settings(optimizer="sgd", sgd_momentum=0.9, adamwprune_base="adamwspam"))
    assert type(opt) is torch.optim.SGD
