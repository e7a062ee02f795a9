"""`make bench-pruning` and `make bench-train` run as a user runs them and print every key.

Shrunk (BENCH_SCALE, BENCH_STEPS) so they take seconds; nothing here looks at
a time: the figures themselves are compared in bench/README.md, not in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lib.kconfig import REPO_ROOT
from lib.pruning.pruner import target_count

pytestmark = pytest.mark.slow

PRUNING_KEYS = {"params", "mask_update_s", "pruned_count_exact", "dense_step_s", "masked_step_s",
                "step_overhead_ratio", "state_bytes_per_weight", "peak_extra_bytes_per_weight",
                "peak_extra_bytes_per_weight_own_buffer", "threads", "torch", "stream_pass_s", "update_vs_stream",
                "torch_fused_step_s", "kprune_unmasked_step_s", "masking_vs_own_step", "separate_masking_s",
                "separate_masking_vs_own_step", "optimizer", "masked_clipped_step_s", "kprune_unmasked_clipped_step_s",
                "masking_vs_own_step_clipped", "torch_clipped_step_s", "separate_clipped_step_s",
                "separate_masking_vs_own_step_clipped"}
TRAIN_KEYS = {"dense_tokens_per_s", "pruned_tokens_per_s", "bare_tokens_per_s", "pruning_overhead_ratio",
              "framework_ratio", "peer_shape_dense_tokens_per_s", "peer_shape_pruned_tokens_per_s", "threads",
              "torch", "untracked_wall_tokens_per_s", "tracked_wall_tokens_per_s", "tracker_overhead_ratio"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project (bench/out is written inside it) using the real .venv and data."""
    root = tmp_path_factory.mktemp("bench-project")
    for name in ["Kconfig", "Makefile", "requirements.txt", "requirements-hub.txt", "requirements-trackers.txt",
                 "defconfigs", "lib", "gpt2", "lenet5", "resnet", "scripts", "bench"]:
        src = REPO_ROOT / name
        if src.is_dir():  # without the runs an earlier `make bench` left in bench/out
            shutil.copytree(src, root / name, ignore=lambda d, names: ["out"] if Path(d) == REPO_ROOT / "bench" else [])
        else:
            shutil.copy2(src, root / name)
    os.symlink(REPO_ROOT / ".venv", root / ".venv")
    os.symlink(REPO_ROOT / "data", root / "data")
    return root


def run_make(project: Path, target: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))} | env
    return subprocess.run(["make", "--no-print-directory", "-s", target], cwd=project, capture_output=True,
                          text=True, env=environ, timeout=600)


def bench(project: Path, target: str, **env: str) -> dict:
    result = run_make(project, target, **env)
    assert result.returncode == 0, f"make {target} failed:\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_bench_pruning_prints_every_key_and_prunes_exactly(project):
    out = bench(project, "bench-pruning", BENCH_SCALE="0.05")
    assert PRUNING_KEYS <= out.keys()
    # 12 blocks of 4 layers of width 38 plus a 38 x 2512 output layer.
    d, vocab = int(768 * 0.05), int(50257 * 0.05)
    assert out["params"] == 12 * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + vocab * d
    assert out["pruned_count_exact"] is True
    assert out["state_bytes_per_weight"] <= 0.126  # one bit per weight, padded per tensor
    assert out["threads"] == 2
    # The ratio comes from the unrounded times; the printed times are rounded to 4 decimals (± 5e-5 each), the
    # ratio to 3: it must lie in the interval those roundings allow, whatever the machine's speed.
    m, d, half = out["masked_step_s"], out["dense_step_s"], 0.5e-4
    assert (m - half) / (d + half) - 5e-4 <= out["step_overhead_ratio"] <= (m + half) / (d - half) + 5e-4
    assert target_count(0.5, out["params"]) == round(0.5 * out["params"])
    # The issue-18 ratios: the update against the streaming pass, the masking against kprune's own step.
    u, s = out["mask_update_s"], out["stream_pass_s"]
    assert (u - half) / (s + half) - 5e-3 <= out["update_vs_stream"] <= (u + half) / (s - half) + 5e-3
    k = out["kprune_unmasked_step_s"]
    low, high = (m - k - 2 * half) / (k + half), (m - k + 2 * half) / (k - half)
    assert low - 5e-4 <= out["masking_vs_own_step"] <= high + 5e-4
    mc, kc = out["masked_clipped_step_s"], out["kprune_unmasked_clipped_step_s"]  # the same with clipping
    low, high = (mc - kc - 2 * half) / (kc + half), (mc - kc + 2 * half) / (kc - half)
    assert low - 5e-4 <= out["masking_vs_own_step_clipped"] <= high + 5e-4
    assert out["optimizer"] == "KpruneAdamW"  # the one-pass step that masks inside itself


@pytest.mark.parametrize("structure", ["nm", "channel"])
def test_bench_pruning_measures_a_sparsity_structure(project, structure):
    out = bench(project, "bench-pruning", BENCH_SCALE="0.05", BENCH_STRUCTURE=structure)
    assert out["structure"] == structure and out["pruned_count_exact"] is True
    d = int(768 * 0.05)
    if structure == "nm":  # only the 4d-wide inputs (mlp c_proj) are multiples of 4 at this width
        assert out["prunable_params"] == 12 * 4 * d * d and out["pruned_groups"] == out["prunable_params"] // 2
    else:  # one head per block at this width, 4d neurons; the output layer is left out
        assert out["prunable_params"] == 12 * (3 * d * d + d * d + 4 * d * d + 4 * d * d)
        assert out["target_groups"] == target_count(0.5, 12 * (1 + 4 * d))


def test_bench_train_prints_every_key(project):
    out = bench(project, "bench-train", BENCH_STEPS="21", BENCH_ROUNDS="1")
    assert TRAIN_KEYS <= out.keys()
    assert all(out[k] > 0 for k in ("dense_tokens_per_s", "pruned_tokens_per_s", "bare_tokens_per_s"))
    assert out["pruning_overhead_ratio"] == pytest.approx(out["dense_tokens_per_s"] / out["pruned_tokens_per_s"],
                                                          rel=0.01)
    assert out["framework_ratio"] == pytest.approx(out["dense_tokens_per_s"] / out["bare_tokens_per_s"], rel=0.01)
    assert out["tracker_overhead_ratio"] == pytest.approx(
        out["tracked_wall_tokens_per_s"] / out["untracked_wall_tokens_per_s"], rel=0.01)
    tracked = [d for d in (project / "bench" / "out").iterdir() if (d / "wandb").is_dir()]
    assert len(tracked) == 1 and (tracked[0] / "tensorboard").is_dir()  # the tracker arm really ran them


def test_bench_train_rejects_too_few_steps_before_running_anything(project):
    result = run_make(project, "bench-train", BENCH_STEPS="5")
    assert result.returncode != 0
    assert "BENCH_STEPS=5 is out of range: it must be at least 21" in result.stderr
    assert "Traceback" not in result.stderr
