"""The physically smaller GPT-2 (gpt2/shrink.py) computes what the pruned one does."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2.hf import gpt_from_run
from gpt2.model import GPT, config_for
from gpt2.shrink import shrink
from lib.data.tokenizer import gpt2_encoding
from lib.export import final_model_files
from lib.kconfig import REPO_ROOT, apply_overrides, read_config, write_config
from scripts import evaluate, export, sample

TEXT = "HAMLET: To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
HEAD_DIM = 32  # tiny: width 128, 4 heads


def unit_pruned_gpt() -> GPT:
    """tiny GPT-2 with whole heads and neurons pruned as channel structure prunes them, plus scattered zeros."""
    torch.manual_seed(0)
    model = GPT(config_for("tiny", 64, 0.0)).eval()
    heads = {0: [1], 1: [0, 2], 2: [0, 1, 2, 3], 3: []}  # block 2 loses every head
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for h in heads[i]:
                cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                block.attn.c_proj.weight[:, cols] = 0
                for part in range(3):  # its q, k, v rows too, as a channel unit is pruned whole
                    block.attn.c_attn.weight[part * 128 + h * HEAD_DIM:part * 128 + (h + 1) * HEAD_DIM] = 0
            gone = torch.randperm(512)[:128 * (i + 1)]  # block 3 loses all 512 neurons
            block.mlp.c_proj.weight[:, gone] = 0
            block.mlp.c_fc.weight[gone] = 0
            block.mlp.c_fc.bias[gone] = 0
            block.mlp.c_fc.weight.mul_(torch.rand(512, 128) > 0.3)  # unstructured zeros stay as they are
            block.attn.c_proj.bias.add_(0.1)
            block.mlp.c_proj.bias.add_(0.1)
    return model


def tokens() -> torch.Tensor:
    ids = gpt2_encoding().encode_ordinary(TEXT)
    return torch.tensor([ids, ids[::-1]])


def test_the_smaller_model_has_fewer_units_and_the_same_outputs():
    model = unit_pruned_gpt()
    small = shrink(model)
    assert small.cfg.heads == (3, 2, 0, 4) and small.cfg.hidden == (384, 256, 128, 0)
    assert small.blocks[0].attn.c_attn.weight.shape == (3 * 96, 128)
    assert small.blocks[1].mlp.c_proj.weight.shape == (128, 256)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        diff = (small(tokens())[0] - model(tokens())[0]).abs().max().item()
    assert diff <= 1e-5


def test_make_export_writes_the_smaller_model_and_sample_reads_it(tmp_path, capsys):
    model = unit_pruned_gpt()
    for name, data in final_model_files(model, "gpt2-tiny", 12).items():
        (tmp_path / name).write_bytes(data)
    assert export.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert f"wrote: {tmp_path / 'export' / 'small' / 'model.safetensors'}" in out.out
    assert "heads per block [3, 2, 0, 4], MLP neurons per block [384, 256, 128, 0]" in out.err
    small = gpt_from_run(tmp_path / "export" / "small")
    with torch.no_grad():
        assert (small(tokens())[0] - model(tokens())[0]).abs().max().item() <= 1e-5
    args = ["--prompt", "To be", "--max-new-tokens", "6", "--temperature", "0"]
    assert sample.main(["--results", str(tmp_path), *args]) == 0
    full = capsys.readouterr().out
    assert sample.main(["--results", str(tmp_path / "export" / "small"), *args]) == 0
    assert capsys.readouterr().out == full


def test_no_smaller_model_without_a_whole_unit_pruned(tmp_path, capsys):
    torch.manual_seed(1)
    model = GPT(config_for("tiny", 64, 0.0))
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.c_proj.weight.mul_(torch.rand(128, 512) > 0.5)  # 50% unstructured: no column all zero
    for name, data in final_model_files(model, "gpt2-tiny", 12).items():
        (tmp_path / name).write_bytes(data)
    assert export.main(["--results", str(tmp_path)]) == 0
    assert "no smaller model to write" in capsys.readouterr().err
    assert not (tmp_path / "export" / "small").exists()


@pytest.mark.slow  # builds the trainer's validation data
def test_make_evaluate_gives_the_smaller_gpt2_the_pruned_ones_validation_loss(tmp_path, data_dir, capsys):
    model = unit_pruned_gpt()
    for name, data in final_model_files(model, "gpt2-tiny", 12).items():
        (tmp_path / name).write_bytes(data)
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "gpt2-magnitude-channel")
    apply_overrides(kconf, seen, [f"DATA_DIR={data_dir}", "DEVICE=cpu", "GPT2_BLOCK_SIZE=64", "BATCH_SIZE=2",
                                  "GPT2_EVAL_ITERS=2"])
    write_config(kconf, tmp_path / "config")
    assert export.main(["--results", str(tmp_path)]) == 0
    capsys.readouterr()
    results = []
    for directory in (tmp_path, tmp_path / "export" / "small"):
        assert evaluate.main(["--results", str(directory)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    masked, small = results
    assert small["params"] < masked["params"] and masked["model"] == small["model"] == "gpt2-tiny"
    assert abs(small["val_loss"] - masked["val_loss"]) <= 1e-5 and masked["val_loss"] > 0
