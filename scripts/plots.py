"""`make plots`: plots, report.md and a fairness audit for a test-matrix directory.

    python -m scripts.plots [--results DIR] [--output-root DIR]

Without --results, the newest matrix-*/ directory (by the UTC stamp in its
name, then modification time) under the output root is used: --output-root,
else OUTPUT_DIR from ./.config (where `make test-matrix` writes), else
results/. Writes <dir>/plots/*.png (quality_vs_speed.png only when `make
bench-inference` measured some run; a note says so otherwise) and
<dir>/report.md, prints their paths (the last line is `report: <path>`), a
`warning:` line on stderr for each results file it could not read in full,
and exits with status 2 and a message on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.cli import make_variable
from lib.errors import KpruneError
from lib.kconfig import settings_from_kconfig
from lib.report.build import Report, build_report
from lib.report.plots import SPEED_PLOT
from lib.report.runs import newest_matrix_dir
from scripts.kconfig import DOT_CONFIG, load_dot_config

DEFAULT_ROOT = "results"


def results_root(output_root: str | None) -> Path:
    """Where matrices are looked for: the flag, else .config's OUTPUT_DIR as the matrix runner uses it."""
    if output_root:
        return Path(output_root)
    if DOT_CONFIG.exists():
        return Path(settings_from_kconfig(load_dot_config(None)).output_dir or DEFAULT_ROOT)
    return Path(DEFAULT_ROOT)


def print_report(report: Report) -> None:
    """What `make plots` and `make compare` print after writing a report."""
    for problem in report.matrix.problems:
        print(f"warning: {problem}", file=sys.stderr)
    for path in report.plots.values():
        print(f"plot: {path}")
    if SPEED_PLOT not in report.plots:
        print("note: no quality-vs-speed plot: no run was measured (make bench-inference RESULTS=<matrix dir>)")
    unfair = len(report.audit.unfair)
    print(f"audit: {len(report.audit.comparisons)} comparisons, {unfair} with differences besides the intended "
          "axis or confounded")
    print(f"report: {report.report}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=make_variable("RESULTS"),
                        help="the matrix directory (default: the newest under the output root)")
    parser.add_argument("--output-root", default=None,
                        help="where matrix directories are looked for (default: OUTPUT_DIR from .config)")
    args = parser.parse_args(argv)
    try:
        matrix_dir = Path(args.results) if args.results else newest_matrix_dir(results_root(args.output_root))
        print(f"matrix: {matrix_dir}", flush=True)
        report = build_report(matrix_dir)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
