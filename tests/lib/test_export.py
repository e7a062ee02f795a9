"""The final model a run writes (lib/export.py): safetensors, zeros, masks and ties kept exactly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt2.model import GPT, GPTConfig
from lib import checkpoint
from lib.errors import KpruneError
from lib.export import (MASKS_FILE, MODEL_FILE, export_run, final_model_files, read_final_model,
                        write_final_model)
from lib.pruning.masks import MaskSet, pack_bits
from resnet.model import ResNet

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=96)


def pruned_gpt(seed: int = 0) -> tuple[GPT, MaskSet]:
    """A small GPT-2 with about half of each block weight pruned (zeroed, and recorded in the masks)."""
    torch.manual_seed(seed)
    model = GPT(SMALL)
    pool = [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith(".weight")
            and p.dim() == 2] + [("wte.weight", model.wte.weight)]
    masks = MaskSet(pool)
    with torch.no_grad():
        for i, p in enumerate(masks.params):
            pruned = torch.rand(p.shape) < 0.5
            p.mul_(~pruned)
            masks.bits[i].copy_(pack_bits(pruned))
    return model, masks


def test_final_model_round_trip_keeps_zeros_masks_and_the_tie(tmp_path):
    model, masks = pruned_gpt()
    for name, data in final_model_files(model, "gpt2-small", 7, masks).items():
        (tmp_path / name).write_bytes(data)
    final = read_final_model(tmp_path)

    # The tied output layer is stored once and restored under its own name.
    assert "lm_head.weight" not in final.tensors and final.metadata["tied"] == {"lm_head.weight": "wte.weight"}
    again = GPT(SMALL)
    again.load_state_dict(final.state_dict())
    assert again.lm_head.weight is again.wte.weight
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    assert torch.equal(again(idx)[0], model(idx)[0])
    # Masks: True = pruned, by name, exactly where the weights are zero.
    assert sorted(final.masks) == sorted(masks.names)
    for i, name in enumerate(masks.names):
        assert torch.equal(final.masks[name], masks.pruned_mask(i))
        assert torch.all(final.tensors[name][final.masks[name]] == 0)
    assert final.metadata["step"] == 7 and final.metadata["shape"]["config"]["n_embd"] == 32


def test_the_files_are_plain_safetensors_any_reader_opens(tmp_path):
    model, masks = pruned_gpt()
    for name, data in final_model_files(model, "gpt2-small", 3, masks).items():
        (tmp_path / name).write_bytes(data)
    with safe_open(tmp_path / MODEL_FILE, "pt") as f:  # safetensors' own reader, no kprune code
        assert f.get_tensor("blocks.0.mlp.c_fc.weight").dtype == torch.float32
        assert json.loads(f.metadata()["kprune"])["shape"]["tensors"]["wte.weight"] == [96, 32]
    with safe_open(tmp_path / MASKS_FILE, "pt") as f:
        assert f.get_tensor("wte.weight").dtype == torch.bool
        assert json.loads(f.metadata()["kprune"])["meaning"] == "True = pruned"


def test_the_same_model_gives_the_same_bytes():
    """Runs that end alike leave identical files (safetensors alone orders several metadata keys at random)."""
    model, masks = pruned_gpt()
    assert final_model_files(model, "gpt2-small", 3, masks) == final_model_files(model, "gpt2-small", 3, masks)


def test_only_a_sound_end_writes_the_final_model(tmp_path):
    model, masks = pruned_gpt()
    task = SimpleNamespace(model=model, name="gpt2-small")
    pruner = SimpleNamespace(masks=masks)
    assert write_final_model(tmp_path, task, pruner, "diverged", 5) == {}
    assert not (tmp_path / MODEL_FILE).exists()
    assert write_final_model(None, task, pruner, "complete", 5) == {}  # ranks other than 0
    assert write_final_model(tmp_path, task, pruner, "complete", 5) == {"final_model": [MASKS_FILE, MODEL_FILE]}
    assert (tmp_path / MODEL_FILE).exists() and (tmp_path / MASKS_FILE).exists()
    # A dense run (no pruner) writes the weights alone.
    dense = tmp_path / "dense"
    dense.mkdir()
    assert write_final_model(dense, task, None, "complete", 5) == {"final_model": [MODEL_FILE]}


def test_an_interrupted_run_writes_it_only_when_stopped_between_steps(tmp_path):
    """Between steps the loop checkpoints that very step; a second signal mid-step leaves no checkpoint of it."""
    model, masks = pruned_gpt()
    task, pruner = SimpleNamespace(model=model, name="gpt2-small"), SimpleNamespace(masks=masks)
    assert write_final_model(tmp_path, task, pruner, "interrupted", 5) == {}  # no checkpoint at all
    checkpoint.save(tmp_path, {"step": 4, "model_name": "gpt2-small"})
    assert write_final_model(tmp_path, task, pruner, "interrupted", 5) == {}  # the checkpoint is of step 4
    assert not (tmp_path / MODEL_FILE).exists()
    checkpoint.save(tmp_path, {"step": 5, "model_name": "gpt2-small"})
    assert write_final_model(tmp_path, task, pruner, "interrupted", 5) == {"final_model": [MASKS_FILE, MODEL_FILE]}


def test_export_copies_weights_masks_config_and_writes_the_shape(tmp_path):
    model, masks = pruned_gpt()
    for name, data in final_model_files(model, "gpt2-small", 4, masks).items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "config").write_text("CONFIG_MODEL_GPT2=y\n")
    written, final = export_run(tmp_path)
    out = tmp_path / "export"
    assert sorted(p.name for p in written) == sorted([MODEL_FILE, MASKS_FILE, "config", "shape.json"])
    assert (out / MODEL_FILE).read_bytes() == (tmp_path / MODEL_FILE).read_bytes()
    assert (out / "config").read_text() == "CONFIG_MODEL_GPT2=y\n"
    shape = json.loads((out / "shape.json").read_text())
    assert shape["config"] == {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 96,
                               "dropout": 0.0, "heads": None, "hidden": None}
    assert shape["tensors"]["blocks.1.mlp.c_proj.weight"] == [32, 128] and shape["step"] == 4


def test_a_run_without_a_final_model_says_how_to_get_one(tmp_path):
    with pytest.raises(KpruneError, match="holds no final model .*make train.*make resume"):
        read_final_model(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(KpruneError, match="is not a final model kprune wrote"):
        read_final_model(tmp_path)
    save_file({"w": torch.ones(2)}, tmp_path / MODEL_FILE, metadata={"format": "pt"})  # another tool's file
    with pytest.raises(KpruneError, match="is not a final model kprune wrote .*no kprune metadata"):
        read_final_model(tmp_path)


def test_a_model_with_buffers_and_no_config_round_trips(tmp_path):
    """ResNet: BatchNorm running statistics (float) and batch counters (int64) come back as they were."""
    torch.manual_seed(0)
    model = ResNet(18, 10, width=8)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # moves the running statistics and counters off their initial values
    model.eval()
    for name, data in final_model_files(model, "resnet18", 2).items():
        (tmp_path / name).write_bytes(data)
    final = read_final_model(tmp_path)
    assert final.masks == {} and final.metadata["shape"]["config"] is None
    assert final.tensors["bn1.num_batches_tracked"].dtype == torch.int64
    again = ResNet(18, 10, width=8).eval()
    again.load_state_dict(final.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))
