"""report.md: header counts, one row per arm with mean ± std and delta, incomplete runs, audit, images."""

from __future__ import annotations

import re
import statistics

from lib.report.audit import audit_matrix
from lib.report.build import build_report
from lib.report.markdown import render_report
from lib.report.runs import load_matrix

MAG = "gpt2-adamwprune-magnitude-sp0.5-cubic-ramp"
BIT = "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp"
ADAMW = "gpt2-adamw-magnitude-sp0.5-cubic-ramp"


def _text(builder) -> str:
    """report.md's text without drawing the plots (the tests that need the images build them)."""
    matrix = load_matrix(builder.write())
    return render_report(matrix, audit_matrix(matrix), {})


def _rows(text: str) -> dict[str, list[str]]:
    """The results table: arm id -> its cells."""
    section = text.split("## Results by arm", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_one_row_per_arm_with_mean_std_interval_and_paired_delta(ab_builder):
    text = _text(ab_builder)
    rows = _rows(text)
    assert list(rows) == [MAG, BIT, ADAMW]
    base = ab_builder.complete_qualities(MAG)
    assert len(base) == 3  # the diverged seed is not in the mean
    for arm, row in rows.items():
        values = ab_builder.complete_qualities(arm)
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert row[6] == f"{mean:.2f} ± {std:.2f}"
    # Worked by hand. Baseline 52.0, 52.6, 51.7: mean 52.1, std sqrt(0.42 / 2) = 0.458258,
    # half-width t(0.975, 2) * 0.458258 / sqrt(3) = 4.302653 * 0.264575 = 1.138374.
    assert rows[MAG][7] == "[50.96, 53.24]" and rows[MAG][8] == "baseline"
    # bitter7 - baseline per seed: -4.8, -6.0, -4.2: mean -5.0, std sqrt(1.68 / 2) = 0.916515,
    # half-width 4.302653 * 0.529150 = 2.276744; -5.0 / 52.1 = -9.6%; the interval excludes 0 and ppl falls.
    assert rows[BIT][8] == "-5.00 [-7.28, -2.72] (-9.6%, better)"
    # adamw - baseline: 1.1, 0.4, 1.2: mean 0.9, std sqrt(0.38 / 2) = 0.435890, half-width 1.082806: spans 0.
    assert rows[ADAMW][8] == "+0.90 [-0.18, +1.98] (+1.7%, not significant)"
    assert rows[MAG][1:6] == ["magnitude", "adamwprune", "0.5", "cubic-ramp", "3/4"]
    assert rows[BIT][5] == "3/4" and rows[ADAMW][5] == "3/3"
    assert rows[BIT][9] == "0.5000" and rows[BIT][12] == "200"
    assert rows[BIT][10].endswith("tokens/s") and re.fullmatch(r"\d+\.\d\d", rows[BIT][11])
    assert "val_ppl: lower is better, so a negative Δ is an improvement" in text
    paired = text.split("## Paired differences against the baseline", 1)[1].split("\n## ", 1)[0]
    assert f"| `{BIT}` | `{MAG}` | 3 | -5.00 | 0.92 | [-7.28, -2.72] | better | none |" in paired
    assert f"| `{ADAMW}` | `{MAG}` | 3 | +0.90 | 0.44 | [-0.18, +1.98] | not significant | none |" in paired


def test_a_difference_the_seeds_share_is_found_by_pairing(builder):
    """Seeds far apart, arm better on every seed by 0.3: the means' spreads overlap, the pairs do not."""
    for seed, level in ((1, 40.0), (2, 50.0), (3, 60.0)):
        builder.add(method="magnitude", seed=seed, quality=level)
        builder.add(method="bitter7", seed=seed, quality=level - 0.3 + 0.01 * seed)
    rows = _rows(_text(builder))
    assert rows[MAG][7] == "[25.16, 74.84]"  # 50 ± 4.302653 * 10 / sqrt(3)
    # differences -0.29, -0.28, -0.27: mean -0.28, std 0.01, half-width 4.302653 * 0.01 / sqrt(3) = 0.0248
    assert rows[BIT][8] == "-0.28 [-0.30, -0.26] (-0.6%, better)"


def test_unmatched_seeds_are_left_out_of_the_pairing_and_named(builder):
    for seed, q in ((1, 50.0), (2, 51.0), (3, 52.0)):
        builder.add(method="magnitude", seed=seed, quality=q)
    for seed, q in ((2, 51.5), (3, 52.1), (4, 40.0)):
        builder.add(method="bitter7", seed=seed, quality=q)
    text = _text(builder)
    # Pairs on seeds 2 and 3 only: +0.5, +0.1: mean +0.3, std 0.282843, half-width 12.706205 * 0.2 = 2.541241.
    assert _rows(text)[BIT][8] == "+0.30 [-2.24, +2.84] (+0.6%, not significant)"
    paired = text.split("## Paired differences against the baseline", 1)[1].split("\n## ", 1)[0]
    assert f"| `{BIT}` | `{MAG}` | 2 | +0.30 | 0.28 | [-2.24, +2.84] | not significant | " \
           "4 only in the arm; 1 only in the baseline |" in paired


def test_header_lists_counts_failures_and_dropped(ab_builder):
    text = _text(ab_builder)
    assert "# Test matrix report: ab" in text
    assert "- Runs: 9 of 11 complete; not complete: 1 diverged, 1 no summary.json" in text
    assert "- Models: gpt2 (gpt2-tiny)" in text
    incomplete = text.split("## Runs not complete", 1)[1].split("\n## ", 1)[0]
    assert f"| `{MAG}-seed1340` | diverged | loss became nan at step 57; lower LR or enable GRAD_CLIP |" in incomplete
    assert f"| `{BIT}-seed1340` | no summary.json | RuntimeError: CUDA out of memory |" in incomplete
    dropped = text.split("## Dropped combinations", 1)[1].split("\n## ", 1)[0]
    assert ("| model=gpt2, optimizer=adamw, method=bitter7, target_sparsity=0.5, schedule=cubic-ramp "
            "| state pruning needs OPTIMIZER=adamwprune |") in dropped


def test_audit_section_and_images(ab_builder):
    report = build_report(ab_builder.write())
    text = report.report.read_text()
    audit = text.split("## Fairness audit", 1)[1].split("\n## ", 1)[0]
    assert "2 comparisons: 2 fair, 0 with differences or confounded, 0 not audited." in audit
    assert f"- `{MAG}` vs `{BIT}` (against the baseline; intended axis: method): " \
           "no differences besides the intended axis" in audit
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    assert links == [f"plots/{n}" for n in ("loss.png", "validation.png", "sparsity.png", "quality_vs_sparsity.png",
                                             "memory.png", "throughput.png")]
    assert all((report.matrix.path / link).is_file() for link in links)


def test_unfair_pair_is_listed(builder):
    for seed in (1, 2):
        builder.add(method="magnitude", seed=seed)
        builder.add(method="bitter7", seed=seed, settings={"schedule_frequency": 5, "max_iters": 300})
    text = _text(builder)
    assert "1 comparisons: 0 fair, 1 with differences or confounded" in text
    assert "(against the baseline; intended axis: method): 2 differences" in text
    assert "  - schedule.frequency: 20 vs 5 (setting schedule_frequency: 20 vs 5)" in text
    assert "  - iterations: 200 vs 300 (setting max_iters: 200 vs 300)" in text


def test_accuracy_sign_convention_and_one_seed(builder):
    builder.add(model="lenet5", method="magnitude", seed=1, quality=0.98)
    builder.add(model="lenet5", method="bitter7", seed=1, quality=0.985)
    builder.add(model="lenet5", method="movement", seed=1, quality=0.97)
    text = _text(builder)
    rows = _rows(text)
    prefix = "lenet5-adamwprune-"
    assert rows[prefix + "magnitude-sp0.5-cubic-ramp"][6] == "0.9800"  # one seed: no spread to show
    assert rows[prefix + "magnitude-sp0.5-cubic-ramp"][7] == "one seed: no interval, run more seeds"
    assert rows[prefix + "bitter7-sp0.5-cubic-ramp"][8] == "+0.0050 (+0.5%, one seed: no interval, run more seeds)"
    assert rows[prefix + "movement-sp0.5-cubic-ramp"][8] == "-0.0100 (-1.0%, one seed: no interval, run more seeds)"
    assert "val_accuracy: higher is better, so a positive Δ is an improvement" in text
    assert rows[prefix + "bitter7-sp0.5-cubic-ramp"][10].endswith("samples/s")


def test_accuracy_direction_of_the_verdict(builder):
    for seed, q in ((1, 0.980), (2, 0.982), (3, 0.981)):
        builder.add(model="lenet5", method="magnitude", seed=seed, quality=q)
        builder.add(model="lenet5", method="bitter7", seed=seed, quality=q + 0.004 + 0.0001 * seed)
        builder.add(model="lenet5", method="movement", seed=seed, quality=q - 0.004 - 0.0001 * seed)
    rows = _rows(_text(builder))
    prefix = "lenet5-adamwprune-"
    assert rows[prefix + "bitter7-sp0.5-cubic-ramp"][8].endswith(", better)")  # higher accuracy on every seed
    assert rows[prefix + "movement-sp0.5-cubic-ramp"][8].endswith(", worse)")


def test_other_model_and_sparsity_use_the_baseline_settings_there(builder):
    for model, quality in (("gpt2", 50.0), ("lenet5", 0.98)):
        for sparsity, shift in ((0.5, 0.0), (0.7, 1.0)):
            for method, better in (("magnitude", 0.0), ("bitter7", 0.001)):
                builder.add(model=model, method=method, target_sparsity=sparsity, seed=1,
                            quality=quality + shift / 100 + better)
    rows = _rows(_text(builder))
    assert rows["gpt2-adamwprune-magnitude-sp0.5-cubic-ramp"][8] == "baseline"
    assert rows["gpt2-adamwprune-magnitude-sp0.7-cubic-ramp"][8] == "baseline at gpt2 sp0.7"
    assert rows["gpt2-adamwprune-bitter7-sp0.7-cubic-ramp"][8].endswith("vs gpt2 magnitude sp0.7")
    assert rows["lenet5-adamwprune-bitter7-sp0.5-cubic-ramp"][8] == \
        "+0.0010 (+0.1%, one seed: no interval, run more seeds) vs lenet5 magnitude sp0.5"  # against lenet5's own


def test_arm_without_completed_run_has_a_row(builder):
    builder.add(method="magnitude", seed=1)
    builder.add(method="bitter7", seed=1, status="interrupted", error="stopped by SIGTERM")
    text = _text(builder)
    row = _rows(text)[BIT]
    assert row[5] == "0/1" and row[6] == "—" and row[7] == "—" and row[8] == "—"
    assert f"| `{BIT}-seed1` | interrupted | stopped by SIGTERM |" in text


def test_confounded_baseline_pair_is_said_in_the_table_and_the_audit(builder):
    for seed, q in ((1, 50.0), (2, 51.0)):
        builder.add(optimizer="adamwspam", method="magnitude", seed=seed, quality=q)
        builder.add(optimizer="adamwprune", method="bitter7", seed=seed, quality=q - 2.0)
    text = _text(builder)
    spam, bit = "gpt2-adamwspam-magnitude-sp0.5-cubic-ramp", "gpt2-adamwprune-bitter7-sp0.5-cubic-ramp"
    assert _rows(text)[bit][8].endswith("; confounded: differs in optimizer, method")
    audit = text.split("## Fairness audit", 1)[1].split("\n## ", 1)[0]
    assert "1 comparisons: 0 fair, 1 with differences or confounded, 0 not audited." in audit
    assert f"- `{spam}` vs `{bit}` (against the baseline; intended axis: optimizer, method): " \
           "confounded: differs in 2 axes (optimizer, method)" in audit
    assert "  - what the axes changed in the runs: optimizer.class: AdamWSPAM vs AdamW" in audit
    assert "Fair comparisons" not in audit
