"""The matrix's plots, drawn from its run directories into `<matrix dir>/plots/`.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so drawing
needs no display and leaves no global figure state behind. Every value comes
from summary.json and metrics.jsonl (and, for quality_vs_speed.png, the runs'
inference.json: drawn only when `make bench-inference` measured some run);
arms without a completed run are left out here and listed in report.md.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lib.report.baseline import baseline_for
from lib.report.curves import arm_curve, paired_curve
from lib.report.labels import arm_colors, arm_label
from lib.report.runs import Arm, Matrix
from lib.report.stats import spread
from lib.results import write_bytes_atomic

MIB = 2 ** 20
# Memory keys that are not a share of the stack: the sum itself, and a transient peak outside it.
NOT_STACKED = ("total", "mask_update_peak")
DODGE = 0.006  # sideways offset between lines in quality_vs_sparsity, as a share of the sparsity span
KIND_ORDER = ("weights", "grads", "optimizer", "masks", "scores")
KIND_COLORS = colormaps["tab20"]
QUALITY = {"val_ppl": ("validation perplexity", "lower is better", True),
           "val_accuracy": ("validation accuracy", "higher is better", False)}


def quality_name(key: str) -> str:
    """'validation perplexity (lower is better)' for val_ppl; the key itself for a metric not known here."""
    name, better, _ = QUALITY.get(key, (key, "", False))
    return f"{name} ({better})" if better else name


def _figure(n_panels: int, panel_width: float, panel_height: float = 4.0,
            max_cols: int = 2) -> tuple[Figure, list[Axes]]:
    cols = max(1, min(n_panels, max_cols))
    rows = max(1, math.ceil(n_panels / cols))
    fig = Figure(figsize=(panel_width * cols, panel_height * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(1, n_panels))]
    return fig, axes


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the completed runs", ha="center", va="center", transform=ax.transAxes)


def _by_model(matrix: Matrix, key: Callable[[Arm], str] = lambda a: a.model) -> dict[str, list[Arm]]:
    """Arms with at least one completed run, grouped by `key` in plan order."""
    groups: dict[str, list[Arm]] = {}
    for arm in matrix.arms:
        if arm.complete_runs:
            groups.setdefault(key(arm), []).append(arm)
    return groups


def _quality_group(arm: Arm) -> str:
    return f"{arm.model} {arm.quality_key or '?'}"


def _metric_labels(key: str) -> tuple[str, str, bool]:
    """(panel title stem, y label, log scale) for a metrics.jsonl key."""
    if key == "loss":
        return "Training loss", "training loss", False
    name, _, log = QUALITY.get(key, (key, "", False))
    return name.capitalize(), quality_name(key), log


def _curves(matrix: Matrix, groups: dict[str, list[Arm]], metric: Callable[[Arm], str], suptitle: str,
            panels_per_group: int = 1) -> Figure:
    """One panel per group (the first of `panels_per_group`, the rest left to the caller): `metric` by step
    for each arm, mean line and min-max band over its seeds."""
    colors = arm_colors(matrix)
    fig, axes = _figure(len(groups) * panels_per_group, 6.4)
    for ax, arms in zip(axes[::panels_per_group], groups.values()):
        key = metric(arms[0])
        title, ylabel, log = _metric_labels(key)
        drawn = False
        for arm in arms:
            curve = arm_curve(arm.complete_runs, key)
            if curve is None:
                continue
            label = f"{arm_label(matrix, arm, leave_out=('model',))} (n={len(arm.complete_runs)})"
            ax.plot(curve.steps, curve.mean, color=colors[arm.id], label=label, linewidth=1.5)
            ax.fill_between(curve.steps, curve.low, curve.high, color=colors[arm.id], alpha=0.2, linewidth=0)
            drawn = True
        ax.set_title(f"{title}, {arms[0].model}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if drawn:
            if log:  # perplexity falls by orders of magnitude from step 0
                ax.set_yscale("log")
            ax.legend(fontsize="small")
            ax.grid(True, alpha=0.3)
        else:
            _no_data(ax, key)
    fig.suptitle(suptitle)
    return fig


def loss_figure(matrix: Matrix) -> Figure:
    return _curves(matrix, _by_model(matrix), lambda a: "loss",
                   "Training loss by step: mean over seeds, band = min to max")


def _difference_panel(ax: Axes, matrix: Matrix, arms: list[Arm]) -> None:
    """Each arm minus its baseline by step, paired by seed, with the 95% interval as a band."""
    colors = arm_colors(matrix)
    key = arms[0].quality_key or "?"
    name, better, _ = QUALITY.get(key, (key, "", False))
    drawn = False
    for arm in arms:
        base = baseline_for(matrix, arm)
        if base is None or base is arm or not base.complete_runs or base.quality_key != arm.quality_key:
            continue
        curve = paired_curve(arm.complete_runs, base.complete_runs, key)
        if curve is None:
            continue
        label = f"{arm_label(matrix, arm, leave_out=('model',))} − {arm_label(matrix, base, leave_out=('model',))}"
        ax.plot(curve.steps, curve.mean, color=colors[arm.id], linewidth=1.5, label=f"{label} (pairs={max(curve.n)})")
        ax.fill_between(curve.steps, curve.low, curve.high, color=colors[arm.id], alpha=0.2, linewidth=0)
        drawn = True
    ax.set_title(f"Difference to the baseline, {arms[0].model}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"Δ {name}, arm − baseline" + (f" ({better})" if better else ""))
    if drawn:
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no arm to compare with a baseline", ha="center", va="center", transform=ax.transAxes)


def validation_figure(matrix: Matrix) -> Figure:
    """Per model and metric: the curves (band = min to max over seeds), then each arm's paired difference to its
    baseline by step (band = 95% interval), where two overlapping curves would hide it."""
    groups = _by_model(matrix, _quality_group)
    fig = _curves(matrix, groups, lambda a: a.quality_key or "?",
                  "Validation quality by step: mean over seeds, band = min to max; "
                  "difference to the baseline paired by seed, band = 95% CI", panels_per_group=2)
    for ax, arms in zip(fig.axes[1::2], groups.values()):
        _difference_panel(ax, matrix, arms)
    return fig


def sparsity_figure(matrix: Matrix) -> Figure:
    """One panel per arm: the schedule's target and the sparsity counted in the masks, by step."""
    colors = arm_colors(matrix)
    arms = [a for a in matrix.arms if a.complete_runs]
    fig, axes = _figure(len(arms), 4.2, 3.2, max_cols=3)
    for ax, arm in zip(axes, arms):
        target = arm_curve(arm.complete_runs, "target_sparsity")
        achieved = arm_curve(arm.complete_runs, "achieved_sparsity")
        if achieved is not None:
            # Achieved sparsity holds between mask updates: draw it as the staircase it is.
            ax.plot(achieved.steps, achieved.mean, color=colors[arm.id], linewidth=2, label="achieved",
                    drawstyle="steps-post")
            ax.fill_between(achieved.steps, achieved.low, achieved.high, color=colors[arm.id], alpha=0.2, linewidth=0,
                            step="post")
        if target is not None:
            ax.plot(target.steps, target.mean, color="black", linestyle="--", linewidth=1, label="target")
        if target is None and achieved is None:
            _no_data(ax, "sparsity")
        else:
            ax.legend(fontsize="small", loc="upper left")
        ax.set_title(f"{arm_label(matrix, arm)} (n={len(arm.complete_runs)})", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel("sparsity (fraction of pool pruned)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Target vs achieved sparsity by step (mean over seeds)")
    return fig


def quality_vs_sparsity_figure(matrix: Matrix) -> Figure:
    """Final quality against target sparsity, one line per method (arms alike but for their sparsity)."""
    groups = _by_model(matrix, _quality_group)
    fig, axes = _figure(len(groups), 6.4)
    for ax, arms in zip(axes, groups.values()):
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for arm in arms:
            s = spread([r.quality for r in arm.complete_runs])
            if s is not None and arm.target_sparsity is not None:
                name = arm_label(matrix, arm, leave_out=("target_sparsity", "model"))
                lines.setdefault(name, []).append((arm.target_sparsity, s.mean, s.std))
        xs = sorted({p[0] for points in lines.values() for p in points})
        dodge = DODGE * ((xs[-1] - xs[0]) or 1.0) if xs else 0.0  # keeps lines at one sparsity from hiding each other
        for i, (name, points) in enumerate(lines.items()):
            points.sort()
            shift = dodge * (i - (len(lines) - 1) / 2)
            ax.errorbar([p[0] + shift for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", capsize=4, label=name)
        key = arms[0].quality_key or "?"
        if xs:  # ticks at the sparsities that ran, and room around them so dodged points read as one level
            pad = max(0.05, 0.1 * (xs[-1] - xs[0]))
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_xlim(xs[0] - pad, xs[-1] + pad)
        if lines:
            ax.legend(fontsize="small")
            ax.grid(True, alpha=0.3)
        else:
            _no_data(ax, key)
        ax.set_title(f"Final {QUALITY.get(key, (key,))[0]} vs target sparsity, {arms[0].model}")
        ax.set_xlabel("target sparsity (fraction of pool pruned)")
        ax.set_ylabel(f"final {quality_name(key)}")
    fig.suptitle("Final quality: mean over seeds, error bars = ±1 sample std")
    return fig


def quality_vs_speed_figure(matrix: Matrix) -> Figure:
    """Final quality against the measured inference speedup at the training batch, one labelled point per arm."""
    groups = {k: [a for a in arms if a.inference] for k, arms in _by_model(matrix, _quality_group).items()}
    groups = {k: arms for k, arms in groups.items() if arms}
    colors = arm_colors(matrix)
    fig, axes = _figure(len(groups), 6.4)
    for ax, arms in zip(axes, groups.values()):
        for arm in arms:
            speed = arm.inference
            q = spread([r.quality for r in arm.complete_runs if r.inference is not None])  # the measured seeds
            if q is None:
                continue
            label = arm_label(matrix, arm, leave_out=("model",))
            ax.errorbar([speed.at_training_batch], [q.mean], yerr=[q.std], marker="o", markersize=7, capsize=4,
                        linestyle="none", color=colors[arm.id], label=f"{label} (n={q.n})")
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":")  # no faster than dense
        key = arms[0].quality_key or "?"
        devices = ", ".join(sorted({d for a in arms for d in a.inference.devices}))
        batches = ", ".join(f"b{b}" for b in sorted({a.inference.training_batch for a in arms}))
        ax.set_title(f"Final {QUALITY.get(key, (key,))[0]} vs speed, {arms[0].model} ({devices})", fontsize="medium")
        ax.set_xlabel(f"measured speedup over dense at the training batch ({batches}); dotted: dense speed")
        ax.set_ylabel(f"final {quality_name(key)}")
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Quality vs measured speed: mean ± 1 std over the measured seeds")
    return fig


def _bar_axes(ax: Axes, matrix: Matrix, arms: list[Arm]) -> None:
    labels = [arm_label(matrix, a, leave_out=("model",)) for a in arms]  # the panel title names the model
    ax.set_xticks(range(len(arms)), labels, rotation=30, ha="right")
    ax.grid(True, axis="y", alpha=0.3)


def _kind_rank(kind: str) -> tuple[int, str]:
    """Stack order: the model, then training state, then pruning state; unknown kinds last."""
    for i, prefix in enumerate(KIND_ORDER):
        if kind == prefix or kind.startswith(prefix + "."):
            return i, kind
    return len(KIND_ORDER), kind


def _memory_mib(arm: Arm) -> dict[str, float]:
    """Mean MiB by memory kind over the arm's completed runs."""
    kinds: dict[str, list[float]] = {}
    for run in arm.complete_runs:
        for kind, value in ((run.summary or {}).get("memory") or {}).items():
            kinds.setdefault(kind, []).append(value)
    stats = {k: spread(v) for k, v in kinds.items()}
    return {k: s.mean / MIB for k, s in stats.items() if s is not None}


def memory_figure(matrix: Matrix) -> Figure:
    """Memory by kind per arm (mean over seeds), stacked; the total is written above each bar."""
    groups = _by_model(matrix)
    fig, axes = _figure(len(groups), max(6.4, 1.0 * max((len(a) for a in groups.values()), default=1) + 3), 4.5)
    for ax, (model, arms) in zip(axes, groups.items()):
        means = [_memory_mib(arm) for arm in arms]
        order = sorted(dict.fromkeys(k for m in means for k in m if k not in NOT_STACKED), key=_kind_rank)
        order = [k for k in order if any(m.get(k, 0.0) > 0 for m in means)]  # all-zero kinds only clutter the legend
        bottom = [0.0] * len(arms)
        for i, kind in enumerate(order):
            heights = [m.get(kind, 0.0) for m in means]
            ax.bar(range(len(arms)), heights, bottom=bottom, label=kind, color=KIND_COLORS(i % KIND_COLORS.N))
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, (m, top) in enumerate(zip(means, bottom)):
            total = m.get("total", top)
            ax.annotate(f"{total:,.2f}", (x, top), ha="center", va="bottom", fontsize="small")
        if order:
            ax.legend(fontsize="small", title="kind", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            _no_data(ax, "memory")
        _bar_axes(ax, matrix, arms)
        ax.set_title(f"Memory by kind, {model}")
        ax.set_ylabel("memory at the end of training (MiB)")
    fig.suptitle("Memory by kind (mean over seeds; total MiB above each bar)")
    return fig


def throughput_figure(matrix: Matrix) -> Figure:
    groups = _by_model(matrix, lambda a: f"{a.model} {a.summary_value('throughput_unit')}")
    colors = arm_colors(matrix)
    fig, axes = _figure(len(groups), max(6.4, 1.0 * max((len(a) for a in groups.values()), default=1) + 3), 4.5)
    for ax, arms in zip(axes, groups.values()):
        stats = [spread([(r.summary or {}).get("throughput") for r in arm.complete_runs]) for arm in arms]
        means = [s.mean if s else 0.0 for s in stats]
        errors = [[s.mean - s.low if s else 0.0 for s in stats], [s.high - s.mean if s else 0.0 for s in stats]]
        ax.bar(range(len(arms)), means, yerr=errors, capsize=4, color=[colors[a.id] for a in arms])
        _bar_axes(ax, matrix, arms)
        unit = arms[0].summary_value("throughput_unit") or "items/s"
        ax.set_title(f"Training throughput, {arms[0].model}")
        ax.set_ylabel(f"throughput ({unit})")
    fig.suptitle("Training throughput: mean over seeds, error bars = min to max")
    return fig


def _empty_figure(name: str) -> Figure:
    """Stands in for a figure when no run completed, so report.md never links to a missing file."""
    fig, axes = _figure(1, 6.4)
    axes[0].text(0.5, 0.5, "no completed run yet", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(name)
    return fig


FIGURES: dict[str, Callable[[Matrix], Figure]] = {
    "loss.png": loss_figure,
    "validation.png": validation_figure,
    "sparsity.png": sparsity_figure,
    "quality_vs_sparsity.png": quality_vs_sparsity_figure,
    "memory.png": memory_figure,
    "throughput.png": throughput_figure,
}


SPEED_PLOT = "quality_vs_speed.png"


def write_plots(matrix: Matrix, out_dir: Path | None = None) -> dict[str, Path]:
    """Draw every figure into `out_dir` (default `<matrix dir>/plots`); returns file name -> path.

    quality_vs_speed.png only when some arm was measured by `make bench-inference`; else none is drawn
    (one left from an earlier measurement is removed, so no plot outlives its data).
    """
    out_dir = Path(out_dir) if out_dir is not None else matrix.path / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    any_complete = any(arm.complete_runs for arm in matrix.arms)
    for name, draw in FIGURES.items():
        fig = draw(matrix) if any_complete else _empty_figure(name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        write_bytes_atomic(out_dir / name, buf.getvalue())
        written[name] = out_dir / name
    if any(arm.inference for arm in matrix.arms):
        buf = io.BytesIO()
        quality_vs_speed_figure(matrix).savefig(buf, format="png", dpi=110)
        write_bytes_atomic(out_dir / SPEED_PLOT, buf.getvalue())
        written[SPEED_PLOT] = out_dir / SPEED_PLOT
    else:
        (out_dir / SPEED_PLOT).unlink(missing_ok=True)
    return written
