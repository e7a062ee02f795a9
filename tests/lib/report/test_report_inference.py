"""The inference column of report.md and quality_vs_speed.png, read from the runs' inference.json
(what `make bench-inference` writes; tests/bench/test_bench_inference.py checks that writer against this reader)."""

from __future__ import annotations

import json

import matplotlib.image as mpimg

from lib.report import plots
from lib.report.build import build_report
from lib.report.inference import MODEL_FILE, RESULT_FILE, model_file_stamp
from lib.report.markdown import NO_SPEED_PLOT
from lib.report.plots import SPEED_PLOT
from lib.report.runs import load_matrix
from tests.lib.report.test_report_markdown import BIT, MAG, _rows, _text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def measured(run_dir, b1: float, b8: float, device: str = "cpu", pruned_arm: str | None = "smaller") -> None:
    """An inference.json as bench/inference.py writes it for a run trained at batch 8."""
    (run_dir / RESULT_FILE).write_text(json.dumps({
        "source": str(run_dir), "device": device, "dtype": "float32", "batch_sizes": [1, 8], "context": 64,
        "model_file": model_file_stamp(run_dir),
        "repeats": 5, "pruned_arm": pruned_arm, "speedup_b1": b1, "speedup_b8": b8,
        "dense_latency_s_b1": 0.02, "dense_latency_s_b8": 0.1, "threads": 2, "torch": "2.13.0"}))


def two_arms(builder):
    for seed, quality in ((1, 50.0), (2, 51.0), (3, 52.0)):
        builder.add(method="magnitude", seed=seed, quality=quality)
        builder.add(method="bitter7", seed=seed, quality=quality - 3)
    return builder.write()


def test_measured_runs_fill_the_inference_column_with_their_mean_speedups(builder):
    path = two_arms(builder)
    measured(path / "runs" / f"{BIT}-seed1", 1.5, 1.75)
    measured(path / "runs" / f"{BIT}-seed2", 1.7, 1.85)
    measured(path / "runs" / f"{BIT}-seed3", 1.6, 1.80)
    rows = _rows(_text(builder))
    assert rows[BIT][-1] == "1.60× b1, 1.80× b8 (cpu; smaller model)"
    assert rows[MAG][-1] == "—"  # never measured


def test_a_run_with_no_faster_form_and_a_partly_measured_arm_say_so(builder):
    path = two_arms(builder)
    measured(path / "runs" / f"{MAG}-seed1", 1.0, 1.0, pruned_arm=None)
    measured(path / "runs" / f"{BIT}-seed2", 1.9, 1.3, device="NVIDIA A100-SXM4-80GB", pruned_arm="sparse24")
    rows = _rows(_text(builder))
    assert rows[MAG][-1] == "1.00× b1, 1.00× b8 (cpu; dense kernels; 1 of 3 runs)"
    assert rows[BIT][-1] == "1.90× b1, 1.30× b8 (NVIDIA A100-SXM4-80GB; 2:4 kernels; 1 of 3 runs)"


def test_the_quality_vs_speed_plot_is_drawn_with_data_and_absent_without(builder, monkeypatch):
    monkeypatch.setattr(plots, "FIGURES", {})  # the other six figures have their own tests
    path = two_arms(builder)
    report = build_report(path)
    assert SPEED_PLOT not in report.plots and not (path / "plots" / SPEED_PLOT).exists()
    assert NO_SPEED_PLOT in report.report.read_text()

    measured(path / "runs" / f"{BIT}-seed1", 1.5, 1.75)
    report = build_report(path)
    png = path / "plots" / SPEED_PLOT
    assert report.plots[SPEED_PLOT] == png and png.read_bytes().startswith(PNG_SIGNATURE)
    assert mpimg.imread(png).shape[0] > 200
    text = report.report.read_text()
    assert f"](plots/{SPEED_PLOT})" in text and NO_SPEED_PLOT not in text

    (path / "runs" / f"{BIT}-seed1" / RESULT_FILE).unlink()  # the measurement is gone: so is its plot
    assert SPEED_PLOT not in build_report(path).plots and not png.exists()


def test_an_unreadable_inference_file_is_named_and_leaves_the_cell_empty(builder):
    path = two_arms(builder)
    (path / "runs" / f"{BIT}-seed1" / RESULT_FILE).write_text('{"device": "cpu", "batch_sizes": [1, 8]')
    matrix = load_matrix(path)
    assert any(p.startswith(str(path / "runs" / f"{BIT}-seed1" / RESULT_FILE)) and "make bench-inference" in p
               for p in matrix.problems)
    assert _rows(_text(builder))[BIT][-1] == "—"


def test_a_measurement_of_an_earlier_final_model_is_not_used(builder):
    path = two_arms(builder)
    run_dir = path / "runs" / f"{BIT}-seed1"
    (run_dir / MODEL_FILE).write_bytes(b"the model as measured")
    measured(run_dir, 1.5, 1.75)
    assert _rows(_text(builder))[BIT][-1].startswith("1.50× b1")
    (run_dir / MODEL_FILE).write_bytes(b"the model after a resume went on")  # another size: another model
    matrix = load_matrix(path)
    assert next(r for r in matrix.runs if r.path == run_dir).inference is None
    assert any("measured an earlier final model" in p for p in matrix.problems)
    assert _rows(_text(builder))[BIT][-1] == "—"
