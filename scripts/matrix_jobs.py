"""`make matrix-status` and `make matrix-cancel`: a test matrix's runs, and stopping them on Slurm.

    python -m scripts.matrix_jobs status [--results DIR]
    python -m scripts.matrix_jobs cancel [--results DIR]

Without --results, the newest matrix directory under .config's OUTPUT_DIR
(results/ without a .config). `status` prints one line per run: its state
(from Slurm while queued or running, from its directory otherwise) and its
Slurm task, then a count per state. `cancel` scancels every task still
queued or running; a cancelled run checkpoints, and `make test-matrix`
submits it again to continue.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from lib.cli import make_variable
from lib.errors import KpruneError
from lib.kconfig import read_config, settings_from_kconfig
from lib.matrix import slurm
from lib.matrix.runner import load_plan
from lib.report.runs import newest_matrix_dir
from scripts.kconfig import DOT_CONFIG


def _matrix_dir(results: str | None) -> Path:
    if results:
        return Path(results)
    root = Path(settings_from_kconfig(read_config(DOT_CONFIG)[0]).output_dir) if DOT_CONFIG.exists() else Path("results")
    return newest_matrix_dir(root)


def cmd_status(matrix_dir: Path) -> int:
    plan = load_plan(matrix_dir)
    rows = slurm.run_states(matrix_dir, plan)
    width = max(len(r["run"]) for r in rows)
    print(f"matrix {matrix_dir}: {len(rows)} runs")
    for r in rows:
        print(f"  {r['run']:<{width}}  {r['state']:<13} {r['slurm']}".rstrip())
    counts = Counter(r["state"] for r in rows)
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


def cmd_cancel(matrix_dir: Path) -> int:
    load_plan(matrix_dir)  # a matrix directory, or a clear error
    tasks = slurm.cancel(matrix_dir)
    if not tasks:
        print(f"matrix {matrix_dir}: nothing queued or running")
        return 0
    print(f"cancelled {len(tasks)} Slurm tasks: {' '.join(tasks)}")
    print(f"runs stopped mid-way keep their checkpoint; make test-matrix RESULTS={matrix_dir} submits them again")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.matrix_jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("status", "cancel"))
    parser.add_argument("--results", default=make_variable("RESULTS"), help="the matrix directory (make's RESULTS=)")
    args = parser.parse_args(argv)
    try:
        matrix_dir = _matrix_dir(args.results or None)
        return cmd_status(matrix_dir) if args.command == "status" else cmd_cancel(matrix_dir)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
