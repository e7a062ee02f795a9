"""Running a plan: each run in its own process, several at once, resumable.

A matrix directory holds plan.json (and plan.md), runs/<run id>/ (each run's
results contract, written by the trainer), logs/<run id>.log (its output) and
status.json (what the runner saw). A run whose summary.json says `complete`
is never run again; a run stopped with a checkpoint (`interrupted`, or
killed while `running` after a periodic checkpoint) continues from it, and
any other run is started afresh (its old directory is kept under attempts/),
so a matrix killed half-way and started again finishes only what was left.
Slurm array tasks (lib/matrix/task.py) start their runs with the same
`start_command`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lib import results
from lib.errors import KpruneError
from lib.matrix.gpus import gpu_for, sharing_note, visible_gpus
from lib.matrix.plan import Plan, plan_table
from lib.results import write_json_atomic, write_text_atomic
from lib.run_dir import set_aside
from lib.tracking import ENV_GROUP

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def run_status(run_dir: Path) -> str:
    """`complete`, `diverged`, `interrupted`, `failed`, `running` (or killed), or `pending`."""
    status = results.run_status(run_dir)
    return "failed" if status == "unreadable" else status  # a damaged summary.json: the run is done again


def create_matrix_dir(path: Path, plan: Plan) -> Path:
    """Create `path` (the directory the plan's runs write below) with plan.json and plan.md."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    plan.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(path / "plan.json", plan.to_json())
    write_text_atomic(path / "plan.md", plan_table(plan))
    return path


def load_plan(matrix_dir: Path) -> Plan:
    path = Path(matrix_dir) / "plan.json"
    if not path.exists():
        raise KpruneError(f"{matrix_dir} is not a test-matrix directory (no plan.json)")
    return Plan.from_json(json.loads(path.read_text(encoding="utf-8")))


def find_unfinished(results: Path, plan_hash: str) -> Path | None:
    """The newest matrix directory with this plan that still has runs to do."""
    candidates = sorted(Path(results).glob("matrix-*/plan.json"), key=lambda p: p.parent.name, reverse=True)
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if data.get("plan_hash") != plan_hash:
            continue
        plan = Plan.from_json(data)
        if any(run_status(run_dir_of(path.parent, r.id)) != "complete" for r in plan.runs):
            return path.parent
    return None


def run_dir_of(matrix_dir: Path, run_id: str) -> Path:
    return Path(matrix_dir) / "runs" / run_id


def resumable(run_dir: Path) -> bool:
    """A run that stopped (or was killed) after writing a checkpoint: it continues from there."""
    return run_status(run_dir) in ("interrupted", "running") and (run_dir / "checkpoint.json").exists()


def run_command(run, run_dir: Path, threads: int) -> list[str]:
    """The trainer command of a planned run: its flags with `threads`, resumed when it can be."""
    argv = _with_flag(run.argv, "--threads", str(threads))
    if resumable(run_dir):
        argv = _with_flag(argv, "--resume-from", str(run_dir))
    return [sys.executable, "-m", f"{run.model}.train", *argv]


def start_command(matrix_dir: Path, run, threads: int) -> list[str]:
    """run_command for a run about to start: one with a checkpoint continues from it; any other
    unfinished run's directory is set aside under attempts/ (kept, never deleted), so it starts afresh."""
    run_dir = run_dir_of(matrix_dir, run.id)
    if not resumable(run_dir):
        set_aside(run_dir, Path(matrix_dir) / "attempts")
    return run_command(run, run_dir, threads)


def _with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


class Runner:
    def __init__(self, matrix_dir: Path, plan: Plan, jobs: int = 1, cpu_count: int | None = None,
                 gpus: list[str] | None = None):
        self.matrix_dir, self.plan = Path(matrix_dir), plan
        self.jobs = max(1, jobs)
        cpus = cpu_count or os.cpu_count() or 1
        self.threads = max(1, cpus // self.jobs)
        self.gpus = visible_gpus() if gpus is None else gpus  # CUDA_VISIBLE_DEVICES entries
        self.gpu_sharing = sharing_note(self.jobs, self.gpus)
        self.lock = threading.Lock()
        self.status: dict[str, dict] = {}
        self.children: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self) -> dict[str, dict]:
        """Run every unfinished run; returns {run id: {status, ...}}."""
        todo = []
        for r in self.plan.runs:
            state = run_status(run_dir_of(self.matrix_dir, r.id))
            if state == "complete":
                self.status[r.id] = {"status": "complete", "skipped": True}
            else:
                todo.append(r)
        done = len(self.plan.runs) - len(todo)
        print(f"test matrix {self.matrix_dir}: {len(self.plan.runs)} runs, {done} already complete, "
              f"{len(todo)} to run, {self.jobs} at a time with {self.threads} threads each", flush=True)
        if self.gpu_sharing:
            print(f"warning: {self.gpu_sharing}", flush=True)
        self._save()
        slots = list(range(self.jobs))
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(self._run_one, r, slots) for r in todo]
            try:
                for f in futures:
                    f.result()
            except KeyboardInterrupt:
                self._stop_all()
                raise
        return self.status

    def _run_one(self, run, slots: list[int]) -> None:
        if self.stopping:
            return
        with self.lock:
            slot = slots.pop()
        try:
            env = dict(os.environ)
            # Runs start where the runner was started (paths in the plan are relative to it).
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
            env[ENV_GROUP] = self.matrix_dir.name  # trackers group a matrix's runs (TRACK_GROUP overrides)
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpu_for(slot, self.gpus)
            argv = start_command(self.matrix_dir, run, self.threads)
            log_path = self.matrix_dir / "logs" / f"{run.id}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            start = time.monotonic()
            with open(log_path, "w", encoding="utf-8") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                with self.lock:
                    self.children.add(proc)
                code = proc.wait()
                with self.lock:
                    self.children.discard(proc)
            state = run_status(run_dir_of(self.matrix_dir, run.id))
            record = {"status": state if state not in ("pending", "running") else "failed", "exit_code": code,
                      "seconds": round(time.monotonic() - start, 1), "log": str(log_path.relative_to(self.matrix_dir))}
            if record["status"] != "complete":
                record["error"] = _last_error(log_path, code)
            with self.lock:
                self.status[run.id] = record
                n_done = len(self.status)
                self._save()
            tail = "" if record["status"] == "complete" else f": {record['error']}"
            print(f"[{n_done}/{len(self.plan.runs)}] {run.id}: {record['status']} "
                  f"({record['seconds']:.0f} s){tail}", flush=True)
        finally:
            with self.lock:
                slots.append(slot)

    def _save(self) -> None:
        extra = {"gpu_sharing": self.gpu_sharing} if self.gpu_sharing else {}
        write_json_atomic(self.matrix_dir / "status.json", {"runs": self.status, **extra})

    def _stop_all(self) -> None:
        self.stopping = True
        with self.lock:
            for proc in self.children:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # trainers record `interrupted` and exit
                except ProcessLookupError:
                    pass


def _last_error(log_path: Path, code: int) -> str:
    lines = [l.strip() for l in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        if line.startswith(("error:", "run ", "Traceback")) or "Error" in line:
            return line[:300]
    return f"exit status {code}" + (f"; last output: {lines[-1][:200]}" if lines else "")
