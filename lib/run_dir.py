"""Run directories: named, claimed and locked so that no run ever overwrites or deletes another.

A run writes into `<OUTPUT_DIR>/<RUN_NAME>` or a new time-stamped directory.
RUN_NAME is one directory name, never a path; a directory that holds anything
is refused (kprune never deletes a directory), and the process that trains in
a directory holds an flock on its `.lock` file for the run's lifetime, so a
second run or a resume of the same directory is refused while it lasts.
"""

from __future__ import annotations

import fcntl
import os
import shlex
from pathlib import Path

from lib.errors import KpruneError
from lib.kconfig import kconfig_from_settings, write_config
from lib.results import check_run_name, create_run_dir, run_status, write_error, write_text_atomic
from lib.settings import Settings

LOCK_NAME = ".lock"  # held by the process that runs in a run directory, for its lifetime


class RunLock:
    """An exclusive lock on a run directory (flock on its .lock file), held until released or exit.

    Only one process trains in a run directory; a second one, or a resume of a run still
    going, is refused instead of overwriting the first one's files.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        path = self.run_dir / LOCK_NAME
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise KpruneError(f"cannot lock {self.run_dir} ({path}: {exc.strerror}); "
                              "kprune needs to write in a run directory") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise KpruneError(f"another process is running in {self.run_dir} (it holds {path}); "
                              "wait for it to end, or choose another RUN_NAME") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def claim_run_dir(output_dir: Path, name: str) -> tuple[Path, RunLock]:
    """`<output_dir>/<name>`, created (or empty) and locked for this process.

    kprune never deletes a run directory: one that holds anything is refused with
    what to do instead (resume it, or remove it yourself to start over).
    """
    problem = check_run_name(name)
    if problem:
        raise KpruneError(f"RUN_NAME {problem}")
    output_dir = Path(output_dir)
    path = output_dir / name
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.mkdir(exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise KpruneError(f"{path} is not a directory (OUTPUT_DIR={output_dir}, RUN_NAME={name}); "
                          "set OUTPUT_DIR to a directory, or choose another RUN_NAME") from None
    except OSError as exc:
        raise KpruneError(f"cannot create {path}: {exc.strerror}; set OUTPUT_DIR to a directory "
                          "you can write") from None
    lock = RunLock(path)
    held = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
    if held:
        lock.release()
        raise KpruneError(_taken_message(path, held))
    return path, lock


def _taken_message(path: Path, held: list[str]) -> str:
    status = run_status(path)
    if status == "complete":
        return f"{path} already holds a complete run; choose another RUN_NAME (kprune never deletes a run)"
    if status in ("interrupted", "running") and (path / "checkpoint.json").exists():
        what = f"holds an {status} run with a checkpoint: continue it with make resume RESUME={shlex.quote(str(path))}"
    elif status == "unreadable":
        what = "holds a run whose summary.json is damaged"
    elif status == "pending":
        what = f"is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
    else:
        what = f"holds a {status} run"
    return (f"{path} {what}; kprune does not delete run directories: to start over, remove it yourself "
            f"(rm -r {shlex.quote(str(path))}) or choose another RUN_NAME")


def set_aside(run_dir: Path, into: Path) -> Path | None:
    """Move an unfinished run directory into `into` (kept, not deleted) so its name can be run again.

    Refused while another process runs in it. Returns where it went, or None if there was nothing.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    lock = RunLock(run_dir)
    try:
        Path(into).mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10000):
            dest = Path(into) / f"{run_dir.name}-{attempt}"
            if not dest.exists():
                os.rename(run_dir, dest)
                return dest
        raise KpruneError(f"{into} holds too many earlier attempts of {run_dir.name}; clean it up")
    finally:
        lock.release()


def open_run_dir(s: Settings, task, command: list[str], main: bool) -> tuple[Path | None, RunLock | None]:
    """The run directory, locked by rank 0: the one being resumed, or a new one with config and command."""
    if s.resume_from:
        run_dir = Path(s.resume_from)
        if not run_dir.is_dir():
            raise KpruneError(f"RESUME_FROM {run_dir} is not a run directory")
        return run_dir, RunLock(run_dir) if main else None
    if not main:
        return None, None
    if s.run_name:
        run_dir, lock = claim_run_dir(Path(s.output_dir), s.run_name)
    else:
        run_dir = create_run_dir(Path(s.output_dir), default_run_name(s, task))
        lock = RunLock(run_dir)
    try:
        write_config(kconfig_from_settings(s), run_dir / "config")
    except OSError as exc:  # kconfiglib writes the file itself: a full disk ends here
        raise write_error(run_dir / "config", exc) from exc
    write_text_atomic(run_dir / "command", shlex.join(command) + "\n")
    return run_dir, lock


def resume_hint(run_dir: Path | None) -> str:
    """How to continue: only a checkpoint that exists and matches its hash is offered."""
    from lib import checkpoint  # torch: only a trainer needs it, not the matrix runner or make resume

    step = checkpoint.verify(run_dir) if run_dir is not None else None
    if step is None:
        return "no checkpoint was written, so it cannot be resumed: start the run again in a new directory"
    return f"continue from its checkpoint (step {step}) with make resume RESUME={shlex.quote(str(run_dir))}"


def default_run_name(s: Settings, task) -> str:
    method = s.pruning_method if s.pruning_method != "state" else s.state_variant
    return f"{task.name}-{method}-s{s.seed}"


def newest_interrupted(output_dir: Path) -> Path | None:
    """The run directory in `output_dir` most recently interrupted with a checkpoint, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [d for d in output_dir.iterdir()
             if d.is_dir() and run_status(d) == "interrupted" and (d / "checkpoint.json").is_file()]
    return max(found, key=lambda d: (d / "summary.json").stat().st_mtime_ns, default=None)
