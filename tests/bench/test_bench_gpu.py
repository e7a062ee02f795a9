"""make bench-gpu's arithmetic and its no-GPU path (the measuring itself needs CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu


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
