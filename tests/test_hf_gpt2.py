"""The Hugging Face GPT-2 layout in and out (gpt2/hf.py), checked against transformers itself."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2.hf import pretrained_gpt, read_hf_dir, write_hf_dir
from gpt2.model import GPT, config_for
from gpt2.train import token_files
from lib.data.tokenizer import gpt2_encoding
from lib.data.tokens import TokenBatches
from lib.errors import KpruneError
from lib.export import read_final_model
from lib.kconfig import REPO_ROOT

TEXT = ("ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.")
PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def real_tokens(length: int = 40) -> torch.Tensor:
    ids = gpt2_encoding().encode_ordinary(TEXT)[:length]
    assert len(ids) == length
    return torch.tensor([ids, ids[::-1]])


def pruned_kprune_gpt(seed: int = 0) -> GPT:
    """kprune's tiny GPT-2 (vocabulary padded to 50,304) with half of every block weight zeroed, random biases."""
    torch.manual_seed(seed)
    model = GPT(config_for("tiny", 64, 0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p.mul_(torch.rand(p.shape) >= 0.5)
            elif p.dim() == 1:  # biases and LayerNorms away from their 0 / 1 init, so every mapping shows
                p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


def hf_model(directory: Path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(directory, local_files_only=True).eval()


def test_export_then_import_gives_identical_logits(tmp_path):
    model = pruned_kprune_gpt()
    write_hf_dir(model, tmp_path)
    again = read_hf_dir(tmp_path).eval()
    idx = real_tokens()
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])
    assert again.cfg == model.cfg and again.lm_head.weight is again.wte.weight


def test_the_export_loads_in_transformers_with_equal_logits_and_its_zeros(tmp_path):
    model = pruned_kprune_gpt()
    write_hf_dir(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == model.wte.weight.shape[0] == 50304 and config["n_positions"] == 64
    hf = hf_model(tmp_path)
    idx = real_tokens()
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-4
    # Zeros preserved where transformers keeps them: Conv1D weights are [in, out], nn.Linear's transposed.
    hf_state = hf.state_dict()
    for i in range(model.cfg.n_layer):
        for suffix in PROJECTIONS:
            ours_w = model.state_dict()[f"blocks.{i}.{suffix}"]
            theirs_w = hf_state[f"transformer.h.{i}.{suffix}"]
            assert torch.equal(theirs_w == 0, (ours_w == 0).t())
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as GPT-2 is


def transformers_dir(tmp_path: Path, seed: int = 1, **shape) -> Path:
    """A GPT-2 directory written by transformers itself, with every tensor random."""
    torch.manual_seed(seed)
    config = GPT2Config(**{"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 64, **shape})
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.05 + (1.0 if p.dim() == 1 else 0.0) * torch.rand(()))
    directory = tmp_path / f"hf-{seed}"
    model.save_pretrained(directory)
    return directory


def test_a_pretrained_start_from_a_transformers_directory_gives_its_logits(tmp_path):
    directory = transformers_dir(tmp_path)
    model = pretrained_gpt(str(directory), "tiny", 32, 0.0).eval()
    assert model.cfg.vocab_size == 50257 and model.cfg.block_size == 64  # its own vocabulary and positions
    idx = real_tokens()
    with torch.no_grad():
        diff = (model(idx)[0] - hf_model(directory)(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_the_original_gpt2_file_layout_reads_the_same(tmp_path):
    """OpenAI's gpt2 on the hub: names without `transformer.`, causal-mask buffers, lm_head stored as wte."""
    directory = transformers_dir(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    bare = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    bare.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(4)})
    bare["lm_head.weight"] = bare["wte.weight"].clone()
    original = tmp_path / "original"
    original.mkdir()
    shutil.copy(directory / "config.json", original / "config.json")
    save_file(bare, original / "model.safetensors")
    idx = real_tokens()
    with torch.no_grad():
        assert torch.equal(pretrained_gpt(str(original), "tiny", 64, 0.0).eval()(idx)[0],
                           pretrained_gpt(str(directory), "tiny", 64, 0.0).eval()(idx)[0])
    bare["lm_head.weight"] = bare["wte.weight"] + 1.0  # an untied output layer cannot be read exactly
    save_file(bare, original / "model.safetensors")
    with pytest.raises(KpruneError, match="differs from its token embedding"):
        pretrained_gpt(str(original), "tiny", 64, 0.0)


def test_a_size_or_context_mismatch_is_an_error_naming_both(tmp_path):
    two_layers = transformers_dir(tmp_path, seed=2, n_layer=2)
    with pytest.raises(KpruneError, match=r"GPT2_PRETRAINED=.* is a GPT-2 of 2 layers, 4 heads, width 128, "
                                          r"but GPT2_SIZE=tiny is 4 layers, 4 heads, width 128"):
        pretrained_gpt(str(two_layers), "tiny", 64, 0.0)
    with pytest.raises(KpruneError, match=r"GPT2_BLOCK_SIZE=128 is longer than the 64 positions"):
        pretrained_gpt(str(transformers_dir(tmp_path, seed=3)), "tiny", 128, 0.0)
    variant = json.loads((two_layers / "config.json").read_text()) | {"activation_function": "relu"}
    (two_layers / "config.json").write_text(json.dumps(variant))
    with pytest.raises(KpruneError, match=r"a GPT-2 variant kprune does not compute: activation_function='relu'"):
        pretrained_gpt(str(two_layers), "tiny", 64, 0.0)
    (two_layers / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 4}))
    with pytest.raises(KpruneError, match="lacks GPT2Config's n_layer, n_head, n_embd, n_positions, vocab_size"):
        pretrained_gpt(str(two_layers), "tiny", 64, 0.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KpruneError, match="lacks config.json and model.safetensors"):
        pretrained_gpt(str(tmp_path / "empty"), "tiny", 64, 0.0)


def trainer(tmp_path: Path, data_dir: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "gpt2.train", "--output-dir", str(tmp_path / "runs"), "--data-dir", str(data_dir), "--max-iters", "6", "--batch-size", "4", "--block-size", "32",
            "--eval-iters", "2", "--eval-interval", "3", "--lr-warmup-iters", "1", "--threads", "1", *flags]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow  # starts a process or trains: over a second
@pytest.mark.parametrize("spec", ["openai-community/gpt2", "./no/such/dir"])
def test_an_unreachable_pretrained_model_is_one_error_saying_where_to_put_the_files(tmp_path, data_dir, spec):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # nothing cached, no network
    result = trainer(tmp_path, data_dir, "--gpt2-init", "pretrained", "--gpt2-pretrained", spec, env=offline)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: GPT2_PRETRAINED='{spec}' is no") and "Traceback" not in result.stderr
    assert "put config.json and model.safetensors" in line and "set GPT2_PRETRAINED to that directory" in line


@pytest.mark.slow
def test_a_pretrained_start_fine_tunes_and_prunes(tmp_path, data_dir):
    directory = transformers_dir(tmp_path)
    result = trainer(tmp_path, data_dir, "--gpt2-init", "pretrained", "--gpt2-pretrained", str(directory),
                     "--pruning-method", "magnitude", "--target-sparsity", "0.5", "--schedule", "linear",
                     "--schedule-start", "2", "--schedule-end", "4", "--schedule-frequency", "2")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("results: "))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["target_count_exact"] is True
    assert summary["final_pruned_count"] == summary["mask_pruned_count"] == round(0.5 * summary["prunable_params"])

    # Step 0 evaluates the pretrained model itself: transformers' loss on the same validation batches.
    _, val_path = token_files(data_dir, "shakespeare")
    val, gen = TokenBatches(val_path, 32), torch.Generator().manual_seed(summary["seed"] + 1)
    batches = [val.sample(4, gen, torch.device("cpu")) for _ in range(2)]
    hf = hf_model(directory)
    with torch.no_grad():
        # y is x shifted by one token already (transformers' own `labels` would shift again).
        expected = sum(torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
                       for x, y in batches) / len(batches)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and math.isclose(first["val_loss"], expected, rel_tol=1e-5)

    # The final model is the fine-tuned, pruned one, in the pretrained shape (50,257 tokens, 64 positions).
    final = read_final_model(run_dir)
    assert final.metadata["shape"]["config"]["vocab_size"] == 50257
    start = hf.state_dict()["transformer.h.0.mlp.c_fc.weight"].t()
    assert not torch.equal(final.tensors["blocks.0.mlp.c_fc.weight"], start)
    assert int(sum(int(m.sum()) for m in final.masks.values())) == summary["final_pruned_count"]
