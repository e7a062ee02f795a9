"""Calibration in the real trainers, and prune-only runs (MAX_ITERS=0) of the tiny GPT-2 end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpt2.train
import lenet5.train
from lib.cli import build_parser
from lib.data.tokens import TokenBatches
from lib.pruning.pruner import target_count
from lib.results import read_metrics
from lib.settings import settings_from_namespace

pytestmark = pytest.mark.slow


def _settings(model: str, data_dir: Path, *flags: str):
    parser = build_parser(model, prog="x", description="")
    return settings_from_namespace(parser.parse_args(["--data-dir", str(data_dir), "--batch-size", "4", *flags]))


def test_gpt2_calibration_reads_the_training_split_only_and_leaves_the_training_stream(data_dir, monkeypatch):
    read: list[str] = []
    sample = TokenBatches.sample

    def recording(self, *args, **kw):
        read.append(self.path.name)
        return sample(self, *args, **kw)

    monkeypatch.setattr(TokenBatches, "sample", recording)
    s = _settings("gpt2", data_dir, "--pruning-method", "wanda", "--eval-iters", "1")
    plain, calibrated = gpt2.train.build_task(s, torch.device("cpu")), gpt2.train.build_task(s, torch.device("cpu"))
    read.clear()
    batches = calibrated.calibration_batches(3)
    assert read == ["train.bin"] * 3 and len(batches) == 3
    assert all(x.shape == (4, s.block_size) for x, _ in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches[0], calibrated.calibration_batches(3)[0]))  # same each time
    # The training stream is the same with calibration between its batches as without.
    first = [plain.next_batch() for _ in range(3)]
    second = [calibrated.next_batch()]
    calibrated.calibration_batches(5)
    second += [calibrated.next_batch() for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_lenet5_calibration_draws_training_images_without_moving_the_sampler(data_dir):
    s = _settings("lenet5", data_dir, "--pruning-method", "wanda")
    task = lenet5.train.build_task(s, torch.device("cpu"))
    before = task.data_state()
    batches = task.calibration_batches(2)
    after = task.data_state()
    assert torch.equal(before["generator"], after["generator"]) and len(before["order"]) == len(after["order"])
    images, _ = lenet5.train._to_tensors(*lenet5.train.load_mnist(data_dir / "mnist", "train"), torch.device("cpu"))
    flat = images.view(len(images), -1)
    for x, _ in batches:  # every calibration image is one of the training set's
        assert all((flat == row).all(1).any() for row in x.view(len(x), -1))


def test_resnet_calibration_leaves_the_sampler_and_its_augmentation_stream(data_dir):
    import resnet.train
    s = _settings("resnet", data_dir, "--pruning-method", "wanda", "--resnet-depth", "18", "--resnet-width", "8")
    plain, calibrated = resnet.train.build_task(s, torch.device("cpu")), resnet.train.build_task(s, torch.device("cpu"))
    first = [plain.next_batch() for _ in range(3)]  # augmented: the sampler's generator also draws the crops
    second = [calibrated.next_batch()]
    calibration = calibrated.calibration_batches(2)
    second += [calibrated.next_batch() for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert [x.shape for x, _ in calibration] == [(4, 3, 32, 32)] * 2


PRUNE_ONLY = ["--max-iters", "0", "--schedule", "one-shot", "--schedule-start", "0", "--eval-iters", "2",
              "--calibration-batches", "2", "--target-sparsity", "0.5"]


@pytest.mark.parametrize("method, scope", [("magnitude", "global"), ("wanda", "row"), ("sparsegpt", "layer")])
def test_a_prune_only_run_prunes_once_evaluates_and_writes_its_results(data_dir, tmp_path, capsys, method, scope):
    flags = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path), "--pruning-method", method,
             "--sparsity-scope", scope, "--threads", "1", *PRUNE_ONLY]
    if method == "magnitude":
        flags.remove("--calibration-batches"), flags.remove("2")
    assert gpt2.train.main(flags) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["iterations"] == 0
    want = target_count(0.5, summary["prunable_params"])
    assert summary["final_pruned_count"] == summary["mask_pruned_count"] == want and summary["target_count_exact"]
    [update] = summary["mask_updates"]
    assert update["step"] == 0 and update["pruned_count"] == want
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 0] and rows[0]["mask_update"]
    assert rows[1]["achieved_sparsity"] == summary["final_sparsity"] == want / summary["prunable_params"]
    assert summary["val_ppl"] == rows[1]["val_ppl"] < 1e5  # evaluated after pruning, a finite perplexity
    weights = load_file(run_dir / "model.safetensors")
    masks = load_file(run_dir / "masks.safetensors")
    assert sum(int(m.sum()) for m in masks.values()) == want
    assert all((weights[name][m] == 0).all() for name, m in masks.items())


def test_a_prune_only_run_with_a_method_that_needs_training_is_refused(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpt2.train.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path), "--pruning-method", "movement",
                         *PRUNE_ONLY])
    assert exc.value.code == 2
    assert "PRUNING_METHOD=movement scores from training" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was started
