"""`make compare`: one report over the arms of two or more matrices, with the same statistics and audit.

    python -m scripts.compare DIR DIR [...] [--output DIR] [--output-root DIR]
    make compare RESULTS="<matrix dir> <matrix dir>"

Without DIR arguments the directories are read from the make variable RESULTS
(which the Makefile hands over as KPRUNE_RESULTS; split like a shell would,
so a quoted path may hold spaces). The report and plots go to a new
directory, --output or <output root>/compare-<UTC stamp>/ (the output root
as for `make plots`: OUTPUT_DIR from .config, else results/); the matrix
directories are only read. The first matrix's baseline arm is the baseline.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from lib.cli import make_variable
from lib.errors import KpruneError
from lib.report.build import report_for
from lib.report.compare import combine_matrices
from scripts.plots import print_report, results_root


def _dirs(args: list[str]) -> list[Path]:
    if args:
        return [Path(a) for a in args]
    try:
        return [Path(a) for a in shlex.split(make_variable("RESULTS", ""))]
    except ValueError as exc:
        raise KpruneError(f"RESULTS: {exc}; quote each directory whole, e.g. RESULTS=\"'a dir' other\"") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", help="matrix directories (default: $RESULTS)")
    parser.add_argument("--output", default=None, help="the new directory for report.md and plots/")
    parser.add_argument("--output-root", default=None,
                        help="where compare-<stamp>/ is made (default: OUTPUT_DIR from .config, else results)")
    args = parser.parse_args(argv)
    try:
        dirs = _dirs(args.dirs)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out_dir = Path(args.output) if args.output else results_root(args.output_root) / f"compare-{stamp}"
        if out_dir.exists():
            raise KpruneError(f"{out_dir} already exists; name a new directory with --output")
        for d in dirs:
            print(f"matrix: {d}", flush=True)
        report = report_for(combine_matrices(dirs, out_dir))
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
