"""`make bench-inference` (bench/inference.py): the arms it times are what they claim; every key is printed.

No time is asserted: the figures are compared within one run, on a quiet machine.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from bench import inference
from gpt2.model import config_for
from lenet5.model import LeNet5
from lib.export import MASKS_FILE, final_model_files, read_final_model
from lib.report import plots
from lib.report.audit import audit_matrix
from lib.report.build import build_report
from lib.report.inference import RESULT_FILE, read_inference
from lib.report.markdown import render_report
from lib.report.plots import SPEED_PLOT
from lib.report.runs import load_matrix
from lib.semi_structured import CPU_NOTE, Conversion, LayerChoice
from scripts import export
from tests.lib.report.conftest import MatrixBuilder
from tests.lib.report.test_report_markdown import _rows
from tests.test_shrink import unit_pruned_gpt
from tests.test_shrink_convnets import LENET_PARAMS, LENET_SMALL, pruned_lenet, pruned_resnet


def bench_output(monkeypatch, capsys, **env: str) -> tuple[list[dict], str]:
    """bench-inference's JSON lines and its stderr, on the CPU at a tiny scale."""
    for name, value in {"BENCH_SCALE": "0.05", "BENCH_REPEATS": "1", "BENCH_BATCH": "2", "BENCH_THREADS": "1",
                        "BENCH_DEVICE": "cpu", **env}.items():
        monkeypatch.setenv(name, value)
    assert inference.main() == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")], captured.err


def run_bench(monkeypatch, capsys, **env: str) -> dict:
    """The one JSON line bench-inference prints."""
    lines, _ = bench_output(monkeypatch, capsys, **env)
    assert len(lines) == 1
    return lines[0]


def write_run(run_dir, model, summary: dict) -> None:
    """A run directory as a GPT-2 run leaves it: its final model, the masks of the block weights (True where
    zero) and summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in final_model_files(model, "gpt2-tiny", 12).items():
        (run_dir / name).write_bytes(data)
    masks = {name: (model.get_parameter(name) == 0).contiguous() for name in inference.block_weight_names(model)}
    (run_dir / MASKS_FILE).write_bytes(save(masks, metadata={"kprune": json.dumps({"meaning": "True = pruned"})}))
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_the_pruned_arms_have_the_structure_they_are_named_after():
    torch.manual_seed(0)
    dense = inference.random_124m(0.05)
    assert (dense.cfg.n_layer, dense.cfg.n_head, dense.cfg.n_embd, dense.cfg.block_size) == (12, 12, 36, 51)
    fc = inference.prune_half(dense, "unstructured").blocks[0].mlp.c_fc.weight
    assert abs(float((fc == 0).float().mean()) - 0.5) < 0.01
    nm = inference.prune_half(dense, "nm").blocks[3].attn.c_attn.weight
    assert torch.all((nm.view(nm.shape[0], -1, 4) != 0).sum(dim=2) == 2)  # exactly 2 of every 4 kept
    channel = inference.prune_half(dense, "channel")
    assert channel.cfg.heads == (6,) * 12 and channel.cfg.hidden == (72,) * 12
    idx = torch.randint(0, 50257, (2, 51))
    with torch.no_grad():  # the smaller model is the half-pruned one, not merely a smaller random one
        masked = inference.GPT(dense.cfg).eval()
        masked.load_state_dict(dense.state_dict())
        for block in masked.blocks:
            block.mlp.c_proj.weight[:, ::2] = 0
            for h in range(0, 12, 2):
                block.attn.c_proj.weight[:, h * 3:(h + 1) * 3] = 0
        assert (channel(idx)[0] - masked(idx)[0]).abs().max().item() <= 1e-5


def test_without_results_it_times_dense_and_three_structures(monkeypatch, capsys):
    monkeypatch.delenv("KPRUNE_RESULTS", raising=False)
    out = run_bench(monkeypatch, capsys)
    assert out["batch_sizes"] == [1, 2] and out["context"] == 51
    for arm in ("dense", "unstructured", "nm", "channel"):
        assert {f"{arm}_latency_s_b1", f"{arm}_latency_s_b2", f"{arm}_params", f"{arm}_peak_bytes"} <= out.keys()
    for arm in ("unstructured", "nm", "channel"):
        assert {f"{arm}_speedup_b1", f"{arm}_speedup_b2"} <= out.keys()
    assert out["unstructured_params"] == out["nm_params"] == out["dense_params"] > out["channel_params"]
    assert {"threads", "torch"} <= out.keys()


def test_with_a_run_it_times_the_model_against_its_smaller_self(tmp_path, monkeypatch, capsys):
    model = unit_pruned_gpt()
    write_run(tmp_path, model, {"settings": {"batch_size": 3}})
    out = run_bench(monkeypatch, capsys, KPRUNE_RESULTS=str(tmp_path))
    assert out["source"] == str(tmp_path) and out["batch_sizes"] == [1, 3] and out["context"] == 64
    assert out["dense_params"] == sum(p.numel() for p in model.parameters()) > out["smaller_params"]
    assert {"smaller_latency_s_b3", "smaller_speedup_b1", "smaller_speedup_b3"} <= out.keys()
    assert out["device"] == "cpu" and out["dtype"] == "float32" and out["pruned_arm"] == "smaller"
    # The same result is kept in the run directory, and the report reads the speedups from it.
    assert json.loads((tmp_path / RESULT_FILE).read_text()) == out
    kept, problem = read_inference(tmp_path)
    assert problem is None and kept.device == "cpu" and kept.pruned_arm == "smaller"
    assert kept.speedup == {1: out["smaller_speedup_b1"], 3: out["smaller_speedup_b3"]}


def test_a_2of4_run_on_a_cpu_runs_dense_and_says_why(tmp_path, monkeypatch, capsys):
    model = inference.prune_half(inference.GPT(config_for("tiny", 64, 0.0)).eval(), "nm")
    write_run(tmp_path, model, {"settings": {"batch_size": 2}, "sparsity_structure": {"kind": "nm"}})
    [out], err = bench_output(monkeypatch, capsys, KPRUNE_RESULTS=str(tmp_path))
    assert CPU_NOTE in err
    assert out["semi_structured"] == {"converted": 0, "dense": {}, "note": CPU_NOTE}
    assert out["pruned_arm"] is None and out["speedup_b1"] == out["speedup_b2"] == 1.0
    assert not any(key.startswith(("smaller_", "sparse24_")) for key in out)


@pytest.mark.slow  # times a model: over a second
def test_with_a_matrix_it_measures_each_completed_run(tmp_path, monkeypatch, capsys):
    builder = MatrixBuilder(root=tmp_path)
    done = builder.add(method="magnitude", seed=1)
    stopped = builder.add(method="magnitude", seed=2, status="interrupted")
    lenet = builder.add(model="lenet5", method="magnitude", seed=1, quality=0.98)
    path = builder.write()
    for run in (done, stopped):  # an interrupted run has a final model too, but the report leaves it out
        write_run(path / "runs" / run.id, unit_pruned_gpt(), json.loads((path / "runs" / run.id / "summary.json")
                                                                        .read_text()))
    [out], err = bench_output(monkeypatch, capsys, KPRUNE_RESULTS=str(path))
    assert out["source"] == str(path / "runs" / done.id) and out["batch_sizes"] == [1, 8]
    assert json.loads((path / "runs" / done.id / RESULT_FILE).read_text()) == out
    assert not any((p / RESULT_FILE).exists() for p in (path / "runs").iterdir() if p.name != done.id)
    assert f"not complete, not measured: {stopped.id}" in err
    assert f"not measured: {lenet.id}: " in err  # this LeNet-5 run wrote no final model


def test_a_2of4_run_whose_layers_convert_is_timed_on_the_kernels(tmp_path, monkeypatch, capsys):
    """What happens on CUDA, wired on the CPU: the conversion (CUDA only, checked by make check-gpu) is
    stood in for by one that reports every pruned layer converted, leaving the weights as they are."""
    def converts_every_pruned_layer(model, pruned):
        layers = [LayerChoice(n.removesuffix(".weight"), (0, 0), True, "2:4") for n in sorted(pruned)]
        return Conversion(layers=layers + [LayerChoice("lm_head", (0, 0), False, "not pruned by the run (no mask)")],
                          backend="cutlass", device="NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(inference, "semi_structured_for", converts_every_pruned_layer)
    monkeypatch.setattr(inference.Where, "place", lambda self, model: model.eval())
    model = inference.prune_half(inference.GPT(config_for("tiny", 64, 0.0)).eval(), "nm")
    write_run(tmp_path, model, {"settings": {"batch_size": 2}, "sparsity_structure": {"kind": "nm"}})
    [out], err = bench_output(monkeypatch, capsys, KPRUNE_RESULTS=str(tmp_path))
    assert out["semi_structured"] == {"converted": 16, "dense": {"lm_head": "not pruned by the run (no mask)"},
                                      "backend": "cutlass"}
    assert "2:4 semi-structured on NVIDIA A100-SXM4-80GB: 16 Linear layers converted (cutlass)" in err and "left dense: lm_head: not pruned" in err
    assert out["pruned_arm"] == "sparse24"
    assert (out["speedup_b1"], out["speedup_b2"]) == (out["sparse24_speedup_b1"], out["sparse24_speedup_b2"])
    assert read_inference(tmp_path)[0].pruned_arm == "sparse24"


def test_an_already_smaller_model_is_measured_as_it_is(tmp_path, monkeypatch, capsys):
    small = inference.shrink(unit_pruned_gpt())  # what make export writes into export/small
    write_run(tmp_path, small, {"settings": {"batch_size": 2}})
    [out], err = bench_output(monkeypatch, capsys, KPRUNE_RESULTS=str(tmp_path))
    assert "already a smaller one" in err and out["pruned_arm"] is None
    assert out["dense_params"] == sum(p.numel() for p in small.parameters())


def write_convnet_run(run_dir, model, name: str, summary: dict) -> None:
    """A run directory as a LeNet-5 or ResNet run leaves it: its final model and summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for file, data in final_model_files(model, name, 12).items():
        (run_dir / file).write_bytes(data)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_a_channel_pruned_lenet5_matrix_run_is_timed_against_its_export_small(tmp_path, monkeypatch, capsys):
    builder = MatrixBuilder(root=tmp_path)
    run = builder.add(model="lenet5", method="bitter7", seed=1, quality=0.98)
    path = builder.write()
    run_dir = path / "runs" / run.id
    model, _ = pruned_lenet()
    summary = json.loads((run_dir / "summary.json").read_text())
    write_convnet_run(run_dir, model, "lenet5", {**summary, "sparsity_structure": {"kind": "channel"}})
    assert export.main(["--results", str(run_dir)]) == 0  # export/small: the smaller model a user gets
    final_small = read_final_model(run_dir / "export" / "small")
    small_params = sum(p.numel() for p in export.model_from_final(final_small, run_dir).parameters())
    capsys.readouterr()

    [out], _ = bench_output(monkeypatch, capsys, KPRUNE_RESULTS=str(path))
    assert out["source"] == str(run_dir) and out["input_shape"] == [1, 28, 28] and "context" not in out
    assert out["batch_sizes"] == [1, summary["settings"]["batch_size"]] == [1, 128]
    assert out["pruned_arm"] == "smaller" and out["speedup_b128"] == out["smaller_speedup_b128"]
    assert out["dense_params"] == LENET_PARAMS > out["smaller_params"] == small_params == LENET_SMALL
    assert json.loads((run_dir / RESULT_FILE).read_text()) == out
    # report.md's inference column for the arm: its measured speedups on the smaller model; and its plot
    matrix = load_matrix(path)
    cell = _rows(render_report(matrix, audit_matrix(matrix), {}))[run.arm][-1]
    assert cell == f"{out['speedup_b1']:.2f}× b1, {out['speedup_b128']:.2f}× b128 (cpu; smaller model)"
    monkeypatch.setattr(plots, "FIGURES", {})  # the other figures have their own tests
    assert build_report(path).plots[SPEED_PLOT] == path / "plots" / SPEED_PLOT


def test_a_channel_pruned_resnet_run_is_timed_on_cifar_shaped_images(tmp_path, monkeypatch, capsys):
    model, owned = pruned_resnet(18)
    write_convnet_run(tmp_path, model, "resnet18-cifar10", {"settings": {"batch_size": 2}})
    [out], _ = bench_output(monkeypatch, capsys, KPRUNE_RESULTS=str(tmp_path))
    assert out["input_shape"] == [3, 32, 32] and out["batch_sizes"] == [1, 2] and out["pruned_arm"] == "smaller"
    assert out["dense_params"] - out["smaller_params"] == owned


def test_an_unstructured_lenet5_run_is_the_dense_computation(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        model.fc1.weight.mul_(torch.rand(model.fc1.weight.shape) > 0.5)  # scattered zeros: no whole unit
    write_convnet_run(tmp_path, model, "lenet5", {"settings": {"batch_size": 4},
                                                  "sparsity_structure": {"kind": "unstructured"}})
    [out], err = bench_output(monkeypatch, capsys, KPRUNE_RESULTS=str(tmp_path))
    assert "no whole conv filter or fc neuron is pruned: no smaller model" in err
    assert out["pruned_arm"] is None and out["speedup_b1"] == out["speedup_b4"] == 1.0
    assert not any(key.startswith(("smaller_", "sparse24_")) for key in out)
