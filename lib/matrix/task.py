"""One task of a Slurm matrix array: run (or continue) one planned run.

    python -m lib.matrix.task MATRIX_DIR INDEX    # INDEX: the run's position in plan.json

The generated sbatch script ends in this (exec, so it is the batch step's
main process). The trainer's output goes to logs/<run id>.log, appended
across restarts. A complete run is not run again; a run with a checkpoint
continues from it (lib.matrix.runner.run_command), bit-identical on CPUs.

Signals: when Slurm kills the task (scancel, scontrol requeue, preemption,
the time limit) it signals every process of the task, the trainer included,
which then checkpoints after the step in progress; this process only waits
for it. The time-limit warning (sbatch --signal=B:USR1@N) reaches this
process alone: it asks the trainer to stop (SIGTERM, which the trainer
handles), waits for the checkpoint, and requeues the task, so the next
start continues where this one stopped.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from lib.errors import KpruneError
from lib.matrix.runner import REPO_ROOT, load_plan, run_dir_of, run_status, start_command


class _Signals:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.warned = False
        signal.signal(signal.SIGUSR1, self._warning)
        # Slurm's SIGTERM reaches the trainer itself; this process must outlive it so the
        # checkpoint is written before the step ends (a dead batch shell ends the job).
        signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def _warning(self, signum, frame) -> None:
        if not self.warned and self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
        self.warned = True

    def started(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        if self.warned:  # the warning came while the trainer was starting
            proc.send_signal(signal.SIGTERM)


def _threads() -> int:
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))


def run_task(matrix_dir: Path, index: int) -> int:
    plan = load_plan(matrix_dir)
    if not 0 <= index < len(plan.runs):
        raise KpruneError(f"task {index}: the plan in {matrix_dir} has runs 0..{len(plan.runs) - 1}")
    run = plan.runs[index]
    run_dir = run_dir_of(matrix_dir, run.id)
    if run_status(run_dir) == "complete":
        print(f"{run.id} is complete: nothing to do", flush=True)
        return 0
    signals = _Signals()
    argv = start_command(matrix_dir, run, _threads())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    log_path = Path(matrix_dir) / "logs" / f"{run.id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{os.environ.get('SLURM_ARRAY_TASK_ID', index)}"
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} Slurm task {job} on "
                  f"{os.uname().nodename}, start {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1}: "
                  f"{shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        signals.started(proc)
        code = proc.wait()
    state = run_status(run_dir)
    print(f"{run.id}: {state} (exit status {code})", flush=True)
    if signals.warned and state == "interrupted":
        job_id = os.environ["SLURM_JOB_ID"]
        print(f"time limit near: requeueing job {job_id} to continue from the checkpoint", flush=True)
        subprocess.run(["scontrol", "requeue", job_id], check=False)
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m lib.matrix.task MATRIX_DIR INDEX", file=sys.stderr)
        return 2
    try:
        return run_task(Path(args[0]), int(args[1]))
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
