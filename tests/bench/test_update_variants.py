"""bench/update_variants.py: every way of running the mask update selects the same weights (up to the
square roots' last unit between select.c's pass and torch's scores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lib.kconfig import REPO_ROOT

pytestmark = pytest.mark.slow


def test_every_variant_of_the_update_selects_the_same_weights_and_reports_its_ratio():
    env = {**os.environ, "BENCH_SCALE": "0.2", "BENCH_ROUNDS": "1", "BENCH_THREADS": "2"}  # 4.9M: the window serves
    result = subprocess.run([sys.executable, "-m", "bench.update_variants"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    differing = out["differing_masks"]
    # C histograms, C store and score pieces change nothing selected; select.c's scores differ from torch's
    # in the last unit of a square root at most, which moves a weight within a unit of the threshold at most
    # (a wrong formula would move about half of them).
    assert differing["whole_scores"] == differing["torch_store"] == differing["before"] == 0
    assert differing["no_window"] == differing["moments_zeroed"] == 0
    assert differing["torch_scores"] <= out["params"] // 10_000
    # Each variant ran what it names (a switch that missed its target would leave every variant the same).
    layers = 49  # bench-pruning's 12 x 4 blocks and the output layer
    assert out["paths"] == {
        "now": {"c_scores": layers, "windows": 1, "c_stores": 0},  # the window's own passes set and zero
        "moments_zeroed": {"c_scores": layers, "windows": 1, "c_stores": 0},
        "no_window": {"c_scores": layers, "windows": 0, "c_stores": 1},
        "torch_scores": {"c_scores": 0, "windows": 0, "c_stores": 1},
        "whole_scores": {"c_scores": 0, "windows": 0, "c_stores": 1},
        "torch_store": {"c_scores": 0, "windows": 0, "c_stores": 0},
        "before": {"c_scores": 0, "windows": 0, "c_stores": 0}}
    for name in ("now", "moments_zeroed", "no_window", "torch_scores", "whole_scores", "torch_store", "before"):
        assert out[f"{name}_s"] > 0
        assert out[f"{name}_vs_stream"] == pytest.approx(out[f"{name}_s"] / out["stream_s"], rel=0.05, abs=0.01)
