"""`make test-matrix`: expand the matrix .config describes and run it.

    python -m scripts.matrix [--set "SYM=value ..."] [--jobs N] [--results DIR]

With --results DIR (make's RESULTS=), that matrix is resumed as planned. Without
it, the plan is built from .config; if the newest matrix directory with the
same plan still has runs to do, it is resumed, otherwise a new one is made.
Runs already complete are skipped. Exit status 0 when every run completed.

With MATRIX_EXECUTOR=slurm the runs are not run here: one Slurm job array is
submitted with a task per run that is neither complete nor queued nor
running (lib/matrix/slurm.py), the job id and the matrix directory are
printed, and the exit status is 0 once Slurm accepted it. Slurm is asked
first (sbatch --test-only), so a job it would refuse writes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from lib.cli import make_variable
from lib.errors import KpruneError
from lib.kconfig import settings_from_kconfig
from lib.matrix import slurm
from lib.matrix.plan import Plan, build_plan, plan_table
from lib.matrix.runner import Runner, create_matrix_dir, find_unfinished, load_plan
from lib.matrix.slurm_options import executor, slurm_options
from scripts.kconfig import DOT_CONFIG, load_dot_config


def prepare(set_text: str | None, results: str | None) -> tuple[Path, Plan, object | None, bool]:
    """(matrix dir, plan, .config or None, whether the dir is still to be created)."""
    kconf = load_dot_config(set_text) if not results or DOT_CONFIG.exists() else None
    if results:
        matrix_dir = Path(results)
        return matrix_dir, load_plan(matrix_dir), kconf, False
    root = Path(settings_from_kconfig(kconf).output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = kconf.syms["MATRIX_NAME"].str_value or "matrix"
    matrix_dir = root / f"matrix-{name}-{stamp}"  # the runs write below it: one stamp for both
    plan = build_plan(kconf, matrix_dir / "runs")
    if not plan.runs:
        reasons = "; ".join(d["reason"] for d in plan.dropped) or "no axis values"
        raise KpruneError(f"the matrix has no valid combination ({reasons})")
    unfinished = find_unfinished(root, plan.plan_hash)
    if unfinished is not None:
        print(f"resuming {unfinished}: same plan, unfinished", flush=True)
        return unfinished, load_plan(unfinished), kconf, False
    return matrix_dir, plan, kconf, True


def _new_matrix_dir(matrix_dir: Path, plan: Plan) -> Path:
    create_matrix_dir(matrix_dir, plan)
    print(plan_table(plan), flush=True)
    return matrix_dir


def submit_to_slurm(matrix_dir: Path, plan: Plan, kconf, new: bool) -> int:
    opts = slurm_options(kconf)
    slurm.check(opts)  # a partition Slurm does not know, say, is an error before anything is written
    if new:
        _new_matrix_dir(matrix_dir, plan)
    try:
        record = slurm.submit(matrix_dir, plan, opts, Path.cwd())
    except KpruneError:
        if new:
            shutil.rmtree(matrix_dir)
        raise
    if record is None:
        print("nothing to submit: every run is complete, queued or running")
    else:
        print(f"submitted job {record['job_id']}: {len(record['tasks'])} of {len(plan.runs)} runs, "
              f"{record['sbatch'][2]} ({matrix_dir / 'slurm' / 'jobs.json'})")
    print(f"follow: make matrix-status RESULTS={matrix_dir}; stop: make matrix-cancel RESULTS={matrix_dir}; "
          f"when done: make plots RESULTS={matrix_dir}")
    print(f"results: {matrix_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default=make_variable("SET"), help="overrides (make's SET=)")
    parser.add_argument("--jobs", default=make_variable("JOBS", "1"), help="runs at once (make's JOBS=)")
    parser.add_argument("--results", default=make_variable("RESULTS"),
                        help="a matrix directory to resume (make's RESULTS=)")
    args = parser.parse_args(argv)
    try:
        jobs = int(args.jobs or 1)
        if jobs < 1:
            raise ValueError
    except ValueError:
        print(f"error: JOBS={args.jobs} is not a positive whole number", file=sys.stderr)
        return 2
    # Ctrl-C or SIGTERM stop the matrix (explicitly: a shell may have started us with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        matrix_dir, plan, kconf, new = prepare(args.set, args.results or None)
        if kconf is not None and executor(kconf) == "slurm":
            if jobs != 1:
                print("note: JOBS is for the local executor; SLURM_MAX_RUNNING limits runs at once on Slurm")
            return submit_to_slurm(matrix_dir, plan, kconf, new)
        if not new and slurm.load_jobs(matrix_dir):
            on_slurm = slurm.queued_tasks(matrix_dir)
            if on_slurm:  # running them here too would make two processes write one run
                raise KpruneError(f"{len(on_slurm)} runs of {matrix_dir} are queued or running on Slurm: wait "
                                  "(make matrix-status), cancel them (make matrix-cancel) or keep "
                                  "MATRIX_EXECUTOR=slurm")
        if new:
            _new_matrix_dir(matrix_dir, plan)
        status = Runner(matrix_dir, plan, jobs=jobs).run()
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("test matrix interrupted: finished runs are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    bad = {k: v for k, v in status.items() if v["status"] != "complete"}
    not_complete = ", ".join(f"{k} ({v['status']})" for k, v in bad.items())
    print(f"{len(status) - len(bad)} of {len(plan.runs)} runs complete" +
          (f"; not complete: {not_complete}" if bad else ""))
    print(f"plots and report: make plots RESULTS={matrix_dir}")
    print(f"results: {matrix_dir}", flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
