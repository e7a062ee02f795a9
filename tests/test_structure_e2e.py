"""Every sparsity structure through the real trainers: the final weights show the structure, counts are exact.

Each run is a few dozen steps of a real trainer (GPT-2 tiny, LeNet-5, a
narrow ResNet-18 on the generated CIFAR archive); the checks read the weights
the run ended with (its final checkpoint) and its summary.json.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from lib.kconfig import REPO_ROOT, apply_overrides, read_config, settings_from_kconfig, trainer_argv
from lib.pruning.pruner import target_count

pytestmark = pytest.mark.slow

QUICK = ["MAX_ITERS=24", "SCHEDULE=linear", "SCHEDULE_START=2", "SCHEDULE_END=20", "SCHEDULE_FREQUENCY=6",
         "EVAL_INTERVAL=24", "LOG_INTERVAL=6", "LR_WARMUP_ITERS=2", "DEVICE=cpu", "CHECKPOINT_INTERVAL=24"]
BY_MODEL = {"gpt2": ["GPT2_EVAL_ITERS=1", "BATCH_SIZE=2", "GPT2_BLOCK_SIZE=32"], "lenet5": ["BATCH_SIZE=32"],
            "resnet": ["BATCH_SIZE=4", "RESNET_WIDTH=8"]}


def _run(defconfig: str, tmp_path: Path, data_dir: Path, capsys, *overrides: str) -> tuple[dict, dict, list[dict]]:
    """Train `defconfig` with `overrides`; (summary, final weights, mask-update metrics rows)."""
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / defconfig)
    model = settings_from_kconfig(kconf).model
    apply_overrides(kconf, seen, QUICK + BY_MODEL[model] + list(overrides)
                    + [f"OUTPUT_DIR={tmp_path}", f"DATA_DIR={data_dir}"])
    trainer = importlib.import_module(f"{model}.train")
    assert trainer.main(trainer_argv(kconf)) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    weights = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, weights, [r for r in rows if r.get("mask_update")]


def _exact(summary: dict, rows: list[dict], group: str) -> None:
    """Every update pruned exactly its target of groups, recorded beside the weights in the summary and metrics."""
    updates = summary["mask_updates"]
    assert len(updates) == len(rows) == 4  # steps 2, 8, 14, 20
    for u, row in zip(updates, rows):
        assert u["group"] == row["group"] == group
        assert u["pruned_groups"] == u["target_groups"] == row["pruned_groups"] == row["target_groups"]
        assert u["pruned_count"] == u["target_count"] == row["pruned_count"]
    assert summary["target_count_exact"] is True
    assert summary["final_pruned_count"] == summary["mask_pruned_count"]


def _block_weights(weights: dict) -> dict[str, torch.Tensor]:
    return {n: w for n, w in weights.items() if n.startswith("blocks.") and n.endswith(".weight") and w.dim() == 2}


def test_gpt2_bitter7_2of4_ends_with_the_2_of_4_pattern_in_every_layer(tmp_path, data_dir, capsys):
    summary, weights, rows = _run("gpt2-bitter7-2of4", tmp_path, data_dir, capsys)
    _exact(summary, rows, "weight")
    layers = _block_weights(weights)
    assert len(layers) == 16
    for name, w in layers.items():
        nonzero = (w != 0).view(w.shape[0], -1, 4).sum(-1)
        assert (nonzero == 2).all(), f"{name}: not 2 nonzeros in every group of 4"
    total = sum(w.numel() for w in layers.values())
    assert summary["prunable_params"] == total and summary["final_pruned_count"] == total // 2
    assert summary["sparsity_structure"] == {"kind": "nm", "group": "weight", "n": 2, "m": 4, "scope": "global",
                                             "groups": total}
    assert summary["structure_excluded"] == []


def test_gpt2_magnitude_channel_prunes_whole_heads_and_neurons(tmp_path, data_dir, capsys):
    summary, weights, rows = _run("gpt2-magnitude-channel", tmp_path, data_dir, capsys)
    _exact(summary, rows, "unit")
    width, n_head = 128, 4
    head = width // n_head
    units = 0
    for i in range(4):
        p = f"blocks.{i}."
        fc, fc_b, proj = weights[p + "mlp.c_fc.weight"], weights[p + "mlp.c_fc.bias"], weights[p + "mlp.c_proj.weight"]
        dead = (fc == 0).all(1)
        assert torch.equal(dead, fc_b == 0) and torch.equal(dead, (proj == 0).all(0))
        assert torch.equal((fc == 0).any(1), dead), "a neuron is partly pruned"
        assert int(dead.sum()) == 256  # layer scope: half of each block's 512 neurons
        qkv, qkv_b, out = (weights[p + "attn.c_attn.weight"], weights[p + "attn.c_attn.bias"],
                           weights[p + "attn.c_proj.weight"])
        for h in range(n_head):
            rows_h = [slice(k * width + h * head, k * width + (h + 1) * head) for k in range(3)]
            parts = [qkv[r] for r in rows_h] + [qkv_b[r] for r in rows_h] + [out[:, h * head:(h + 1) * head]]
            zero = [bool((t == 0).all()) for t in parts]
            assert all(zero) or not any(bool((t == 0).any()) for t in parts[:3]), f"head {h} of block {i} partly"
            units += zero[0]
        units += int(dead.sum())
    assert units == 4 * (256 + 2) == summary["mask_updates"][-1]["pruned_groups"]
    assert summary["sparsity_structure"]["units"]["blocks.0.attn.heads"] == 4
    assert summary["final_sparsity"] == summary["mask_updates"][-1]["achieved_sparsity"]


def test_gpt2_block_prunes_whole_tiles(tmp_path, data_dir, capsys):
    summary, weights, rows = _run("gpt2-magnitude", tmp_path, data_dir, capsys, "SPARSITY_STRUCTURE=block",
                                  "BLOCK_ROWS=8", "BLOCK_COLS=4")
    _exact(summary, rows, "tile")
    tiles = 0
    for name, w in _block_weights(weights).items():
        t = (w == 0).view(w.shape[0] // 8, 8, w.shape[1] // 4, 4)
        assert torch.equal(t.all(3).all(1), t.any(3).any(1)), f"{name}: a tile is partly pruned"
        tiles += int(t.all(3).all(1).sum())
    total = sum(w.numel() for w in _block_weights(weights).values()) // 32
    assert tiles == target_count(0.5, total) == summary["mask_updates"][-1]["pruned_groups"]


def test_lenet5_nm_leaves_out_the_convolutions_it_cannot_group_and_says_so(tmp_path, data_dir, capsys):
    summary, weights, rows = _run("lenet5-bitter7", tmp_path, data_dir, capsys, "SPARSITY_STRUCTURE=nm",
                                  "TARGET_SPARSITY=0.5")
    _exact(summary, rows, "weight")
    assert summary["structure_excluded"] == [
        {"name": "conv1.weight", "reason": "input dimension 1 is no multiple of M = 4"},
        {"name": "conv2.weight", "reason": "input dimension 6 is no multiple of M = 4"}]
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        w = weights[name]
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert (weights["conv1.weight"] != 0).all() and (weights["conv2.weight"] != 0).all()
    assert summary["prunable_params"] == 400 * 120 + 120 * 84 + 84 * 10


def test_lenet5_block_and_channel(tmp_path, data_dir, capsys):
    summary, weights, rows = _run("lenet5-bitter7", tmp_path, data_dir, capsys, "SPARSITY_STRUCTURE=block",
                                  "TARGET_SPARSITY=0.5")
    _exact(summary, rows, "tile")
    assert [e["name"] for e in summary["structure_excluded"]] == ["conv1.weight", "conv2.weight", "fc3.weight"]
    for name in ("fc1.weight", "fc2.weight"):
        t = (weights[name] == 0).view(weights[name].shape[0] // 4, 4, -1, 4)
        assert torch.equal(t.all(3).all(1), t.any(3).any(1)), name

    summary, weights, rows = _run("lenet5-bitter7-channel", tmp_path, data_dir, capsys)
    _exact(summary, rows, "unit")
    assert summary["structure_excluded"] == []
    pruned = 0
    for layer, nxt, per in (("conv1", "conv2", 1), ("conv2", "fc1", 25), ("fc1", "fc2", 1), ("fc2", "fc3", 1)):
        w, b, after = weights[f"{layer}.weight"], weights[f"{layer}.bias"], weights[f"{nxt}.weight"]
        dead = (w.reshape(w.shape[0], -1) == 0).all(1)
        assert torch.equal(dead, b == 0)
        cols = (after == 0).reshape(after.shape[0], -1, per * (after[0, 0].numel() if after.dim() > 2 else 1))
        assert torch.equal(dead, cols.all(2).all(0)), layer
        pruned += int(dead.sum())
    # layer scope: half of each layer's units
    assert pruned == 3 + 8 + 60 + 42 == summary["mask_updates"][-1]["pruned_groups"]


def test_resnet_channel_prunes_filters_with_their_batchnorm_and_leaves_residual_channels(tmp_path, data_dir,
                                                                                           capsys):
    summary, weights, rows = _run("resnet18-bitter7", tmp_path, data_dir, capsys, "SPARSITY_STRUCTURE=channel",
                                  "TARGET_SPARSITY=0.5")
    _exact(summary, rows, "unit")
    excluded = {e["name"]: e["reason"] for e in summary["structure_excluded"]}
    assert set(excluded) == {"conv1.weight", "fc.weight", "layer2.0.shortcut.0.weight",
                             "layer3.0.shortcut.0.weight", "layer4.0.shortcut.0.weight"}
    assert "residual add" in excluded["conv1.weight"]
    pruned = total = 0
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for j in range(2):
            p = f"{stage}.{j}."
            conv = weights[p + "conv1.weight"]
            dead = (conv.reshape(conv.shape[0], -1) == 0).all(1)
            assert torch.equal(dead, weights[p + "bn1.weight"] == 0) and torch.equal(dead, weights[p + "bn1.bias"] == 0)
            assert torch.equal(dead, (weights[p + "conv2.weight"] == 0).all(3).all(2).all(0))
            assert not (weights[p + "conv2.weight"] == 0).all(3).all(2).all(1).any()  # residual side kept
            pruned, total = pruned + int(dead.sum()), total + dead.numel()
    assert pruned == target_count(0.5, total) == summary["mask_updates"][-1]["pruned_groups"]
    assert (weights["conv1.weight"] != 0).all()
