"""make check-gpu's runner (reporting, exit status, the no-GPU path) and its checks, run on the CPU."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from lib import gpu_checks
from lib.gpu_checks import CheckFailed, run_checks
from scripts import check_gpu

CPU = torch.device("cpu")


def _run(checks) -> tuple[int, list[dict]]:
    lines = []
    code = run_checks(checks, CPU, emit=lines.append)
    return code, [json.loads(line) for line in lines]


def test_one_json_line_per_check_a_summary_and_failure_sets_the_exit_status():
    def good(device, workdir):
        assert workdir.is_dir()
        return {"measured": 1.5}

    def bad(device, workdir):
        raise CheckFailed("the path is broken")

    def crashing(device, workdir):
        raise RuntimeError("CUDA error: an illegal memory access")

    code, lines = _run([("good", good), ("bad", bad), ("crash", crashing), ("good again", good)])
    assert code == 1
    assert [(l["check"], l["ok"]) for l in lines[:4]] == [("good", True), ("bad", False), ("crash", False),
                                                          ("good again", True)]
    assert lines[0]["measured"] == 1.5 and "seconds" in lines[0]
    assert lines[1]["error"] == "CheckFailed: the path is broken"
    assert "illegal memory access" in lines[2]["error"]
    assert lines[4] == {**lines[4], "summary": "check-gpu", "passed": 2, "failed": ["bad", "crash"], "device": "cpu"}
    assert run_checks([("good", good)], CPU, emit=lambda line: None) == 0


def test_without_cuda_it_says_so_runs_nothing_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(check_gpu, "run_checks", lambda *a, **k: pytest.fail("a check ran without a GPU"))
    assert check_gpu.main() == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


def test_every_issue_path_has_a_check():
    names = [name for name, _ in gpu_checks.CHECKS]
    assert names == ["device_auto", "bf16_autocast_and_tf32", "compile_gpt2", "fused_adamw",
                     "exact_selection_equals_cpu", "masks_exact_prefetch_peak_memory", "ddp_one_allreduce_per_step",
                     "checkpoint_resume", "mask_update_memory_and_waits", "spt_and_spam_stay_on_device",
                     "semi_structured_2of4"]


# The checks themselves, on the CPU: all but the 2:4 kernels (CUDA only) run here.

def test_device_auto_and_bf16_checks(tmp_path):
    assert gpu_checks.check_device_auto(CPU, tmp_path) == {"picked": "cpu"}
    assert gpu_checks.check_bf16_and_tf32(CPU, tmp_path)["autocast_dtype"] == "torch.bfloat16"
    with pytest.raises(CheckFailed, match="picked cpu"):
        gpu_checks.check_device_auto(torch.device("cuda", 0), tmp_path)


def test_fused_adamw_and_exact_selection_checks(tmp_path):
    assert gpu_checks.check_fused_adamw(CPU, tmp_path)["fused"] is True
    assert gpu_checks.check_exact_selection(CPU, tmp_path)["pruned"] > 0


def test_exact_selection_check_catches_a_device_that_selects_otherwise(tmp_path, monkeypatch):
    from lib.pruning import build

    real = build.build_pruner
    calls = []

    def second_differs(settings, named, opt, total):
        pruner, extra = real(settings, named, opt, total)
        calls.append(1)
        if len(calls) == 2:  # the "device" pruner gets other scores: its first weight all zeros
            with torch.no_grad():
                named[0][1].zero_()
        return pruner, extra
    monkeypatch.setattr(build, "build_pruner", second_differs)
    with pytest.raises(CheckFailed, match="other weights than the CPU"):
        gpu_checks.check_exact_selection(CPU, tmp_path)


@pytest.mark.slow
def test_masks_and_checkpoint_checks_train_for_real(tmp_path):
    out = gpu_checks.check_train_masks_memory_prefetch(CPU, tmp_path / "train")
    assert out["mask_updates"] == 5 and out["final_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # steps 5..12 follow an update that pruned something (the one at step 2 prunes none: the ramp starts at 0)
    assert out["fused_masking"] is True and out["separate_masking_passes"] == 0 and out["masked_steps"] == 8
    assert gpu_checks.check_checkpoint_resume(CPU, tmp_path / "resume")["final_loss_gap"] <= 1e-3


@pytest.mark.slow
def test_train_check_fails_when_the_pruner_masks_in_a_pass_of_its_own(tmp_path, monkeypatch):
    from lib.pruning.pruner import Pruner

    real_init = Pruner.__init__

    def unfused(self, *args, **kwargs):  # as a pruner whose optimizer cannot mask in its step
        real_init(self, *args, **kwargs)
        self.fused_masking = False
    monkeypatch.setattr(Pruner, "__init__", unfused)
    with pytest.raises(CheckFailed, match="masked in a pass of its own"):
        gpu_checks.check_train_masks_memory_prefetch(CPU, tmp_path)


@pytest.mark.slow
def test_ddp_check_counts_one_all_reduce_round_per_step(tmp_path, monkeypatch):
    out = gpu_checks.check_ddp_one_allreduce(CPU, tmp_path)
    assert out["backend"] == "gloo" and out["allreduce_calls_per_step"] >= 1
    # With no_sync switched off, every micro-batch all-reduces: the check must fail.
    monkeypatch.setattr(gpu_checks.distributed, "accumulating",
                        lambda ddp, micro, accum: contextlib.nullcontext())
    with pytest.raises(CheckFailed, match="micro-batches"):
        gpu_checks.check_ddp_one_allreduce(CPU, tmp_path)


@pytest.mark.slow
def test_compile_check_compiles_gpt2(tmp_path):
    assert gpu_checks.check_compile_gpt2(CPU, tmp_path)["loss"] > 0


@pytest.mark.slow
def test_mask_update_check_needs_the_score_memory_recorded_and_waits_not_growing_with_depth(tmp_path, monkeypatch):
    from lib.pruning import registry
    from lib.pruning.scores import SCORE_CHUNK
    from lib.pruning.update_pass import UpdatePass

    def torch_scores():  # what a GPU runs (on the CPU select.c's one pass scores with no intermediates)
        monkeypatch.setattr(UpdatePass, "_native_keys_", lambda *args, **kwargs: False)
        monkeypatch.setattr(UpdatePass, "_sample_window", lambda *args, **kwargs: (0, None))

    torch_scores()
    out = gpu_checks.check_mask_update_memory_and_waits(CPU, tmp_path)
    assert out["recorded_peak_bytes"] == 2 * 4 * (SCORE_CHUNK // 768) * 768  # bitter5: two chunks of whole rows
    assert out["device_waits_per_update"] == 0  # a CPU never waits; CUDA's sync debug mode counts on a GPU
    # An update that waits once per weight: more waits over 8 weights than over 2.
    calls = []

    @contextlib.contextmanager
    def waits_per_weight(device):
        calls.append(1)
        yield ["synchronizing"] * (2 if len(calls) == 1 else 8)
    monkeypatch.setattr(gpu_checks, "device_waits", waits_per_weight)
    with pytest.raises(CheckFailed, match="once per parameter"):
        gpu_checks.check_mask_update_memory_and_waits(CPU, tmp_path)
    monkeypatch.undo()
    torch_scores()
    monkeypatch.setitem(registry.TEMPORARIES, "bitter5", 0)  # the intermediates forgotten, as before
    with pytest.raises(CheckFailed, match="no score memory"):
        gpu_checks.check_mask_update_memory_and_waits(CPU, tmp_path)


def test_spt_and_spam_check_draws_on_the_device_and_restores_the_generator(tmp_path, monkeypatch):
    from lib.pruning.methods import SPT, Method

    assert gpu_checks.check_spt_and_spam_stay_on_device(CPU, tmp_path) == {"generator_device": "cpu",
                                                                          "device_waits": 0}
    monkeypatch.setattr(SPT, "load_state_dict", Method.load_state_dict)  # the generator's state left behind
    with pytest.raises(CheckFailed, match="explored other weights"):
        gpu_checks.check_spt_and_spam_stay_on_device(CPU, tmp_path)
