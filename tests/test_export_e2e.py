"""A pruned GPT-2 run as a user makes it: make train, make export, transformers reads it, make sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from gpt2 import train as gpt2_train
from gpt2.hf import gpt_from_run
from lib.data.tokenizer import gpt2_encoding
from lib.kconfig import REPO_ROOT, apply_overrides, read_config, trainer_argv
from lib.pruning.pruner import target_count
from scripts import export
from tests.test_train_e2e import QUICK_GPT2, make, project, run_dir_of  # noqa: F401 (project is a fixture)

pytestmark = pytest.mark.slow
PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_make_export_of_a_pruned_run_loads_in_transformers_and_samples(project):
    make(project, "defconfig-gpt2-magnitude")
    run_dir = run_dir_of(make(project, "train", f"SET={QUICK_GPT2}"), project)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_model"] == ["masks.safetensors", "model.safetensors"]

    result = make(project, "export", f"RESULTS={run_dir}")
    export = run_dir / "export"
    assert result.stdout.splitlines() == [f"wrote: {export / name}" for name in (
        "model.safetensors", "masks.safetensors", "config", "shape.json", "hf/config.json", "hf/model.safetensors")]
    assert (export / "config").read_bytes() == (run_dir / "config").read_bytes()

    # The exported weights hold exactly the run's pruned count of zeros, where the masks say.
    weights, masks = load_file(export / "model.safetensors"), load_file(export / "masks.safetensors")
    assert sum(int((weights[n] == 0).sum()) for n in masks) == summary["final_pruned_count"]
    assert sum(int(m.sum()) for m in masks.values()) == target_count(summary["target_sparsity"],
                                                                     summary["prunable_params"])
    assert all(torch.all(weights[n][m] == 0) for n, m in masks.items())

    # transformers reads the HF layout with kprune's logits, and the same zeros (Conv1D: transposed).
    hf = GPT2LMHeadModel.from_pretrained(export / "hf", local_files_only=True).eval()
    model = gpt_from_run(run_dir)
    ids = gpt2_encoding().encode_ordinary("KING RICHARD III: Now is the winter of our discontent made glorious")
    idx = torch.tensor([ids[:model.cfg.block_size]])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4
    hf_state = hf.state_dict()
    for i in range(model.cfg.n_layer):
        for suffix in PROJECTIONS:
            assert torch.equal(hf_state[f"transformer.h.{i}.{suffix}"] == 0, (masks[f"blocks.{i}.{suffix}"]).t())

    # make sample: the same seed gives the same text, which starts with the prompt as given.
    prompt = 'O Romeo, Romeo! "wherefore" art thou $(Romeo)?'
    args = ("sample", f"RESULTS={run_dir}", f"PROMPT={prompt}", "MAX_NEW_TOKENS=8", "SAMPLE_SEED=4")
    first = make(project, *args).stdout
    assert first == make(project, *args).stdout and first.startswith(prompt) and len(first) > len(prompt) + 1


def train_and_export(defconfig: str, tmp_path: Path, data_dir: Path, capsys) -> tuple[Path, str]:
    """A short run of a shipped GPT-2 defconfig through the real trainer, exported: (run dir, export's output)."""
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / defconfig)
    apply_overrides(kconf, seen, ["MAX_ITERS=12", "SCHEDULE=linear", "SCHEDULE_START=2", "SCHEDULE_END=10",
                                  "SCHEDULE_FREQUENCY=4", "EVAL_INTERVAL=12", "GPT2_EVAL_ITERS=1", "BATCH_SIZE=2",
                                  "LR_WARMUP_ITERS=2", f"OUTPUT_DIR={tmp_path}", f"DATA_DIR={data_dir}"])
    assert gpt2_train.main(trainer_argv(kconf)) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
    assert export.main(["--results", str(run_dir)]) == 0
    return run_dir, capsys.readouterr().out


def test_a_2of4_run_exports_the_full_pattern_in_every_prunable_layer(tmp_path, data_dir, capsys):
    run_dir, _ = train_and_export("gpt2-bitter7-2of4", tmp_path, data_dir, capsys)
    weights = load_file(run_dir / "export" / "model.safetensors")
    masks = load_file(run_dir / "export" / "masks.safetensors")
    assert sorted(masks) == sorted(f"blocks.{i}.{s}" for i in range(4) for s in PROJECTIONS)
    for name in masks:  # along the input dimension, exactly 2 of every 4 consecutive weights are zero
        groups = weights[name].view(weights[name].shape[0], -1, 4)
        assert torch.all((groups == 0).sum(dim=2) == 2), name


def test_a_channel_pruned_run_exports_a_smaller_model_with_its_outputs(tmp_path, data_dir, capsys):
    run_dir, out = train_and_export("gpt2-magnitude-channel", tmp_path, data_dir, capsys)
    assert f"wrote: {run_dir / 'export' / 'small' / 'model.safetensors'}" in out

    model, small = gpt_from_run(run_dir), gpt_from_run(run_dir / "export" / "small")
    # Half of each block's heads and MLP neurons are pruned (layer scope): the smaller model lacks exactly those.
    assert small.cfg.heads == (2,) * 4 and small.cfg.hidden == (256,) * 4
    ids = gpt2_encoding().encode_ordinary("GLOUCESTER: Now is the winter of our discontent made glorious summer")
    idx = torch.tensor([ids[:64], ids[::-1][:64]])
    with torch.no_grad():
        assert (small(idx)[0] - model(idx)[0]).abs().max().item() <= 1e-5
