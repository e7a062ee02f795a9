"""kprune's one-pass Adam/AdamW (lib/fused_adam.py, lib/adam_step.c): exact, masked inside the step, cached."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lib import fused_adam, native
from lib.fused_adam import KpruneAdam, KpruneAdamW
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule

# Sizes whose sum exceeds the kernel's one-thread limit, so two threads split the work across tensor borders.
SIZES = [(70001,), (3, 11), (257, 389)]


def pruned_params(seed: int = 0, sizes: list[tuple[int, ...]] = SIZES) -> list[nn.Parameter]:
    """Random parameters of `sizes` with every third weight exactly 0 (what pruning leaves)."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in sizes]
    with torch.no_grad():
        for p in params:
            p.view(-1)[::3] = 0.0  # "pruned" weights: exactly zero
    return params


def _run(cls, amsgrad: bool, masked: bool, use_c: bool, monkeypatch, steps: int = 5, wd: float = 0.1,
         grad_scale=1.0):
    params = pruned_params()
    opt = cls(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, amsgrad=amsgrad)
    if masked:
        opt.masked_params = frozenset(id(p) for p in params)
    g = torch.Generator().manual_seed(1)
    with monkeypatch.context() as m:
        if not use_c:
            m.setattr(fused_adam, "library", lambda: None)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(grad_scale=grad_scale)
    return params, opt


@pytest.mark.parametrize("cls", [KpruneAdam, KpruneAdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("masked", [False, True])
# 1: no clipping; a clipping coefficient (lib/grad_clip.py hands a 0-d float32 tensor to the step)
@pytest.mark.parametrize("grad_scale", [1.0, torch.tensor(0.3712)])
def test_c_kernel_equals_the_reference_bit_for_bit(cls, amsgrad, masked, grad_scale, monkeypatch):
    torch.set_num_threads(2)
    assert fused_adam.library() is not None, "the C kernel must build here (CI has a C compiler)"
    c_params, c_opt = _run(cls, amsgrad, masked, True, monkeypatch, grad_scale=grad_scale)
    r_params, r_opt = _run(cls, amsgrad, masked, False, monkeypatch, grad_scale=grad_scale)
    if grad_scale != 1.0:  # the scale reached the step: exp_avg is not what unscaled gradients give
        unscaled, opt = _run(cls, amsgrad, masked, True, monkeypatch)
        assert not torch.equal(opt.state[unscaled[0]]["exp_avg"], c_opt.state[c_params[0]]["exp_avg"])
    for cp, rp, start in zip(c_params, r_params, pruned_params()):
        assert torch.equal(cp, rp)
        for key in ("exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else [])):
            assert torch.equal(c_opt.state[cp][key], r_opt.state[rp][key]), key
        zero = start == 0
        if masked:  # masked: the zeros took no gradient, so weight decay and the update leave them at 0
            assert bool((cp[zero] == 0).all()) and bool((c_opt.state[cp]["exp_avg"][zero] == 0).all())
        else:  # unmasked: they trained like every other weight
            assert int((cp[zero] == 0).sum()) == 0


@pytest.mark.parametrize("cls, ref", [(KpruneAdam, torch.optim.Adam), (KpruneAdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_unmasked_step_is_torchs_adam_to_float_rounding(cls, ref, amsgrad, monkeypatch):
    ours, _ = _run(cls, amsgrad, False, True, monkeypatch, steps=10)
    theirs = pruned_params()
    opt = ref(theirs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p in theirs:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    for a, b in zip(ours, theirs):
        # torch's lerp and sqrt round differently in the last place; a wrong formula is off by far more
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _train(fuse: bool, steps: int = 12) -> tuple[nn.Sequential, Pruner]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = KpruneAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    pruner = Pruner(named, Schedule("linear", start=2, end=8, final=0.7, frequency=2), build_method("state", "bitter7"),
                    opt, fuse_masking=fuse)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.after_backward()
        if fuse and pruner.pruned_count:  # the gradients of pruned weights are left as they came
            assert any(bool((p.grad[pruner.masks.pruned_mask(i)] != 0).any())
                       for i, p in enumerate(pruner.masks.params))
        opt.step()
        pruner.after_step(step)
    return model, pruner


def test_masking_inside_the_step_equals_the_separate_pass_and_keeps_pruned_weights_at_zero():
    fused_model, fused = _train(True)
    plain_model, plain = _train(False)
    assert fused.fused_masking and not plain.fused_masking
    assert fused.pruned_count == plain.pruned_count == fused.masks.count() > 0
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    for i, p in enumerate(fused.masks.params):
        pruned = fused.masks.pruned_mask(i)
        assert bool((p[pruned] == 0).all())
        state = fused.optimizer.state[p]
        assert bool((state["exp_avg"][pruned] == 0).all()) and bool((state["exp_avg_sq"][pruned] == 0).all())


MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@pytest.mark.parametrize("cls", [KpruneAdam, KpruneAdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("use_c", [True, False], ids=["c", "reference"])
def test_a_masked_step_takes_a_pruned_weights_moments_as_zero(cls, amsgrad, use_c, monkeypatch):
    # A mask update zeroes only the weights it prunes: the moments they had from training must count as 0 in
    # the next step and be 0 after it, exactly as if the update had zeroed them too.
    def trained(zero_moments: bool):
        g = torch.Generator().manual_seed(3)
        params = [nn.Parameter(torch.randn(s, generator=g)) for s in SIZES]
        opt = cls(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        with torch.no_grad():
            for p in params:
                p.view(-1)[::3] = 0.0
                if zero_moments:
                    for key in MOMENTS:
                        if key in opt.state[p]:
                            opt.state[p][key].view(-1)[::3] = 0.0
        opt.masked_params = frozenset(id(p) for p in params)
        with monkeypatch.context() as m:
            if not use_c:
                m.setattr(fused_adam, "library", lambda: None)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(grad_scale=0.5)
        return params, opt

    stale, stale_opt = trained(zero_moments=False)
    clean, clean_opt = trained(zero_moments=True)
    for a, b in zip(stale, clean):
        assert torch.equal(a, b)
        assert bool((a.detach().view(-1)[::3] == 0).all())  # pruned weights stayed 0
        for key in MOMENTS:
            if key in stale_opt.state[a]:
                assert torch.equal(stale_opt.state[a][key], clean_opt.state[b][key]), key
                assert bool((stale_opt.state[a][key].view(-1)[::3] == 0).all()), key


@pytest.mark.parametrize("native_store", [True, False], ids=["c-store", "torch-zeroing"])
def test_with_the_masking_in_the_step_an_update_zeroes_only_the_weights(native_store, monkeypatch):
    # The update does not read or write the moments (that pass is the step's now); the step after it zeroes them.
    g = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in [(300, 200), (50, 40)]]
    opt = KpruneAdamW(params, lr=1e-2, weight_decay=0.1)
    pruner = Pruner([(f"w{i}", p) for i, p in enumerate(params)], Schedule("one-shot", start=1, end=1, final=0.5),
                    build_method("state", "bitter7"), opt, fuse_masking=True)
    from lib.pruning import update_pass
    stores, real_store = [], update_pass.store_selection

    def store(*args):  # which path zeroed the weights: the C store (True) or the torch zeroing after it
        stores.append(real_store(*args) if native_store else False)
        return stores[-1]
    monkeypatch.setattr(update_pass, "store_selection", store)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    moments = [{k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in params]
    pruner.after_step(1)
    assert stores == [native_store]
    assert pruner.fused_masking and pruner.pruned_count == (300 * 200 + 50 * 40) // 2
    for i, p in enumerate(params):
        pruned = pruner.masks.pruned_mask(i)
        assert bool((p[pruned] == 0).all()) and bool((p[~pruned] != 0).all())
        for k, before in moments[i].items():
            assert torch.equal(opt.state[p][k], before), k  # untouched by the update
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    pruner.after_backward()
    opt.step()
    for i, p in enumerate(params):
        pruned = pruner.masks.pruned_mask(i)
        assert bool((p[pruned] == 0).all())
        for k in ("exp_avg", "exp_avg_sq"):
            assert bool((opt.state[p][k][pruned] == 0).all()) and bool((opt.state[p][k][~pruned] != 0).all())


def test_a_checkpoint_saved_right_after_an_update_holds_the_pruned_moments_as_zero(tmp_path):
    # The update left the moments to the next step; a checkpoint taken before that step saves them as 0
    # (what the step would take them as), and the run goes on exactly as without the checkpoint.
    from types import SimpleNamespace

    from lib import checkpoint

    def run(save: bool):
        g = torch.Generator().manual_seed(9)
        model = nn.Linear(300, 200, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.randn(200, 300, generator=g))
        opt = KpruneAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        pruner = Pruner([("weight", model.weight)], Schedule("one-shot", start=1, end=1, final=0.5),
                        build_method("state", "bitter7"), opt, fuse_masking=True)
        model.weight.grad = torch.randn(200, 300, generator=g)
        opt.step()
        pruner.after_step(1)
        pruned = pruner.masks.pruned_mask(0)
        assert bool((opt.state[model.weight]["exp_avg"][pruned] != 0).any())  # left to the next step
        saved = None
        if save:
            (tmp_path / "config").write_text("")
            task = SimpleNamespace(name="linear", model=model, data_state=lambda: {})
            progress = SimpleNamespace(step=1, data_state={}, train_time_s=0.0, last_eval=None, compile_step_s=0.0,
                                       compile_steps=0, last_loss=None)
            checkpoint.save_run(tmp_path, SimpleNamespace(as_dict=lambda: {}), task, opt, pruner, progress)
            saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["optimizer"]["state"][0]
        model.weight.grad = torch.randn(200, 300, generator=g)
        pruner.after_backward()
        opt.step()
        return model.weight.detach().clone(), opt.state[model.weight], pruned, saved

    w_saved, state_saved, pruned, saved = run(save=True)
    for key in ("exp_avg", "exp_avg_sq"):
        assert bool((saved[key][pruned] == 0).all()) and bool((saved[key][~pruned] != 0).all()), key
    w_plain, state_plain, _, _ = run(save=False)
    assert torch.equal(w_saved, w_plain)
    assert all(torch.equal(state_saved[k], state_plain[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_the_kernel_is_compiled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native.build(fused_adam.SOURCE)
    built = list((tmp_path / "kprune").glob("adam_step-*.so"))
    assert len(built) == 1 and lib is not None
    stamp = built[0].stat().st_mtime_ns
    native.build(fused_adam.SOURCE)  # a second process: loads, never recompiles
    assert built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kprune").iterdir()] == [built[0].name]  # no temporary left


def test_without_a_c_compiler_the_same_arithmetic_runs_with_one_warning(tmp_path, monkeypatch, capsys):
    c_params, _ = _run(KpruneAdamW, False, True, True, monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", os.fspath(tmp_path / "no-such-cc"))
    monkeypatch.setattr(fused_adam, "_LIBRARY", None)
    monkeypatch.setattr(fused_adam, "_UNAVAILABLE", None)
    params, _ = _run(KpruneAdamW, False, True, True, monkeypatch)
    err = capsys.readouterr().err
    assert err.count("warning: kprune's C Adam kernel could not be built") == 1 and "set CC" in err
    assert all(torch.equal(a, b) for a, b in zip(params, c_params))
