"""The report and the fairness audit on summaries the real trainers wrote, through `make test-matrix`'s program.

One tiny LeNet-5 matrix (12 steps): OPTIMIZER {adamwspam, adamwprune} x {magnitude, bitter7}, two seeds,
ADAMWPRUNE_BASE left at its default (adamw). The plan drops adamwspam/bitter7 (state pruning needs
adamwprune), so the bitter7 arm's baseline (adamwspam/magnitude) differs from it in two axes and in the
optimizer that really ran: AdamWSPAM against plain AdamW.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.kconfig import REPO_ROOT
from lib.report.build import build_report

pytestmark = pytest.mark.slow

QUICK = ("MAX_ITERS=12 SCHEDULE_START=2 SCHEDULE_END=10 SCHEDULE_FREQUENCY=2 EVAL_INTERVAL=12 LOG_INTERVAL=4 "
         "BATCH_SIZE=32 LR_WARMUP_ITERS=2 MATRIX_NAME=real MATRIX_SEEDS=2 "
         "MATRIX_OPTIMIZER_ADAMWSPAM=y MATRIX_OPTIMIZER_ADAMWPRUNE=y")
SPAM_MAG = "lenet5-adamwspam-magnitude-sp0.7-cubic-ramp"
PRUNE_MAG = "lenet5-adamwprune-magnitude-sp0.7-cubic-ramp"
PRUNE_BIT = "lenet5-adamwprune-bitter7-sp0.7-cubic-ramp"
T_975_DF1 = 12.706205  # two seeds: one degree of freedom


def _cli(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("real")
    variants = " ".join(f"MATRIX_VARIANT_BITTER{i}=n" for i in range(10) if i != 7)
    made = _cli(cwd, "scripts.kconfig", "defconfig", str(REPO_ROOT / "defconfigs" / "test-matrix-bitter-variants"),
                "--set", f"{QUICK} {variants} DATA_DIR={REPO_ROOT / 'data'}")
    assert made.returncode == 0, made.stderr
    ran = _cli(cwd, "scripts.matrix", "--jobs", "2")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    matrix_dir = cwd / ran.stdout.strip().splitlines()[-1].removeprefix("results: ")
    return build_report(matrix_dir)


def _comparison(report, a, b):
    [c] = [c for c in report.audit.comparisons if {c.a, c.b} == {a, b}]
    return c


def _accuracy(report, arm: str) -> dict[int, float]:
    """The final accuracy per seed, read straight from the summaries the trainer wrote."""
    out = {}
    for summary in (report.matrix.path / "runs").glob(f"{arm}-seed*/summary.json"):
        data = json.loads(summary.read_text())
        assert data["status"] == "complete" and data["quality_metric"] == "val_accuracy"
        out[data["seed"]] = data["val_accuracy"]
    assert len(out) == 2
    return out


def test_plan_and_baseline(report):
    assert [a.id for a in report.matrix.arms] == [SPAM_MAG, PRUNE_MAG, PRUNE_BIT]
    assert report.matrix.baseline.id == SPAM_MAG


def test_different_optimizers_behind_the_baseline_pair_are_reported(report):
    c = _comparison(report, SPAM_MAG, PRUNE_BIT)
    assert c.axes == ("optimizer", "method") and not c.fair and c in report.audit.unfair
    assert c.verdict == "confounded: differs in 2 axes (optimizer, method)"
    assert {"optimizer.class: AdamWSPAM vs KpruneAdamW", "optimizer.base: adamwspam vs adamw",
            "optimizer.theta: 5000.0 vs (absent)"} <= {str(d) for d in c.intended}
    text = report.report.read_text()
    assert f"- `{SPAM_MAG}` vs `{PRUNE_BIT}` (against the baseline; intended axis: optimizer, method): " \
           "confounded: differs in 2 axes (optimizer, method)" in text
    assert "  - what the axes changed in the runs: optimizer.class: AdamWSPAM vs KpruneAdamW" in text


def test_real_summaries_of_a_fair_pair_show_no_spurious_difference(report):
    one_optimizer = _comparison(report, SPAM_MAG, PRUNE_MAG)
    one_method = _comparison(report, PRUNE_MAG, PRUNE_BIT)
    assert one_optimizer.axes == ("optimizer",) and one_optimizer.fair, [str(d) for d in one_optimizer.differences]
    assert one_method.axes == ("method",) and one_method.fair, [str(d) for d in one_method.differences]
    assert report.audit.inconsistencies == []


def test_statistics_match_the_summaries(report):
    text = report.report.read_text()
    rows = {line.split(" | ")[0].strip("| `"): [c.strip() for c in line.strip("|").split(" | ")]
            for line in text.split("## Results by arm", 1)[1].split("\n## ", 1)[0].splitlines()
            if line.startswith("| `")}
    base = _accuracy(report, SPAM_MAG)
    for arm in (SPAM_MAG, PRUNE_MAG, PRUNE_BIT):
        values = list(_accuracy(report, arm).values())
        mean = sum(values) / 2
        half = T_975_DF1 * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)  # std = |a - b| / sqrt(2)
        assert rows[arm][7] == f"[{mean - half:.4f}, {mean + half:.4f}]"
    mine = _accuracy(report, PRUNE_BIT)
    diffs = [mine[s] - base[s] for s in sorted(base)]
    mean = sum(diffs) / 2
    half = T_975_DF1 * abs(diffs[0] - diffs[1]) / 2
    assert rows[PRUNE_BIT][8].startswith(f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]")
    assert rows[PRUNE_BIT][8].endswith("; confounded: differs in optimizer, method")
    paired = text.split("## Paired differences against the baseline", 1)[1].split("\n## ", 1)[0]
    assert f"| `{PRUNE_BIT}` | `{SPAM_MAG}` | 2 | {mean:+.4f} |" in paired
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in report.plots.values())
