"""Starting from a pretrained model, offline, as the README tells a user: make pretrain, the oneshot-ab matrix,
make plots, make sample; and the one error a user gets who runs the matrix before pretraining.

Kept small with SET (a 30-step pretraining, 12-step fine-tuning runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib.pruning.registry import PRUNE_ONLY_METHODS
from tests.test_train_e2e import QUICK_GPT2, make, project  # noqa: F401 (project is a fixture)

pytestmark = pytest.mark.slow
PRETRAIN = Path("results") / "gpt2-pretrain-shakespeare"  # where defconfigs/gpt2-pretrain-shakespeare trains
QUICK_PRETRAIN = "MAX_ITERS=30 EVAL_INTERVAL=30 LOG_INTERVAL=10 GPT2_EVAL_ITERS=2 LR_WARMUP_ITERS=5"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _val_loss_at(run_dir: Path, step: int) -> float:
    return next(r["val_loss"] for r in _rows(run_dir) if r["step"] == step and "val_loss" in r)


def test_pretrain_export_then_the_oneshot_matrix_starts_from_it(project):
    # Before pretraining: one error at plan time that names the command, and no matrix directory.
    make(project, "defconfig-oneshot-ab")
    early = make(project, "test-matrix", check=False)
    assert early.returncode == 2 and early.stdout == ""
    line, *rest = early.stderr.splitlines()
    assert [r for r in rest if not r.startswith("make: ***")] == []  # besides make's own line
    assert line.startswith(f"error: GPT2_PRETRAINED={PRETRAIN}/export/hf holds no pretrained model")
    assert "`make pretrain`" in line
    assert not list((project / "results").glob("matrix-*"))

    # make pretrain: the dense run, then its export in the Hugging Face layout.
    pretrain = make(project, "pretrain", f"SET={QUICK_PRETRAIN}")
    assert pretrain.stdout.splitlines()[-2:] == [f"wrote: {PRETRAIN}/export/hf/config.json",
                                                 f"wrote: {PRETRAIN}/export/hf/model.safetensors"]
    summary = json.loads((project / PRETRAIN / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["pruning_method"] == "none" and summary["iterations"] == 30
    pretrained_loss = _val_loss_at(project / PRETRAIN, 30)
    assert pretrained_loss < _val_loss_at(project / PRETRAIN, 0) - 1.0  # it learned something to start from

    # The matrix from that export, shrunk: every run it plans completes.
    make(project, "defconfig-oneshot-ab")
    result = make(project, "test-matrix", "JOBS=2", f"SET={QUICK_GPT2}")
    matrix_dir = project / result.stdout.strip().splitlines()[-1].removeprefix("results: ")
    plan = json.loads((matrix_dir / "plan.json").read_text())
    combos = [r["axes"] for r in plan["runs"]] + [d["axes"] for d in plan["dropped"]]
    assert {(a["method"], a["sparsity_structure"]) for a in combos} >= {
        ("magnitude", "unstructured"), ("magnitude", "nm"), ("bitter7", "unstructured"), ("bitter7", "nm")}
    for axes in combos:  # the methods that need no training are planned prune-only, the others fine-tune
        assert axes["max_iters"] == (0 if axes["method"] in PRUNE_ONLY_METHODS else 12), axes
    fine_tuned = [r for r in plan["runs"] if r["axes"]["max_iters"] > 0]
    assert {r["axes"]["method"] for r in fine_tuned} == {"bitter7"}
    for run in plan["runs"]:
        run_dir = matrix_dir / "runs" / run["id"]
        run_summary = json.loads((run_dir / "summary.json").read_text())
        assert run_summary["status"] == "complete"
        assert run_summary["settings"]["gpt2_init"] == "pretrained"
    for run in fine_tuned:
        # Its first evaluation (before any pruning, step 0) is the pretrained model's last: the same weights
        # read back from the export, on the same validation batches (same seed).
        assert _val_loss_at(matrix_dir / "runs" / run["id"], 0) == pytest.approx(pretrained_loss, abs=1e-5)

    make(project, "plots", f"RESULTS={matrix_dir}")
    report = (matrix_dir / "report.md").read_text()
    assert all(f"`{r['arm']}`" in report for r in plan["runs"])

    sampled = make(project, "sample", f"RESULTS={matrix_dir / 'runs' / fine_tuned[0]['id']}", "PROMPT=ROMEO:",
                   "MAX_NEW_TOKENS=8").stdout
    assert sampled.startswith("ROMEO:") and len(sampled) > len("ROMEO:") + 1
