"""Every shipped defconfig validates and trains for a few steps to its exact target."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from lib.kconfig import REPO_ROOT, apply_overrides, read_config, settings_from_kconfig, trainer_argv
from lib.pruning.pruner import target_count

pytestmark = pytest.mark.slow

DEFCONFIGS = sorted((REPO_ROOT / "defconfigs").iterdir())  # matrix defconfigs train their base configuration
# A few steps on the CPU; GPU defconfigs keep their model, data and features (accumulation,
# prefetching) but not their device, compilation or batch size.
QUICK = ["MAX_ITERS=12", "SCHEDULE_START=2", "SCHEDULE_END=10", "SCHEDULE_FREQUENCY=2", "EVAL_INTERVAL=12",
         "LOG_INTERVAL=4", "LR_WARMUP_ITERS=2", "DEVICE=cpu", "COMPILE=n"]
QUICK_BY_MODEL = {"gpt2": ["GPT2_EVAL_ITERS=1"], "lenet5": ["BATCH_SIZE=32"],
                  "resnet": ["BATCH_SIZE=4", "RESNET_WIDTH=8"]}
BIG_GPT2 = ["BATCH_SIZE=1", "GPT2_BLOCK_SIZE=16", "GRAD_ACCUM_STEPS=2", "MAX_ITERS=4", "SCHEDULE_START=1",
            "SCHEDULE_END=4", "SCHEDULE_FREQUENCY=1", "EVAL_INTERVAL=4"]


@pytest.mark.parametrize("path", DEFCONFIGS, ids=lambda p: p.name)
def test_defconfig_trains_a_few_steps(path: Path, tmp_path: Path, capsys, data_dir: Path):
    kconf, seen = read_config(path)
    base = settings_from_kconfig(kconf)
    model = base.model
    extra = BIG_GPT2 if model == "gpt2" and base.gpt2_size != "tiny" else []
    quick = [o for o in QUICK if base.pruning_method != "none" or not o.startswith("SCHEDULE_")]  # dense: none
    overrides = quick + QUICK_BY_MODEL[model] + extra + [f"OUTPUT_DIR={tmp_path}", f"DATA_DIR={data_dir}"]
    if base.gpt2_init == "pretrained":  # its own pretraining run's export: a model of the same shape stands in
        overrides.append(f"GPT2_PRETRAINED={pretrained_export(tmp_path / 'pretrained', base)}")
    # One SET names a symbol once: a later list's value replaces an earlier one's.
    apply_overrides(kconf, seen, [f"{k}={v}" for k, v in dict(o.split("=", 1) for o in overrides).items()])
    settings = settings_from_kconfig(kconf)
    trainer = importlib.import_module(f"{model}.train")
    assert trainer.main(trainer_argv(kconf)) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["iterations"] == round(settings.max_iters * summary["budget_multiplier"])
    if settings.pruning_method != "none":
        assert summary["target_count_exact"] is True
        last, structure = summary["mask_updates"][-1], summary["sparsity_structure"]
        assert last["pruned_groups"] == last["target_groups"]
        assert summary["final_pruned_count"] == summary["mask_pruned_count"] == last["pruned_count"]
        if structure["scope"] == "layer" and structure["kind"] == "channel":  # each family to the same fraction
            assert last["target_groups"] == sum(target_count(settings.target_sparsity, n)
                                                for n in structure["units"].values())
        elif structure["kind"] in ("unstructured", "nm"):  # groups are weights
            assert summary["final_pruned_count"] == target_count(settings.target_sparsity, summary["prunable_params"])
        else:
            assert last["target_groups"] == target_count(settings.target_sparsity, structure["groups"])


def pretrained_export(directory: Path, settings) -> Path:
    """A GPT-2 of the configuration's size in the Hugging Face layout, where GPT2_PRETRAINED may name it."""
    from gpt2.hf import write_hf_dir
    from gpt2.model import GPT, config_for

    directory.mkdir(parents=True)
    write_hf_dir(GPT(config_for(settings.gpt2_size, settings.block_size, 0.0)), directory)
    return directory
