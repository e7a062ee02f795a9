"""`make bench-inference` (bench/inference.py): the arms it times are what they claim; every key is printed.

No time is asserted: the figures are compared within one run, on a quiet machine.
"""

from __future__ import annotations

import json

import torch

from bench import inference
from lib.export import final_model_files
from tests.test_shrink import unit_pruned_gpt


def run_bench(monkeypatch, capsys, **env: str) -> dict:
    for name, value in {"BENCH_SCALE": "0.05", "BENCH_REPEATS": "1", "BENCH_BATCH": "2", "BENCH_THREADS": "1",
                        **env}.items():
        monkeypatch.setenv(name, value)
    assert inference.main() == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_the_pruned_arms_have_the_structure_they_are_named_after():
    torch.manual_seed(0)
    dense = inference.random_124m(0.05)
    assert (dense.cfg.n_layer, dense.cfg.n_head, dense.cfg.n_embd, dense.cfg.block_size) == (12, 12, 36, 51)
    fc = inference.prune_half(dense, "unstructured").blocks[0].mlp.c_fc.weight
    assert abs(float((fc == 0).float().mean()) - 0.5) < 0.01
    nm = inference.prune_half(dense, "nm").blocks[3].attn.c_attn.weight
    assert torch.all((nm.view(nm.shape[0], -1, 4) != 0).sum(dim=2) == 2)  # exactly 2 of every 4 kept
    channel = inference.prune_half(dense, "channel")
    assert channel.cfg.heads == (6,) * 12 and channel.cfg.hidden == (72,) * 12
    idx = torch.randint(0, 50257, (2, 51))
    with torch.no_grad():  # the smaller model is the half-pruned one, not merely a smaller random one
        masked = inference.GPT(dense.cfg).eval()
        masked.load_state_dict(dense.state_dict())
        for block in masked.blocks:
            block.mlp.c_proj.weight[:, ::2] = 0
            for h in range(0, 12, 2):
                block.attn.c_proj.weight[:, h * 3:(h + 1) * 3] = 0
        assert (channel(idx)[0] - masked(idx)[0]).abs().max().item() <= 1e-5


def test_without_results_it_times_dense_and_three_structures(monkeypatch, capsys):
    monkeypatch.delenv("KPRUNE_RESULTS", raising=False)
    out = run_bench(monkeypatch, capsys)
    assert out["batch_sizes"] == [1, 2] and out["context"] == 51
    for arm in ("dense", "unstructured", "nm", "channel"):
        assert {f"{arm}_latency_s_b1", f"{arm}_latency_s_b2", f"{arm}_params", f"{arm}_peak_bytes"} <= out.keys()
    for arm in ("unstructured", "nm", "channel"):
        assert {f"{arm}_speedup_b1", f"{arm}_speedup_b2"} <= out.keys()
    assert out["unstructured_params"] == out["nm_params"] == out["dense_params"] > out["channel_params"]
    assert {"threads", "torch"} <= out.keys()


def test_with_a_run_it_times_the_model_against_its_smaller_self(tmp_path, monkeypatch, capsys):
    model = unit_pruned_gpt()
    for name, data in final_model_files(model, "gpt2-tiny", 12).items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "summary.json").write_text(json.dumps({"settings": {"batch_size": 3}}))
    out = run_bench(monkeypatch, capsys, KPRUNE_RESULTS=str(tmp_path))
    assert out["source"] == str(tmp_path) and out["batch_sizes"] == [1, 3] and out["context"] == 64
    assert out["dense_params"] == sum(p.numel() for p in model.parameters()) > out["smaller_params"]
    assert {"smaller_latency_s_b3", "smaller_speedup_b1", "smaller_speedup_b3"} <= out.keys()
