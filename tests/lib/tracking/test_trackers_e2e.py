"""The trackers as a user runs them: a test matrix with W&B, trackio and TensorBoard on,
read back with each package's own reader (offline / local only: HOME, the stores and
the proxies point into tmp_path, so nothing reaches the network or the user's home)."""

from __future__ import annotations

import json

import pytest

from lib.kconfig import REPO_ROOT
from lib.results import read_metrics
from tests.lib.tracking.readers import (assert_tensorboard_holds, cli, tensorboard_scalars, tensorboard_text,
                                        trackio_store, wandb_records)

pytestmark = pytest.mark.slow

QUICK = ("MAX_ITERS=12 SCHEDULE_START=2 SCHEDULE_END=10 SCHEDULE_FREQUENCY=2 EVAL_INTERVAL=6 LOG_INTERVAL=4 "
         "BATCH_SIZE=32 LR_WARMUP_ITERS=2 MATRIX_NAME=tracked MATRIX_METHOD_MAGNITUDE=n "
         + " ".join(f"MATRIX_VARIANT_BITTER{i}=n" for i in range(10) if i != 7))


def test_a_matrix_run_streams_rows_config_and_summary_to_all_three_trackers(tmp_path):
    tb_root = tmp_path / "tb"
    cli(tmp_path, "-m", "scripts.kconfig", "defconfig", str(REPO_ROOT / "defconfigs" / "test-matrix-bitter-variants"),
        "--set", f"{QUICK} DATA_DIR={REPO_ROOT / 'data'} TRACK_WANDB=y TRACK_TRACKIO=y TRACK_TENSORBOARD=y "
                 f"TRACK_PROJECT=kp-test TRACK_TENSORBOARD_DIR={tb_root}")
    result = cli(tmp_path, "-m", "scripts.matrix")
    matrix_dir = tmp_path / result.stdout.strip().splitlines()[-1].removeprefix("results: ")
    (run_dir,) = (matrix_dir / "runs").iterdir()
    assert run_dir.name == "lenet5-adamwprune-bitter7-sp0.7-cubic-ramp-seed1337"  # arm and seed
    rows = read_metrics(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    config_text = (run_dir / "config").read_text()
    assert summary["status"] == "complete" and len(rows) == 9 and any(r.get("mask_update") for r in rows)

    # W&B: the offline run, grouped by matrix and named by arm and seed, holds every row at its step.
    records = wandb_records(tmp_path, run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert (run["project"], run["run_group"], run["display_name"]) == ("kp-test", matrix_dir.name, run_dir.name)
    config = run["config"]["update"]
    assert config["kconfig"] == config_text and config["seed"] == 1337 and config["state_variant"] == "bitter7"
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == sorted({r["step"] for r in rows})
    for row in rows:
        assert {k: history[row["step"]][k] for k in row if k != "step"} == {k: v for k, v in row.items() if k != "step"}
    final = {}
    for r in records:
        if r["type"] == "summary":
            final.update(r["summary"]["update"])
    assert final["status"] == "complete" and final["val_accuracy"] == summary["val_accuracy"]
    assert final["final_sparsity"] == summary["final_sparsity"]
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]

    # trackio: the local store has the run, its config and group, every row, then the summary row.
    store = trackio_store(tmp_path, "kp-test", run_dir.name)
    assert store["runs"] == [run_dir.name]
    assert store["config"]["kconfig"] == config_text and store["config"]["_Group"] == matrix_dir.name
    logged = [{k: v for k, v in log.items() if k != "timestamp"} for log in store["logs"]]
    assert logged[:-1] == rows
    assert logged[-1]["step"] == summary["iterations"]
    assert logged[-1]["summary/val_accuracy"] == summary["val_accuracy"]
    assert logged[-1]["summary/memory/masks"] == summary["memory"]["masks"]

    # TensorBoard: <TRACK_TENSORBOARD_DIR>/<group>/<run name> holds every number of every row.
    acc = tensorboard_scalars(tb_root / matrix_dir.name / run_dir.name)
    assert_tensorboard_holds(acc, rows)
    assert [line[4:] for line in tensorboard_text(acc, "kconfig").splitlines()] == config_text.splitlines()
    assert json.loads(tensorboard_text(acc, "summary"))["val_accuracy"] == summary["val_accuracy"]
