"""2:4 semi-structured conversion at load (lib/semi_structured.py), on the CPU: which layers qualify and why,
the pattern check, the refusal on a CPU, and which runs' models load with the conversion (scripts/evaluate.py
`load_model`, what make evaluate and make sample use). The CUDA conversion itself runs in `make check-gpu`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save
from torch import nn

from gpt2.model import GPT, GPTConfig
from lib import semi_structured
from lib.export import MASKS_FILE, final_model_files
from lib.gpu_checks import CheckFailed, check_semi_structured_24
from lib.semi_structured import (CPU_NOTE, Conversion, LayerChoice, choose_layers, in_half, keep_two_of_four,
                                 pattern_problem, run_structure, semi_structured_for)
from scripts import sample
from scripts.evaluate import load_model

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


def write_nm_run(run_dir, structure: str | None = "nm") -> GPT:
    """A run directory as a GPT-2 run pruned 2:4 leaves it (final model, masks, summary.json); fp32, as on disk."""
    model, pruned = two_of_four_gpt(torch.float32)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in final_model_files(model, "gpt2-tiny", 8).items():
        (run_dir / name).write_bytes(data)
    masks = {name: (model.get_parameter(name) == 0).contiguous() for name in sorted(pruned)}
    (run_dir / MASKS_FILE).write_bytes(save(masks, metadata={"kprune": json.dumps({"meaning": "True = pruned"})}))
    summary = {"sparsity_structure": {"kind": structure, "n": 2, "m": 4}} if structure else {"status": "complete"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return model


def test_the_structure_at_load_is_the_one_the_runs_summary_names(tmp_path):
    for name, summary in {"run": {"sparsity_structure": {"kind": "nm", "n": 2, "m": 4}},
                          "channel": {"sparsity_structure": {"kind": "channel"}},
                          "older": {"status": "complete"}}.items():  # older: a summary without the structure
        (tmp_path / name / "export" / "small").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert run_structure(tmp_path / "run") == "nm"
    assert run_structure(tmp_path / "run" / "export") == "nm"  # make export's copy: the run's summary
    assert run_structure(tmp_path / "channel") == "channel"
    assert run_structure(tmp_path / "older") is None
    assert run_structure(tmp_path / "run" / "export" / "small") is None  # no summary there, nor in export/


def test_an_nm_run_loaded_on_a_cpu_is_left_as_it_is_and_one_line_says_so(tmp_path, capsys):
    model = write_nm_run(tmp_path)
    loaded, final = load_model(tmp_path, torch.device("cpu"), half=torch.bfloat16)
    assert capsys.readouterr().err == CPU_NOTE + "\n"
    assert set(final.masks) and all(type(p) is nn.Parameter and p.dtype == torch.float32 and
                                    torch.equal(p, model.get_parameter(n)) for n, p in loaded.named_parameters())


@pytest.mark.parametrize("structure", ["unstructured", "channel", None])
def test_a_run_of_another_structure_is_loaded_without_a_word(structure, tmp_path, capsys, monkeypatch):
    write_nm_run(tmp_path, structure)
    calls = []
    monkeypatch.setattr(semi_structured, "semi_structured_for", lambda *args: calls.append(args))
    load_model(tmp_path, torch.device("cpu"))
    assert calls == [] and capsys.readouterr().err == ""


def test_an_nm_run_on_cuda_is_converted_in_the_autocast_dtype_and_each_dense_layer_named(tmp_path, capsys,
                                                                                         monkeypatch):
    """What load_model does on CUDA, wired on the CPU: the conversion (CUDA only, run for real by make
    check-gpu's semi_structured_2of4 check through this same load_model) is stood in for."""
    write_nm_run(tmp_path)
    seen = []

    def on_a_gpu(model, pruned, half):
        seen.append((sorted(pruned), half))
        return Conversion(layers=[LayerChoice("blocks.0.mlp.c_fc", (512, 128), True, "2:4"),
                                  LayerChoice("lm_head", (50304, 128), False, "not pruned by the run (no mask)")],
                          backend="cutlass", device="NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(semi_structured, "semi_structured_for", on_a_gpu)
    load_model(tmp_path, torch.device("cpu"), half=torch.bfloat16)
    assert seen == [(sorted(f"blocks.{i}.{name}.weight" for i in range(2) for name in BLOCK), torch.bfloat16)]
    assert capsys.readouterr().err.splitlines() == [
        "2:4 semi-structured on NVIDIA A100-SXM4-80GB: 1 Linear layers converted (cutlass)",
        "  left dense: lm_head: not pruned by the run (no mask)"]


def test_make_sample_of_an_nm_run_on_a_cpu_says_nothing_was_converted(tmp_path, capsys):
    write_nm_run(tmp_path)
    assert sample.main(["--results", str(tmp_path), "--prompt", "To be", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("To be") and out.err == CPU_NOTE + "\n"


def test_make_sample_refuses_a_model_that_is_no_gpt2(tmp_path, capsys):
    from lenet5.model import LeNet5
    for name, data in final_model_files(LeNet5(), "lenet5", 3).items():
        (tmp_path / name).write_bytes(data)
    assert sample.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} holds a 'lenet5' model, not a GPT-2: make sample continues text with a GPT-2 " \
                  "run's model\n"


def test_fp32_layers_are_judged_in_the_autocast_dtype_and_kept_as_loaded_for_their_return():
    model, pruned = two_of_four_gpt(torch.float32)
    weights = {n.removesuffix(".weight"): model.get_parameter(n) for n in pruned}
    as_loaded = in_half(model, pruned, torch.bfloat16)
    assert as_loaded.keys() == weights.keys() and all(as_loaded[n] is w for n, w in weights.items())
    choices = {c.name: c for c in choose_layers(model, pruned)}
    assert sorted(n for n, c in choices.items() if c.convert) == sorted(weights)
    assert choices["blocks.1.attn.c_proj"].reason == "2:4, [128, 128], bfloat16"
    assert model.lm_head.weight.dtype == torch.float32  # not pruned: never cast


@pytest.mark.slow  # evaluates the whole MNIST test set
def test_make_evaluate_of_an_nm_run_on_a_cpu_says_nothing_was_converted_and_evaluates_the_model(tmp_path, capsys):
    from lenet5.model import LeNet5
    from scripts import evaluate
    from tests.test_shrink_convnets import run_dir_with

    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            keep_two_of_four(layer.weight)
    run = run_dir_with(model, "lenet5", tmp_path, "lenet5-bitter7", "SPARSITY_STRUCTURE_NM=y",
                       "TARGET_SPARSITY=0.5")
    masks = {f"{n}.weight": (model.get_parameter(f"{n}.weight") == 0).contiguous() for n in ("fc1", "fc2", "fc3")}
    (run / MASKS_FILE).write_bytes(save(masks, metadata={"kprune": json.dumps({"meaning": "True = pruned"})}))
    (run / "summary.json").write_text(json.dumps({"sparsity_structure": {"kind": "nm", "n": 2, "m": 4}}))
    assert evaluate.main(["--results", str(run)]) == 0
    out = capsys.readouterr()
    assert out.err == CPU_NOTE + "\n" and json.loads(out.out)["params"] == sum(p.numel() for p in model.parameters())
