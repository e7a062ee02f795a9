"""One set of schedule rules for `make defconfig-...` and `make train`, and no lost update at step 0."""

from __future__ import annotations

import json

import pytest

from lib.pruning.pruner import target_count
from tests.test_train_e2e import make, project, run_dir_of  # noqa: F401 (project is a fixture)

pytestmark = pytest.mark.slow

QUICK = "MAX_ITERS=6 BATCH_SIZE=32 EVAL_INTERVAL=6 LOG_INTERVAL=3 LR_WARMUP_ITERS=2"


def test_one_shot_at_step_zero_is_accepted_by_both_and_prunes_after_step_one(project):
    # Before: defconfig accepted it, then the trainer refused SCHEDULE_END (which one-shot does not use);
    # and an update at step 0 was never made, so the run ended `complete` at 0%.
    make(project, "defconfig-lenet5-magnitude", f"SET=SCHEDULE=one-shot SCHEDULE_START=0 {QUICK} RUN_NAME=zero")
    run_dir = run_dir_of(make(project, "train"), project)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert [u["step"] for u in summary["mask_updates"]] == [1]
    assert summary["final_pruned_count"] == target_count(0.7, summary["prunable_params"]) > 0


def test_a_schedule_past_the_run_is_refused_by_defconfig_naming_its_symbol(project):
    result = make(project, "defconfig-lenet5-magnitude", "SET=SCHEDULE=one-shot SCHEDULE_START=40 MAX_ITERS=30",
                  check=False)
    assert result.returncode == 2
    assert ("SCHEDULE_START: step 40 is after the last step (MAX_ITERS=30): the run would stop before "
            "reaching the target sparsity") in result.stderr


def test_make_schedule_shows_a_prune_only_run_pruning_at_step_zero(project):
    make(project, "defconfig-lenet5-magnitude", "SET=SCHEDULE=one-shot SCHEDULE_START=0 MAX_ITERS=0")
    out = make(project, "schedule").stdout
    assert "1 mask updates, run length 0 steps (prune-only)" in out
    assert [line.split() for line in out.splitlines() if line.strip().startswith("0 ")] == [["0", "70.00%"]]
