"""The six PNGs: written atomically into <matrix>/plots/, valid images, for one model or several."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import pytest

from lib.report.curves import arm_curve, paired_curve
from lib.report.plots import FIGURES, validation_figure, write_plots
from lib.report.runs import Run, load_matrix

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = ["loss.png", "validation.png", "sparsity.png", "quality_vs_sparsity.png", "memory.png", "throughput.png"]


def _assert_pngs(plots, out_dir):
    assert sorted(plots) == sorted(EXPECTED)
    for name, path in plots.items():
        assert path == out_dir / name
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert not [p for p in out_dir.iterdir() if p.suffix == ".tmp"]  # atomic writes leave no temp files


def test_every_plot_is_a_png(ab_builder):
    matrix = load_matrix(ab_builder.write())
    plots = write_plots(matrix)
    _assert_pngs(plots, matrix.path / "plots")


@pytest.mark.slow  # starts a process or trains: over a second
def test_mixed_models_and_dense_arm(builder):
    for model, quality in (("gpt2", 50.0), ("lenet5", 0.99)):
        for method in ("magnitude", "bitter7", "none"):
            for sparsity in (0.5, 0.7):
                builder.add(model=model, method=method, target_sparsity=sparsity, seed=1, quality=quality)
    matrix = load_matrix(builder.write())
    _assert_pngs(write_plots(matrix), matrix.path / "plots")


def test_plots_need_no_completed_run_to_exist(builder):
    builder.add(method="magnitude", seed=1, status="failed", error="boom")
    matrix = load_matrix(builder.write(), require_complete=False)
    _assert_pngs(write_plots(matrix), matrix.path / "plots")


def test_figures_registry_names_each_file_once():
    assert list(FIGURES) == EXPECTED


def test_curve_is_mean_min_max_over_seeds(ab_builder):
    matrix = load_matrix(ab_builder.write())
    runs = matrix.baseline.complete_runs
    curve = arm_curve(runs, "loss")
    values = [next(r["loss"] for r in run.metrics if r.get("step") == 100 and "loss" in r) for run in runs]
    i = curve.steps.index(100)
    assert curve.mean[i] == pytest.approx(sum(values) / 3)
    assert (curve.low[i], curve.high[i], curve.n[i]) == (min(values), max(values), 3)
    assert arm_curve(runs, "no_such_metric") is None


def test_validation_has_a_paired_difference_panel_with_its_interval(builder):
    for seed, shift in ((1, 0.0), (2, 3.0), (3, -2.0)):
        builder.add(method="magnitude", seed=seed, quality=50.0 + shift)
        builder.add(method="bitter7", seed=seed, quality=48.0 + shift + 0.1 * seed)
    matrix = load_matrix(builder.write())
    base, arm = matrix.baseline, matrix.arms[1]
    curve = paired_curve(arm.complete_runs, base.complete_runs, "val_ppl")
    # At the last step the curves end at the final qualities: differences -1.9, -1.8, -1.7,
    # mean -1.8, std 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248414.
    assert curve.steps[-1] == 200 and curve.n[-1] == 3
    assert curve.mean[-1] == pytest.approx(-1.8)
    assert (curve.low[-1], curve.high[-1]) == (pytest.approx(-1.8 - 0.248414, abs=1e-6),
                                               pytest.approx(-1.8 + 0.248414, abs=1e-6))
    fig = validation_figure(matrix)
    curves, difference = fig.axes
    assert difference.get_title() == "Difference to the baseline, gpt2"
    [line] = [ln for ln in difference.lines if ln.get_label().startswith("bitter7 − magnitude")]
    assert list(line.get_xdata()) == curve.steps and list(line.get_ydata()) == pytest.approx(curve.mean)
    [band] = difference.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(min(curve.low)) and max(ys) == pytest.approx(max(curve.high))


def test_one_seed_draws_the_difference_without_a_band():
    runs = [Run(id="a", arm="a", seed=1, axes={}, path=None, metrics=[{"step": 10, "val_ppl": 5.0}])]
    base = [Run(id="b", arm="b", seed=1, axes={}, path=None, metrics=[{"step": 10, "val_ppl": 6.0}]),
            Run(id="c", arm="b", seed=2, axes={}, path=None, metrics=[{"step": 10, "val_ppl": 9.0}])]
    curve = paired_curve(runs, base, "val_ppl")
    assert curve.mean == [-1.0] and curve.n == [1] and math.isnan(curve.low[0]) and math.isnan(curve.high[0])
