"""make bench-gpu's arithmetic and its no-GPU path (the measuring itself needs CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu
from lib.pruning.pruner import target_count


def test_peak_rate_by_device_name_or_override():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3", 0.0) == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-40GB", 0.0) == 312.0
    assert gpu.peak_tflops("NVIDIA L40S", 0.0) == 362.0  # not L40's rate: the longest name matches
    assert gpu.peak_tflops("NVIDIA A10G", 0.0) == 70.0
    assert gpu.peak_tflops("Tesla V100-SXM2-16GB", 0.0) is None  # no bf16 tensor cores: no MFU without a rate
    assert gpu.peak_tflops("Tesla V100-SXM2-16GB", 125.0) == 125.0


def test_flops_per_token_of_gpt2_124m():
    # GPT-2 124M (124,439,808 weights with the 50,257-token vocabulary) at block 1024: ~0.86 GFLOP per token.
    assert gpu.flops_per_token(124_439_808, 12, 768, 1024) == 6 * 124_439_808 + 12 * 12 * 768 * 1024


def test_tokens_per_s_leaves_out_the_compiling_steps(tmp_path):
    rows = [{"step": 5, "tokens_per_s": 10.0}, {"step": 10, "tokens_per_s": 20.0}, {"step": 12, "val_loss": 3.0},
            {"step": 15, "tokens_per_s": 900.0}, {"step": 20, "tokens_per_s": 1000.0},
            {"step": 25, "tokens_per_s": 1100.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu.measured_tokens_per_s(tmp_path, skip_steps=10) == 1000.0


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "knob", lambda *a: pytest.fail("measuring started without a GPU"))
    assert gpu.main() == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


# The optimizer-step measurement takes its device: on the CPU it runs kprune's C kernel, on CUDA the compiled step.

CPU = torch.device("cpu")


@pytest.fixture
def no_cuda(monkeypatch):
    """The CPU run must not touch CUDA: any call to it fails the test."""
    def refuse(*args, **kwargs):
        pytest.fail("the CPU measurement called CUDA")
    for name in ("synchronize", "Event", "current_stream", "empty_cache", "is_available", "device_count"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_the_stepped_tensors_are_gpt2_124ms():
    shapes = gpu.layer_shapes(1.0) + gpu.other_shapes(1.0)
    assert len(shapes) == 148 and sum(torch.Size(s).numel() for s in shapes) == 124_439_808


def test_optimizer_step_costs_reports_every_figure_without_cuda(no_cuda):
    costs = gpu.optimizer_step_costs(CPU, 0.02, repeats=3, warmup=1)
    weights = sum(r * c for r, c in gpu.layer_shapes(0.02))
    assert costs["tensors"] == 148  # GPT-2's: 49 weight matrices, 96 block biases and norms, ln_f, wpe
    assert costs["params"] == weights + sum(torch.Size(s).numel() for s in gpu.other_shapes(0.02))
    assert costs["pruned_weights"] == sum(target_count(0.5, r * c) for r, c in gpu.layer_shapes(0.02))  # half each
    assert costs["optimizer"] == "KpruneAdamW" and costs["masked_step_kept_pruned_zero"] is True
    assert costs["kprune_compiled_graphs"] == 0  # the CPU steps with the C kernel: nothing compiled
    for key in ("torch_fused_step_s", "kprune_step_s", "kprune_masked_step_s", "separate_masking_s"):
        assert costs[key] > 0, key
    unmasked = costs["kprune_step_s"]
    assert costs["masking_vs_own_step"] == pytest.approx((costs["kprune_masked_step_s"] - unmasked) / unmasked)
    assert costs["separate_masking_vs_own_step"] == pytest.approx(costs["separate_masking_s"] / unmasked)
    assert costs["kprune_vs_torch_fused"] == pytest.approx(unmasked / costs["torch_fused_step_s"])
    assert costs["kprune_step_gb_per_s"] == pytest.approx(costs["params"] * 28 / unmasked / 1e9)
    assert costs["torch_fused_step_gb_per_s"] == pytest.approx(costs["params"] * 28 / costs["torch_fused_step_s"] / 1e9)


def test_the_timed_steps_mask_only_when_they_should(no_cuda):
    arms = gpu.pruned_adamw(*gpu.gpt2_shaped_params(CPU, 0.02))
    pruned = [w == 0 for w in arms.weights]
    for w, mask in zip(arms.weights, pruned):
        assert int(mask.sum()) == target_count(0.5, w.numel())  # every weight matrix half pruned

    def fresh_gradients():  # nonzero everywhere, the pruned weights too, as a backward pass leaves them
        for p in arms.weights + arms.others:
            # |g| >= 1e-2, ten times the setup's: no first moment can come out near 0, every weight moves
            g = torch.randn_like(p)
            p.grad = torch.sign(g) * (g.abs() + 1) * 1e-2

    fresh_gradients()
    before = [p.detach().clone() for p in arms.weights + arms.others]
    arms.masked_step()
    for w, mask, old in zip(arms.weights, pruned, before):
        assert (w[mask] == 0).all()  # pruned: held at zero despite its gradient
        assert (w[~mask] != old[~mask]).all()  # the rest moved
    assert all((p != old).all() for p, old in zip(arms.others, before[len(arms.weights):]))

    fresh_gradients()
    arms.separate_masking()
    for w, mask in zip(arms.weights, pruned):
        assert (w.grad[mask] == 0).all() and (w.grad[~mask] != 0).all()

    fresh_gradients()
    arms.unmasked_step()  # a dense run's step: a zero weight with a gradient moves
    assert all((w[mask] != 0).all() for w, mask in zip(arms.weights, pruned))
