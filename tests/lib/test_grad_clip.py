"""Gradient clipping inside kprune's Adam/AdamW step (lib/grad_clip.py, lib/adam_step.c).

The norm leaves out the pruned weights' gradients, equals the float64 sum
whatever the thread count, and the clipped, masked step equals the separate
masking pass + torch's clip_grad_norm_ + the step; through the real loop a
clipped pruned run keeps its pruned weights at exactly 0 and never calls
clip_grad_norm_, and a dense run takes the same path.
"""

from __future__ import annotations

import ctypes
import math
import platform
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lib import fused_adam, grad_clip, native
from lib.cli import build_parser
from lib.fused_adam import KpruneAdam, KpruneAdamW
from lib.grad_clip import clip_coefficient, clipped_step, masked_grad_norm
from lib.kconfig import REPO_ROOT
from lib.pruning.masks import pack_bits
from lib.settings import settings_from_namespace
from lib.train_loop import run
from tests.lib.test_fused_adam import pruned_params

# Above the kernels' one-thread limit, across tensor and norm-block borders (8192 elements).
SIZES = [(70001,), (3, 11), (257, 389), (3 * 8192 + 5,)]


def _params(seed: int = 0) -> list[nn.Parameter]:
    return pruned_params(seed, SIZES)


def _grads(params, g: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _masked_ids(params) -> frozenset[int]:
    return frozenset(id(p) for p in params[::2])  # parameters 0 and 2 masked, 1 and 3 not


def _without_c(monkeypatch, use_c: bool) -> None:
    if not use_c:
        monkeypatch.setattr(fused_adam, "library", lambda: None)


@pytest.fixture
def threads():
    """Set torch's (and so the C kernels') thread count for one test; restored after it. Two threads split
    the kernels' work across tensor borders; torch's own operations run at one (on a busy machine its
    OpenMP threads wait on each other)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("use_c", [True, False])
def test_the_norm_leaves_out_pruned_weights_only_of_masked_parameters(use_c, monkeypatch, threads):
    _without_c(monkeypatch, use_c)
    threads(2 if use_c else 1)
    params = _params()
    opt = KpruneAdamW(params, lr=1e-2)
    opt.masked_params = _masked_ids(params)
    _grads(params, torch.Generator().manual_seed(1))
    norm = masked_grad_norm(opt)
    coefficient = clip_coefficient(norm, 1.0)
    assert 0 < float(coefficient) < 1e-2  # the gradients' norm is in the hundreds: clipping bites

    masked, unmasked = params[0], params[1]
    masked.grad[0] = unmasked.grad[0] = 0.0  # both weights 0 are exactly 0 ([::3])
    before = masked_grad_norm(opt)
    masked.grad[0] = 1e6  # a pruned weight of a masked parameter: left out
    assert torch.equal(masked_grad_norm(opt), before)
    assert torch.equal(clip_coefficient(masked_grad_norm(opt), 1.0), clip_coefficient(before, 1.0))
    unmasked.grad.view(-1)[0] = 1e6  # a zero weight of an unmasked parameter is an ordinary weight: counted
    assert float(masked_grad_norm(opt)) >= 1e6
    assert float(clip_coefficient(masked_grad_norm(opt), 1.0)) <= 1.0000001e-6


def _oracle_sumsq(params, masked: frozenset[int]) -> float:
    """The masked gradients' sum of squares, written the plain way in float64."""
    return sum(float(torch.where((p == 0) & (id(p) in masked), 0.0, p.grad).double().pow(2).sum()) for p in params)


def test_the_c_sum_is_the_float64_sum_whatever_the_thread_count_and_the_torch_path_agrees(monkeypatch, threads):
    params = _params()
    _grads(params, torch.Generator().manual_seed(2))
    masked = _masked_ids(params)
    items = [(p.detach(), p.grad, id(p) in masked, None) for p in params]
    sums = []
    for count in (1, 2, 3, 7):
        threads(count)
        sums.append(fused_adam.grad_sumsq(items))
    threads(1)
    assert sums[0] is not None and len(set(sums)) == 1  # bit for bit: blocks summed in one order
    oracle = _oracle_sumsq(params, masked)
    assert abs(sums[0] - oracle) <= 1e-13 * oracle  # float64 reordering only; a wrong mask moves it by ~1/3
    assert abs(_oracle_sumsq(params, frozenset()) - oracle) > 0.1 * oracle  # the mask matters at this size

    opt = KpruneAdamW(params, lr=1e-2)
    opt.masked_params = masked
    c_norm = masked_grad_norm(opt)
    monkeypatch.setattr(fused_adam, "library", lambda: None)
    torch_norm = masked_grad_norm(opt)
    assert c_norm.dtype == torch_norm.dtype == torch.float32
    assert torch.equal(c_norm, torch_norm)  # both the float64 sum's square root, rounded to float32
    assert torch.equal(c_norm, torch.tensor(math.sqrt(oracle), dtype=torch.float32))


@pytest.mark.parametrize("use_c", [True, False])
def test_with_the_pruners_bits_the_norm_leaves_out_exactly_the_pruned_weights(use_c, monkeypatch, threads):
    # The pruner hands the optimizer its mask bits: the norm reads a byte per 8 weights instead of the weights.
    # Every zero weight of a masked parameter is pruned except the first: a weight that landed on 0.0 unpruned
    # (its gradient counts, as in AdamWPrune, which masks the gradients by the mask before clipping).
    params = _params()
    _grads(params, torch.Generator().manual_seed(4))
    masked = _masked_ids(params)
    bits, pruned = {}, {}
    for p in params:
        if id(p) in masked:
            flags = (p.detach() == 0).view(-1).clone()
            assert bool(flags[0])
            flags[0] = False
            pruned[id(p)], bits[id(p)] = flags, pack_bits(flags)
    opt = KpruneAdamW(params, lr=1e-2)
    opt.masked_params, opt.pruned_bits = masked, bits
    params[0].grad.view(-1)[0] = 1e3  # the unpruned zero weight: counted
    oracle = sum(float(torch.where(pruned[id(p)], 0.0, p.grad.view(-1)).double().pow(2).sum()) if id(p) in pruned
                 else float(p.grad.double().pow(2).sum()) for p in params)
    _without_c(monkeypatch, use_c)
    norms = []
    for count in ((1, 2, 3) if use_c else (1,)):
        threads(count)
        norms.append(masked_grad_norm(opt))
    assert all(torch.equal(n, torch.tensor(math.sqrt(oracle), dtype=torch.float32)) for n in norms)
    assert float(norms[0]) >= 1e3
    opt.pruned_bits = {}  # without bits: the zero weights are left out, the 1e3 with them
    assert float(masked_grad_norm(opt)) < 1e3


@pytest.mark.skipif(platform.machine() != "x86_64", reason="-mno-avx2 is an x86-64 flag")
def test_the_bits_sum_without_avx2_is_the_same_sum_bit_for_bit(tmp_path, monkeypatch, threads):
    # adam_step.c sums by the bits with AVX2 where the CPU has it, else with a table: one sum, either way.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = [native.build(fused_adam.SOURCE), native.build(fused_adam.SOURCE, ("-mno-avx2",))]
    assert len(list((tmp_path / "kprune").glob("adam_step-*.so"))) == 2
    params = _params()
    _grads(params, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    pruned = [torch.rand(p.numel(), generator=g) < 0.5 for p in params]
    bits = [pack_bits(f) for f in pruned]
    items = (fused_adam._NormTensor * len(params))(*[
        fused_adam._NormTensor(p.data_ptr(), p.grad.data_ptr(), p.numel(), 1, b.data_ptr())
        for p, b in zip(params, bits)])
    sums = []
    for lib in builds:
        lib.kprune_grad_sumsq.argtypes = [ctypes.POINTER(fused_adam._NormTensor), ctypes.c_int, ctypes.c_int]
        lib.kprune_grad_sumsq.restype = ctypes.c_double
        sums += [lib.kprune_grad_sumsq(items, len(params), count) for count in (1, 2)]
    oracle = sum(float(torch.where(f, 0.0, p.grad.view(-1)).double().pow(2).sum()) for p, f in zip(params, pruned))
    assert len(set(sums)) == 1 and abs(sums[0] - oracle) <= 1e-13 * oracle


def _clipped_run(cls, how: str, max_norm: float, use_c: bool, monkeypatch, steps: int = 5):
    """Steps of `cls` on _params() with masked parameters, clipped `how`:

    inside    the loop's path: masked_params set, the coefficient handed to the step
    separate  the old path: gradients of zero weights of masked parameters zeroed, torch's clip_grad_norm_,
              then an unmasked step
    scaled    separate masking, the gradients multiplied by our coefficient (torch's mul_), an unmasked step
    """
    params = _params()
    masked = _masked_ids(params)
    opt = cls(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    coefficients = []
    with monkeypatch.context() as m:
        _without_c(m, use_c)
        for _ in range(steps):
            _grads(params, g)
            if how == "inside":
                opt.masked_params = masked
                coefficients.append(clip_coefficient(masked_grad_norm(opt), max_norm))
                clipped_step(opt, params, max_norm)
                continue
            for p in params:
                if id(p) in masked:
                    p.grad.mul_(p != 0)
            if how == "separate":
                total = torch.nn.utils.clip_grad_norm_(params, max_norm)
                coefficients.append(torch.clamp(max_norm / (total + 1e-6), max=1.0))
            else:
                coefficient = clip_coefficient(masked_grad_norm(opt), max_norm)
                coefficients.append(coefficient)
                for p in params:
                    p.grad.mul_(coefficient)
            opt.step()
    return params, opt, coefficients


def _states(params, opt):
    return [(p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
            for p in params]


@pytest.mark.parametrize("cls", [KpruneAdam, KpruneAdamW])
@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("max_norm", [1.0, 1e4])  # clipping, and a norm below the limit (coefficient 1)
def test_the_clipped_step_equals_separate_masking_then_clipping_then_the_step(cls, use_c, max_norm, monkeypatch,
                                                                             threads):
    threads(2 if use_c else 1)
    inside, opt_in, c_in = _clipped_run(cls, "inside", max_norm, use_c, monkeypatch)
    scaled, opt_sc, c_sc = _clipped_run(cls, "scaled", max_norm, use_c, monkeypatch)
    separate, opt_sep, c_sep = _clipped_run(cls, "separate", max_norm, use_c, monkeypatch)
    # With the same coefficient, scaling and masking inside the step is the separate masking and mul_,
    # bit for bit (the step multiplies, then masks: the same float32 products).
    assert all(torch.equal(a, b) for a, b in zip(c_in, c_sc))
    for a, b in zip(_states(inside, opt_in), _states(scaled, opt_sc)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Against torch's clip_grad_norm_: the norm is summed in float64 here (correctly rounded, the test
    # above), in float32 by torch, whose sum of ~100k squares is off by a few units in the last place
    # (measured: coefficients up to 3.5e-7 apart, about 6 units); 1e-6 allows twice that. exp_avg follows
    # the gradients linearly, exp_avg_sq quadratically, the weights through Adam's ratio; entries near 0
    # after cancellation have no relative bound, so each state is compared against its largest entry.
    # One pruned gradient counted in the norm moves the coefficient by far more (the test above).
    for a, b in zip(c_in, c_sep):
        assert abs(float(a) / float(b) - 1) <= 1e-6, (float(a), float(b))
    if max_norm == 1.0:
        assert max(float(c) for c in c_in) < 0.01  # the clipping bit at every step
    else:
        assert all(float(c) == 1.0 for c in c_in + c_sep)
    for mine, theirs in zip(_states(inside, opt_in), _states(separate, opt_sep)):
        for x, y, bound in zip(mine, theirs, (1e-6, 2e-6, 4e-6)):  # weights, exp_avg, exp_avg_sq
            assert float((x - y).abs().max()) <= bound * float(y.abs().max())
    for p in inside:  # pruned weights (of masked parameters) took no update
        if id(p) in _masked_ids(inside):
            assert bool((p.view(-1)[::3] == 0).all())


@pytest.mark.parametrize("use_c", [True, False])
def test_a_non_finite_norm_scales_as_torch_does_and_pruned_weights_stay_zero(use_c, monkeypatch):
    _without_c(monkeypatch, use_c)
    for bad, expected in ((math.inf, 0.0), (math.nan, math.nan)):
        params = _params()
        opt = KpruneAdamW(params, lr=1e-2)
        opt.masked_params = _masked_ids(params)
        _grads(params, torch.Generator().manual_seed(4))
        params[1].grad.view(-1)[1] = bad  # an unmasked parameter's gradient
        twins = [p.grad.clone() for p in params]
        ours = clip_coefficient(masked_grad_norm(opt), 1.0)
        theirs = [nn.Parameter(p.detach().clone()) for p in params]
        for t, g in zip(theirs, twins):
            t.grad = g
        total = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        exact = dict(rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ours, torch.clamp(1.0 / (total + 1e-6), max=1.0), **exact)
        torch.testing.assert_close(ours, torch.tensor(expected), **exact)
        clipped_step(opt, params, 1.0)
        assert bool((params[0].view(-1)[::3] == 0).all())  # masked after scaling: 0, not NaN


def _lenet_settings(tmp_path: Path, *flags: str):
    parser = build_parser("lenet5", prog="x", description="")
    args = ["--max-iters", "10", "--batch-size", "32", "--eval-interval", "10", "--log-interval", "5",
            "--lr-warmup-iters", "1", "--lr", "0.01", "--grad-clip", "0.5", "--schedule", "linear",
            "--schedule-start", "2", "--schedule-end", "6", "--schedule-frequency", "2", "--target-sparsity", "0.6",
            "--data-dir", str(REPO_ROOT / "data"), "--output-dir", str(tmp_path), "--threads", "1", *flags]
    return settings_from_namespace(parser.parse_args(args))


class _StepWatch:
    """Optimizer step hooks over a whole run: what each step was handed and what it left at zero."""

    def __init__(self):
        self.scales, self.masked_counts, self.revived, self.pruned_grads_nonzero = [], [], 0, 0
        self._zeros = []

    def before(self, optimizer, args, kwargs):
        self.scales.append(kwargs.get("grad_scale"))
        ids = getattr(optimizer, "masked_params", frozenset())
        self.masked_counts.append(len(ids))
        params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in ids]
        self._zeros = [(p, p.detach() == 0) for p in params]
        # The gradients the step is handed still carry the pruned weights' own: the step masks them.
        self.pruned_grads_nonzero += sum(int((p.grad[z] != 0).sum()) for p, z in self._zeros)

    def after(self, optimizer, args, kwargs):
        self.revived += sum(int((p.detach()[z] != 0).sum()) for p, z in self._zeros)


@pytest.mark.slow  # real LeNet-5 runs on the bundled MNIST: seconds each
@pytest.mark.parametrize("method", ["magnitude", "none"])
def test_a_clipped_run_masks_and_clips_inside_the_step_and_pruned_weights_stay_zero(method, tmp_path, capsys,
                                                                                    monkeypatch):
    def no_torch_clip(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called: kprune's AdamW clips inside its step")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_torch_clip)
    watch = _StepWatch()
    hooks = [register_optimizer_step_pre_hook(watch.before),
             register_optimizer_step_post_hook(watch.after)]
    try:
        s = _lenet_settings(tmp_path, "--optimizer", "adamw", "--pruning-method", method)
        from lenet5.train import build_task
        assert run(s, build_task, command=["test"]) == 0
    finally:
        for h in hooks:
            h.remove()
    capsys.readouterr()
    assert len(watch.scales) == 10 and all(torch.is_tensor(c) for c in watch.scales)
    assert min(float(c) for c in watch.scales) < 1.0  # the clipping bit
    if method == "none":  # the dense baseline: the same path, nothing masked
        assert set(watch.masked_counts) == {0}
        return
    # Nothing masked before the first mask update, then LeNet-5's five weight matrices at every step.
    assert watch.masked_counts[0] == 0 and watch.masked_counts[-4:] == [5] * 4
    assert sorted(watch.masked_counts) == watch.masked_counts
    assert watch.pruned_grads_nonzero > 0 and watch.revived == 0


@pytest.mark.slow
def test_other_optimizers_keep_torchs_clip_grad_norm(tmp_path, capsys, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    s = _lenet_settings(tmp_path, "--optimizer", "sgd", "--pruning-method", "magnitude")
    from lenet5.train import build_task
    assert run(s, build_task, command=["test"]) == 0
    capsys.readouterr()
    assert calls == [0.5] * 10
    assert not grad_clip.takes_grad_scale(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
