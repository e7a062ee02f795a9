"""report.md: what ran, the results per arm with deltas against the baseline, the audit and the plots."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from lib.report.audit import Audit, Comparison
from lib.report.baseline import CONTEXT_AXES, baseline_for
from lib.report.inference import format_inference
from lib.report.labels import arm_label, format_axis
from lib.report.runs import Arm, Matrix, status_counts
from lib.report.stats import ONE_SEED, Estimate, Paired, Spread, estimate, paired, spread, verdict
from lib.results import write_text_atomic

MIB = 2 ** 20
LOWER_IS_BETTER = {"val_ppl": True, "val_loss": True, "val_accuracy": False}
DECIMALS = {"val_ppl": 2, "val_loss": 4, "val_accuracy": 4}
PLOT_TITLES = {"loss.png": "Training loss", "validation.png": "Validation quality",
               "sparsity.png": "Target vs achieved sparsity", "quality_vs_sparsity.png": "Final quality vs sparsity",
               "memory.png": "Memory by kind", "throughput.png": "Throughput",
               "quality_vs_speed.png": "Final quality vs measured inference speedup"}
NO_SPEED_PLOT = ("No quality-vs-speed plot: no run of this matrix has been measured. `make bench-inference "
                 "RESULTS=<matrix dir>` measures every completed run; then `make plots` again.")


def _cell(text: Any) -> str:
    """Text safe inside a table cell: no pipes or line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def format_quality(value: float, key: str | None, signed: bool = False) -> str:
    places = DECIMALS.get(key or "")
    sign = "+" if signed else ""
    return f"{value:{sign}.{places}f}" if places is not None else f"{value:{sign}.4g}"


def format_spread(s: Spread | None, key: str | None) -> str:
    """'45.31 ± 0.42' (sample std over seeds); one seed has no spread: '45.31'."""
    if s is None:
        return "—"
    if s.n == 1:
        return format_quality(s.mean, key)
    return f"{format_quality(s.mean, key)} ± {format_quality(s.std, key)}"


def format_interval(e: Estimate | None, key: str | None, signed: bool = False) -> str:
    """'[44.90, 45.72]', the 95% interval; one value has none and says so."""
    if e is None:
        return "—"
    if not e.has_interval:
        return ONE_SEED
    return f"[{format_quality(e.low, key, signed)}, {format_quality(e.high, key, signed)}]"


def quality_spread(arm: Arm) -> Spread | None:
    return spread([r.quality for r in arm.complete_runs])


def quality_by_seed(arm: Arm) -> dict:
    return {r.seed: r.quality for r in arm.complete_runs if r.quality is not None}


def paired_with_baseline(arm: Arm, base: Arm) -> Paired:
    return paired(quality_by_seed(arm), quality_by_seed(base))


def format_delta(p: Paired, base: Arm, key: str | None) -> str:
    """'-1.23 [-1.60, -0.86] (-2.7%, better)': arm minus baseline paired by seed, its interval and verdict."""
    d = p.difference
    if d is None:
        return "— (no seed in common)"
    shown = format_quality(d.mean, key, signed=True)
    if d.has_interval:
        shown += " " + format_interval(d, key, signed=True)
    base_mean = statistics.fmean(quality_by_seed(base)[s] for s in p.seeds)
    notes = [f"{100 * d.mean / base_mean:+.1f}%"] if base_mean else []
    notes.append(verdict(d, LOWER_IS_BETTER.get(key or "")))
    return f"{shown} ({', '.join(notes)})"


def _delta_cell(matrix: Matrix, arm: Arm, audit: Audit) -> str:
    base = baseline_for(matrix, arm)
    if base is arm:
        if arm is matrix.baseline:
            return "baseline"
        return "baseline at " + " ".join(format_axis(k, arm.axes.get(k)) for k in CONTEXT_AXES if k in arm.axes)
    if base is None or arm.quality_key != base.quality_key or not arm.complete_runs or not base.complete_runs:
        return "—"
    text = format_delta(paired_with_baseline(arm, base), base, arm.quality_key)
    if base is not matrix.baseline:
        text += f" vs {arm_label(matrix, base)}"
    confounded = _confounded(audit, base, arm)
    if confounded:
        text += f"; confounded: differs in {confounded}"
    return text


def _confounded(audit: Audit, base: Arm, arm: Arm) -> str:
    """The other axes on which `arm` differs from its baseline (empty when only one does)."""
    c = next((c for c in audit.comparisons if {c.a, c.b} == {base.id, arm.id}), None)
    return ", ".join(c.axes) if c is not None and c.confounded else ""


def _mean(arm: Arm, key: str) -> float | None:
    s = spread([(r.summary or {}).get(key) for r in arm.complete_runs])
    return None if s is None else s.mean


def _arm_row(matrix: Matrix, arm: Arm, mixed: bool, audit: Audit) -> list[str]:
    q = quality_spread(arm)
    quality = format_spread(q, arm.quality_key) + (f" {arm.quality_key}" if mixed and q else "")
    interval = format_interval(estimate([r.quality for r in arm.complete_runs]), arm.quality_key)
    sparsity = _mean(arm, "final_sparsity")
    throughput = _mean(arm, "throughput")
    totals = spread([((r.summary or {}).get("memory") or {}).get("total") for r in arm.complete_runs])
    iterations = sorted({(r.summary or {}).get("iterations") for r in arm.complete_runs} - {None})
    target = arm.target_sparsity
    return [f"`{arm.id}`", arm.method, arm.optimizer, "—" if target is None else f"{target:g}", arm.schedule,
            f"{len(arm.complete_runs)}/{len(arm.runs)}", quality, interval, _delta_cell(matrix, arm, audit),
            "—" if sparsity is None else f"{sparsity:.4f}",
            "—" if throughput is None else f"{throughput:,.0f} {arm.summary_value('throughput_unit') or ''}".strip(),
            "—" if totals is None else f"{totals.mean / MIB:.2f}",
            ", ".join(str(i) for i in iterations) or "—",
            format_inference(arm.inference, len(arm.complete_runs))]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _header(matrix: Matrix) -> list[str]:
    plan = matrix.plan
    counts = status_counts(matrix)
    complete = counts.pop("complete", 0)
    models = []
    for model in matrix.models:
        names = sorted({str(r.summary.get("model")) for a in matrix.arms if a.model == model
                        for r in a.runs if r.summary and r.summary.get("model")})
        models.append(f"{model} ({', '.join(names)})" if names and names != [model] else model)
    not_complete = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines = [f"# Test matrix report: {matrix.name}", "",
             f"- Directory: `{matrix.path}`",
             *([f"- Compares the matrices: {', '.join(f'`{p}`' for p in matrix.sources)}; an arm's id starts with "
                "the name of its matrix, its label in the plots ends with it in brackets"] if matrix.sources else []),
             f"- Created: {plan.get('created', 'unknown')}" + (f" (plan hash `{plan['plan_hash']}`)"
                                                                  if plan.get("plan_hash") else ""),
             f"- Models: {', '.join(models)}",
             f"- Runs: {complete} of {len(matrix.runs)} complete" + (f"; not complete: {not_complete}"
                                                                     if not_complete else ""),
             f"- Combinations dropped from the plan: {len(matrix.dropped)}",
             f"- Baseline arm: `{plan.get('baseline')}`" + ("" if matrix.baseline else " (not in the plan's runs)")]
    if matrix.unplanned:
        lines.append(f"- Run directories the plan does not name (ignored): {', '.join(matrix.unplanned)}")
    return lines


def _incomplete_section(matrix: Matrix) -> list[str]:
    runs = [r for r in matrix.runs if not r.complete]
    if not runs:
        return []
    rows = [[f"`{r.id}`", r.status, r.error or "—"] for r in runs]
    return ["", "## Runs not complete", "",
            "These runs are left out of every mean, delta and plot below.", "",
            *_table(["run", "status", "error"], rows)]


def _damaged_section(matrix: Matrix) -> list[str]:
    damaged = [p for r in matrix.runs for p in (r.damaged, r.inference_problem) if p]
    if not damaged:
        return []
    return ["", "## Files not read in full", "", *[f"- {_cell(d)}" for d in damaged]]


def _dropped_section(matrix: Matrix) -> list[str]:
    if not matrix.dropped:
        return []
    order = matrix.axis_names + ["seed"]
    rows = []
    for d in matrix.dropped:
        axes = d.get("axes") or {}
        names = sorted(axes, key=lambda k: order.index(k) if k in order else len(order))
        rows.append([", ".join(f"{k}={axes[k]}" for k in names), d.get("reason", "—")])
    return ["", "## Dropped combinations", "", "The plan left these out before running anything.", "",
            *_table(["combination", "reason"], rows)]


def _results_section(matrix: Matrix, audit: Audit) -> list[str]:
    keys = {a.quality_key for a in matrix.arms if a.complete_runs}
    mixed = len(keys) > 1
    quality = "final quality" if mixed or not keys else f"final {next(iter(keys))}"
    header = ["arm", "method", "optimizer", "target sparsity", "schedule", "seeds (n)", f"{quality} (mean ± std)",
              "95% CI", "Δ vs baseline (paired, 95% CI)", "final sparsity (mean)", "throughput (mean)",
              "memory total (MiB)", "iterations", "inference speedup vs dense (measured)"]
    directions = "; ".join(f"{k}: {'lower' if low else 'higher'} is better, so a "
                           f"{'negative' if low else 'positive'} Δ is an improvement"
                           for k, low in LOWER_IS_BETTER.items() if k in keys)
    return ["", "## Results by arm", "",
            "Means are over each arm's completed seeds (seeds = completed/planned); ± is the sample "
            "standard deviation (n − 1) and 95% CI the Student-t confidence interval of the mean. Δ is the arm "
            "minus the baseline seed by seed, averaged over the seeds both completed, with its 95% interval and "
            "the relative change; \"better\" or \"worse\" only when the interval excludes 0, else \"not "
            f"significant\" ({directions or 'no known direction for this metric'}). An arm of another model or "
            "target sparsity is compared with the arm that has the baseline's settings there, named after \"vs\". "
            "Inference speedup: the dense model's forward latency over that of what the pruning bought (the "
            "smaller model, or the 2:4 kernels on CUDA), at batch 1 and at the training batch, as `make "
            "bench-inference` measured it on the device named (mean over the measured runs); a pruned model "
            "with no faster form runs the dense kernels, 1.00× by construction; — where no run was measured.",
            "", *_table(header, [_arm_row(matrix, a, mixed, audit) for a in matrix.arms])]


def _statistics_section(matrix: Matrix, audit: Audit) -> list[str]:
    rows = []
    for arm in matrix.arms:
        base = baseline_for(matrix, arm)
        if base is None or base is arm or arm.quality_key != base.quality_key:
            continue
        if not arm.complete_runs or not base.complete_runs:
            continue
        key = arm.quality_key
        p = paired_with_baseline(arm, base)
        d = p.difference
        unpaired = [f"{', '.join(map(str, seeds))} only in {who}" for seeds, who in
                    ((p.only_arm, "the arm"), (p.only_base, "the baseline")) if seeds]
        note = verdict(d, LOWER_IS_BETTER.get(key or ""))
        confounded = _confounded(audit, base, arm)
        if confounded:
            note += f"; confounded: differs in {confounded}"
        rows.append([f"`{arm.id}`", f"`{base.id}`", str(len(p.seeds)),
                     "—" if d is None else format_quality(d.mean, key, signed=True),
                     "—" if d is None or not d.has_interval else format_quality(d.std, key),
                     format_interval(d, key, signed=True), note, "; ".join(unpaired) or "none"])
    if not rows:
        return []
    return ["", "## Paired differences against the baseline", "",
            "Seeds share their data order and initialisation, so each seed's arm − baseline difference removes "
            "the spread the two share. Mean, standard deviation and Student-t 95% interval of those differences; "
            "\"not significant\" when the interval contains 0. Seeds that completed on one side only are left "
            "out of the pairing and named.", "",
            *_table(["arm", "baseline", "paired seeds", "Δ mean", "Δ std", "95% CI", "verdict", "seeds not paired"],
                    rows)]


def _comparison_line(matrix: Matrix, c: Comparison) -> str:
    intended = ", ".join(c.axes) or "none"
    why = {"baseline": "against the baseline", "one axis": "one axis apart",
           "same arm": "the same arm in two matrices"}.get(c.reason, c.reason)
    return f"- `{c.a}` vs `{c.b}` ({why}; intended axis: {intended}): {c.verdict}"


def _audit_section(matrix: Matrix, audit: Audit) -> list[str]:
    fair = [c for c in audit.comparisons if c.fair]
    skipped = [c for c in audit.comparisons if c.skipped]
    lines = ["", "## Fairness audit", "",
             "Compared arms must differ only in their intended axis. Each pair's completed runs are compared on "
             "their effective settings and on what they really ran: schedule (with update frequency and adaptive "
             "warp), iterations, the optimizer as built (class, base and every hyper-parameter, SPAM's "
             "included), seeds, dataset and model size. A pair that differs in more than one axis is confounded: "
             "its difference in quality belongs to no single axis.", "",
             f"{len(audit.comparisons)} comparisons: {len(fair)} fair, {len(audit.unfair)} with differences "
             f"or confounded, {len(skipped)} not audited."]
    if audit.unfair:
        lines += ["", "### Differences besides the intended axis", ""]
        for c in audit.unfair:
            lines.append(_comparison_line(matrix, c))
            lines += [f"  - {d}" for d in c.differences]
            if c.confounded:
                lines += [f"  - what the axes changed in the runs: {d}" for d in c.intended]
    if audit.inconsistencies:
        lines += ["", "### Seeds of one arm that ran differently", ""]
        lines += [f"- `{i.arm}`: {i}" for i in audit.inconsistencies]
    if fair:
        lines += ["", "### Fair comparisons", ""]
        lines += [_comparison_line(matrix, c).replace(": fair", ": no differences besides the intended axis")
                  for c in fair]
    if skipped:
        lines += ["", "### Not audited", ""] + [_comparison_line(matrix, c) for c in skipped]
    if not audit.comparisons:
        lines += ["", "No two arms are compared: the matrix has one arm per model."]
    return lines


def _plots_section(matrix: Matrix, plots: dict[str, Path]) -> list[str]:
    lines = ["", "## Plots"]
    for name, path in plots.items():
        title = PLOT_TITLES.get(name, name)
        rel = Path(os.path.relpath(path, matrix.path)).as_posix()
        lines += ["", f"### {title}", "", f"![{title}]({rel})"]
    if "quality_vs_speed.png" not in plots:
        lines += ["", NO_SPEED_PLOT]
    return lines


def render_report(matrix: Matrix, audit: Audit, plots: dict[str, Path]) -> str:
    """report.md's text; `plots` maps a file name to the written PNG."""
    lines = (_header(matrix) + _incomplete_section(matrix) + _damaged_section(matrix) + _dropped_section(matrix) + _results_section(matrix, audit)
             + _statistics_section(matrix, audit) + _audit_section(matrix, audit) + _plots_section(matrix, plots))
    return "\n".join(lines) + "\n"


def write_report(matrix: Matrix, audit: Audit, plots: dict[str, Path]) -> Path:
    path = matrix.path / "report.md"
    write_text_atomic(path, render_report(matrix, audit, plots))
    return path
