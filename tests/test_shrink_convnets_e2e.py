"""Channel-pruned LeNet-5 and ResNet runs as a user makes them: train, make export, make evaluate on export/small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib.kconfig import REPO_ROOT, apply_overrides, read_config, trainer_argv
from resnet import train as resnet_train
from scripts import evaluate, export
from tests.test_train_e2e import QUICK_LENET5, make, project, run_dir_of  # noqa: F401 (project is a fixture)

pytestmark = pytest.mark.slow


def test_make_export_and_make_evaluate_of_a_channel_pruned_lenet5(project):
    make(project, "defconfig-lenet5-bitter7-channel")
    run_dir = run_dir_of(make(project, "train", f"SET={QUICK_LENET5}"), project)
    summary = json.loads((run_dir / "summary.json").read_text())
    small_dir = run_dir / "export" / "small"
    result = make(project, "export", f"RESULTS={run_dir}")
    assert result.stdout.splitlines()[-2:] == [f"wrote: {small_dir / 'model.safetensors'}",
                                               f"wrote: {small_dir / 'config'}"]
    # layer scope, half of each layer: 3 of 6 conv1 filters, 8 of 16 conv2, 60 of 120 fc1 neurons, 42 of 84 fc2
    assert "smaller model: conv1 3, conv2 8, fc1 60, fc2 42; parameters 61,706 -> 15,738" in result.stderr

    masked, small = (json.loads(make(project, "evaluate", f"RESULTS={d}").stdout) for d in (run_dir, small_dir))
    # The run directory gives the run's own last evaluation, exactly; export/small the same up to float rounding.
    assert (masked["val_loss"], masked["val_accuracy"]) == (summary["val_loss"], summary["val_accuracy"])
    assert small["val_accuracy"] == summary["val_accuracy"]
    assert abs(small["val_loss"] - summary["val_loss"]) <= 1e-6
    # What goes: the pruned weights and each pruned unit's bias.
    pruned_units = summary["mask_updates"][-1]["pruned_groups"]
    assert masked["params"] - small["params"] == summary["final_pruned_count"] + pruned_units == 61_706 - 15_738


def test_a_channel_pruned_resnet_exports_a_smaller_model_that_evaluates_alike(tmp_path, data_dir, capsys):
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "resnet18-bitter7")
    apply_overrides(kconf, seen, ["MAX_ITERS=24", "SCHEDULE=linear", "SCHEDULE_START=2", "SCHEDULE_END=20",
                                  "SCHEDULE_FREQUENCY=6", "EVAL_INTERVAL=24", "LR_WARMUP_ITERS=2", "DEVICE=cpu",
                                  "BATCH_SIZE=4", "RESNET_WIDTH=8", "SPARSITY_STRUCTURE=channel",
                                  "TARGET_SPARSITY=0.5", f"OUTPUT_DIR={tmp_path}", f"DATA_DIR={data_dir}"])
    assert resnet_train.main(trainer_argv(kconf)) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert export.main(["--results", str(run_dir)]) == 0
    assert f"wrote: {run_dir / 'export' / 'small' / 'model.safetensors'}" in capsys.readouterr().out

    results = []
    for directory in (run_dir, run_dir / "export" / "small"):
        assert evaluate.main(["--results", str(directory)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    masked, small = results
    assert (masked["val_loss"], masked["val_accuracy"]) == (summary["val_loss"], summary["val_accuracy"])
    assert small["val_accuracy"] == summary["val_accuracy"]
    assert abs(small["val_loss"] - summary["val_loss"]) <= 1e-6
    # What goes: the pruned weights, and each pruned filter's BatchNorm scale and shift.
    pruned_units = summary["mask_updates"][-1]["pruned_groups"]
    assert pruned_units > 0
    assert masked["params"] - small["params"] == summary["final_pruned_count"] + 2 * pruned_units
