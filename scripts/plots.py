"""`make plots`: plots, report.md and a fairness audit for a test-matrix directory.

    python -m scripts.plots [--results DIR] [--output-root results]

Without --results, the newest results/matrix-*/ directory (by the UTC stamp
in its name, then modification time) is used. Writes <dir>/plots/*.png and
<dir>/report.md, prints their paths (the last line is `report: <path>`), and
exits with status 2 and a message on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.cli import make_variable
from lib.errors import KpruneError
from lib.report.build import build_report
from lib.report.runs import newest_matrix_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=make_variable("RESULTS"),
                        help="the matrix directory (default: the newest under --output-root)")
    parser.add_argument("--output-root", default="results", help="where matrix directories are looked for")
    args = parser.parse_args(argv)
    try:
        matrix_dir = Path(args.results) if args.results else newest_matrix_dir(Path(args.output_root))
        print(f"matrix: {matrix_dir}", flush=True)
        report = build_report(matrix_dir)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in report.plots.values():
        print(f"plot: {path}")
    unfair = len(report.audit.unfair)
    print(f"audit: {len(report.audit.comparisons)} comparisons, {unfair} with differences besides the intended axis")
    print(f"report: {report.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
