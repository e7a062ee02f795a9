"""MATRIX_ONESHOT_PRUNE_ONLY: methods that score without training run prune-only; the others train as configured.

A prune-only run has MAX_ITERS=0: the overrides are checked through the same
strict validation every combination passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lib.kconfig
import lib.matrix.plan
from lib.cli import build_parser
from lib.errors import KpruneError
from lib.kconfig import REPO_ROOT, apply_overrides, read_config
from lib.matrix.plan import SELECTORS, build_plan, plan_table
from lib.pruning.registry import PRUNE_ONLY_METHODS
from lib.settings import settings_from_namespace

RUNS = Path("results/matrix-x/runs")
MAG = "gpt2-adamwprune-magnitude-sp0.5-one-shot-prune-only-seed1337"
MAG_NM = "gpt2-adamwprune-magnitude-sp0.5-one-shot-nm-prune-only-seed1337"
WANDA = "gpt2-adamwprune-wanda-sp0.5-one-shot-prune-only-seed1337"
WANDA_NM = "gpt2-adamwprune-wanda-sp0.5-one-shot-nm-prune-only-seed1337"
SGPT = "gpt2-adamwprune-sparsegpt-sp0.5-one-shot-prune-only-seed1337"
SGPT_NM = "gpt2-adamwprune-sparsegpt-sp0.5-one-shot-nm-prune-only-seed1337"
PRUNE_ONLY = (MAG, MAG_NM, WANDA, WANDA_NM, SGPT, SGPT_NM)
BIT = "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-seed1337"
BIT_NM = "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp-nm-seed1337"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A run's export/hf directory holding the tiny GPT-2 in the Hugging Face layout."""
    from gpt2.hf import write_hf_dir
    from gpt2.model import GPT, config_for

    hf = tmp_path_factory.mktemp("pretrain") / "export" / "hf"
    hf.mkdir(parents=True)
    write_hf_dir(GPT(config_for("tiny", 64, 0.0)), hf)
    return hf


def _plan(export: Path | str, *overrides: str):
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "oneshot-ab")
    apply_overrides(kconf, seen, [f"GPT2_PRETRAINED={export}", *overrides])
    return build_plan(kconf, RUNS)


def _settings(run):
    return settings_from_namespace(build_parser(run.model, prog="x", description="").parse_args(run.argv))


def test_prune_only_arms_train_no_step_and_prune_at_step_0(export):
    plan = _plan(export)
    assert [r.id for r in plan.runs] == [*PRUNE_ONLY, BIT, BIT_NM] and plan.dropped == []
    assert plan.baseline == MAG.removesuffix("-seed1337")
    runs = {r.id: r for r in plan.runs}
    for run_id in PRUNE_ONLY:
        s = _settings(runs[run_id])
        assert (s.max_iters, s.schedule, s.schedule_start) == (0, "one-shot", 0)
        assert "--schedule-end" not in runs[run_id].argv  # one-shot has no end
        assert runs[run_id].axes["max_iters"] == 0 and runs[run_id].axes["schedule"] == "one-shot"
    for run_id in (BIT, BIT_NM):  # bitter7 needs training: it prunes while fine-tuning, as configured
        s = _settings(runs[run_id])
        assert (s.max_iters, s.schedule, s.schedule_start, s.schedule_end) == (300, "cubic-ramp", 20, 200)
        assert runs[run_id].axes["max_iters"] == 300
    # Otherwise the prune-only runs are the fine-tuning runs' configuration: same start, structure, target.
    for a, b in ((MAG, BIT), (MAG_NM, BIT_NM)):
        sa, sb = vars(_settings(runs[a])), vars(_settings(runs[b]))
        assert {k for k in sa if sa[k] != sb[k]} == {"max_iters", "schedule", "schedule_start", "schedule_end",
                                                     "pruning_method", "run_name"}
        assert sa["gpt2_init"] == "pretrained" and sa["gpt2_pretrained"] == str(export)
    assert plan.axes["max_iters"] == [0, 300]
    assert f"| {MAG} |" in plan_table(plan) and "| 0 (prune-only) | 1337 |" in plan_table(plan)


def test_without_the_option_every_arm_trains_as_configured(export):
    plan = _plan(export, "MATRIX_ONESHOT_PRUNE_ONLY=n", "MATRIX_METHOD_WANDA=n", "MATRIX_METHOD_SPARSEGPT=n")
    assert [r.id for r in plan.runs] == ["gpt2-adamwprune-magnitude-sp0.5-cubic-ramp-seed1337",
                                         "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp-nm-seed1337", BIT, BIT_NM]
    assert {r.axes["max_iters"] for r in plan.runs} == {300}
    assert {_settings(r).max_iters for r in plan.runs} == {300}


def test_exactly_the_methods_that_need_no_training_run_prune_only(export):
    """Every method the matrix offers: prune-only where the registry says so, and only there (dense: never)."""
    methods = [f"{symbol}=y" for symbol, (axis, _) in SELECTORS.items() if axis == "method"]
    plan = _plan(export, *methods, "MATRIX_STRUCTURE_NM=n")
    combos = [r.axes for r in plan.runs] + [d["axes"] for d in plan.dropped]
    assert {a["method"] for a in combos} == {value for axis, value in SELECTORS.values() if axis == "method"}
    assert "magnitude" in PRUNE_ONLY_METHODS
    for axes in combos:
        prune_only = axes["method"] in PRUNE_ONLY_METHODS
        assert (axes["max_iters"] == 0) == prune_only, axes
        assert prune_only <= (axes["schedule"] == "one-shot")
    for run in plan.runs:
        assert (_settings(run).max_iters == 0) == (run.axes["method"] in PRUNE_ONLY_METHODS)


def test_a_prune_only_arm_the_rules_refuse_is_dropped_with_the_reason(export):
    plan = _plan(export, "MATRIX_SPARSITY_LIST=0.8")  # 2:4 cannot reach 80%
    dropped = [d for d in plan.dropped if d["axes"]["method"] == "magnitude"]
    assert [(d["axes"]["sparsity_structure"], d["axes"]["target_sparsity"]) for d in dropped] == [("nm", 0.8)]
    assert dropped[0]["axes"]["max_iters"] == 0 and dropped[0]["reason"].startswith("prune-only (MAX_ITERS=0")
    assert MAG.replace("sp0.5", "sp0.8") in [r.id for r in plan.runs]


def test_a_missing_pretrained_export_is_one_error_naming_the_commands(tmp_path):
    missing = tmp_path / "results" / "gpt2-pretrain-shakespeare" / "export" / "hf"
    with pytest.raises(KpruneError) as exc:
        _plan(missing)
    message = str(exc.value)
    assert "\n" not in message and "config.json and model.safetensors missing" in message
    assert f"no finished run in {missing.parent.parent}" in message and "make export RESULTS=" in message
    run_dir = missing.parent.parent
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"status": "interrupted"}')  # stopped: resume it, then export
    with pytest.raises(KpruneError, match=rf"interrupted; finish it with `make resume RESUME={run_dir}`, export it "
                                          rf"with `make export RESULTS={run_dir}`"):
        _plan(missing)
    (run_dir / "summary.json").write_text('{"status": "complete"}')  # finished: make export is all that is missing
    with pytest.raises(KpruneError, match=rf"trained but not exported; run `make export RESULTS={run_dir}`"):
        _plan(missing)


def test_the_shipped_matrix_without_a_pretrained_model_says_make_pretrain(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the defconfig's relative path: a fresh clone, nothing pretrained yet
    kconf, _ = read_config(REPO_ROOT / "defconfigs" / "oneshot-ab")
    with pytest.raises(KpruneError, match=r"pretrain it first with `make pretrain` \(it writes \.config from "
                                          r"defconfigs/gpt2-pretrain-shakespeare"):
        build_plan(kconf, RUNS)


def test_a_directory_not_from_make_export_says_which_files_to_put_there(tmp_path, export):
    own = tmp_path / "my-gpt2"
    own.mkdir()
    (own / "config.json").write_bytes((export / "config.json").read_bytes())
    with pytest.raises(KpruneError, match=r"holds no pretrained model \(model.safetensors missing\): put config.json "
                                          r"and model.safetensors there"):
        _plan(own)


def test_a_hub_id_is_left_to_the_runs():
    """Only a local directory is checked at plan time: a hub id is fetched (or found in the cache) by each run."""
    plan = _plan("openai-community/gpt2", "MATRIX_STRUCTURE_NM=n")
    assert {_settings(r).gpt2_pretrained for r in plan.runs} == {"openai-community/gpt2"}
