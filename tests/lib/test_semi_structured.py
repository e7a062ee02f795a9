"""2:4 semi-structured conversion at load (lib/semi_structured.py), on the CPU: which layers qualify and why,
the pattern check, and the refusal on a CPU. The CUDA conversion itself runs in `make check-gpu`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt2.model import GPT, GPTConfig
from lib.gpu_checks import CheckFailed, check_semi_structured_24
from lib.semi_structured import CPU_NOTE, choose_layers, keep_two_of_four, pattern_problem, semi_structured_for

BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def two_of_four_gpt(dtype=torch.bfloat16, n_embd=128) -> tuple[GPT, set[str]]:
    """A small GPT-2 whose block layers keep 2 of every 4 inputs, and the names of those weights."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=n_embd, block_size=32)).to(dtype)
    pruned = set()
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for name in BLOCK:
                keep_two_of_four(block.get_submodule(name).weight)
                pruned.add(f"blocks.{i}.{name}.weight")
    return model, pruned


def test_keep_two_of_four_keeps_the_two_largest_of_every_group():
    w = torch.tensor([[0.125, -0.875, 0.5, 0.25, 3.0, 2.0, -1.0, 0.0]])
    assert keep_two_of_four(w.clone()).tolist() == [[0.0, -0.875, 0.5, 0.0, 3.0, 2.0, 0.0, 0.0]]


def test_pattern_problem_counts_the_groups_that_keep_too_many():
    w = torch.randn(8, 16)
    keep_two_of_four(w)
    assert pattern_problem(w) is None
    w[3, 4:7] = 1.0  # three nonzeros in one group
    w[5, 12:16] = 1.0  # four in another
    assert pattern_problem(w) == "not 2:4: 2 of 32 groups of 4 inputs keep more than 2"
    assert pattern_problem(torch.zeros(8, 10)) == "input dimension 10 is no multiple of 4"


def test_every_block_layer_of_a_2of4_gpt_qualifies_and_the_output_layer_stays_dense():
    model, pruned = two_of_four_gpt()
    choices = {c.name: c for c in choose_layers(model, pruned)}
    assert sorted(n for n, c in choices.items() if c.convert) == sorted(n.removesuffix(".weight") for n in pruned)
    assert choices["blocks.0.mlp.c_fc"].reason == "2:4, [512, 128], bfloat16"
    assert not choices["lm_head"].convert and choices["lm_head"].reason == "not pruned by the run (no mask)"


def test_layers_that_cannot_take_the_kernels_stay_dense_with_their_reason():
    model, pruned = two_of_four_gpt()
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight[0, :4] = 1.0  # one group keeps 4: no longer 2:4
    reasons = {c.name: c.reason for c in choose_layers(model, pruned) if not c.convert}
    assert reasons == {"blocks.1.mlp.c_fc": "not 2:4: 1 of 16384 groups of 4 inputs keep more than 2",
                       "lm_head": "not pruned by the run (no mask)"}
    fp32, pruned32 = two_of_four_gpt(torch.float32)
    assert {c.reason for c in choose_layers(fp32, pruned32) if c.name != "lm_head"} == \
        {"dtype float32: the 2:4 kernels take float16 or bfloat16"}
    # Width 96: a layer reading the residual stream has 96 columns, no multiple of 64; mlp.c_proj [96, 384]
    # has rows 3 x 32 and columns 6 x 64, so it alone qualifies.
    narrow, pruned96 = two_of_four_gpt(n_embd=96)
    choices = {c.name: c for c in choose_layers(narrow, pruned96)}
    assert choices["blocks.0.attn.c_attn"].reason == ("shape [288, 96]: the 2:4 kernels need rows a multiple of "
                                                      "32 and columns of 64")
    assert sorted(n for n, c in choices.items() if c.convert) == ["blocks.0.mlp.c_proj", "blocks.1.mlp.c_proj"]


def test_a_cpu_converts_nothing_and_says_why():
    model, pruned = two_of_four_gpt()
    before = {n: p.clone() for n, p in model.named_parameters()}
    conversion = semi_structured_for(model, pruned)
    assert conversion.note == CPU_NOTE and conversion.converted == []
    assert all(type(p) is nn.Parameter and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert conversion.describe() == {"converted": 0, "dense": {}, "note": CPU_NOTE}


def test_the_check_gpu_2of4_check_refuses_a_cpu_with_the_reason(tmp_path):
    with pytest.raises(CheckFailed, match="need a CUDA GPU: on the CPU the 2:4 model runs the dense kernels"):
        check_semi_structured_24(torch.device("cpu"), tmp_path)
