"""The results contract: one directory per run, written so a crash never lies.

A run directory holds `config` (the .config it ran with), `command`,
`metrics.jsonl` (one JSON object per logged step, appended and flushed line
by line) and `summary.json`. summary.json is replaced atomically (temp file +
rename) and says `running` until the run ends as `complete`, `diverged`,
`interrupted` or `failed`; a killed run never leaves one that claims success.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from lib.errors import KpruneError


_UMASK = os.umask(0)
os.umask(_UMASK)
MAX_NAME_BYTES = 255  # one path component on every common file system


class WriteError(KpruneError, OSError):
    """A result file could not be written (a full disk, a read-only directory); the old one is intact.

    Still an OSError, so callers that already turn write failures into their own message keep doing so.
    """


def make_shareable(fd: int) -> None:
    """Give a temp file the mode an ordinary file gets (mkstemp makes 0600; results are for sharing)."""
    os.fchmod(fd, 0o666 & ~_UMASK)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename: readers see old or new, never half.

    An OSError (ENOSPC, EACCES...) becomes one WriteError line; `path` keeps what it held.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        make_shareable(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    fsync_dir(path.parent)


def write_error(path: Path, exc: OSError) -> WriteError:
    """The one line a failed write of `path` ends with."""
    reason = exc.strerror or str(exc)
    fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix that"
    return WriteError(f"cannot write {path}: {reason}; it still holds what it held before: {fix} and run again")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def check_run_name(name: str) -> str | None:
    """Why `name` cannot name a run directory (one path component inside OUTPUT_DIR), or None."""
    if name in (".", ".."):
        return f"'{name}' is not a directory name of its own; give the run a name such as my-run"
    if "/" in name or "\0" in name:
        return f"{name!r} must be one directory name inside OUTPUT_DIR, without '/' (or NUL)"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is {len(name.encode('utf-8', 'surrogateescape'))} bytes long; at most {MAX_NAME_BYTES} fit a file name"
    return None


def create_run_dir(output_dir: Path, name: str) -> Path:
    """A new, unique directory `<output_dir>/<UTC time>-<name>`."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise KpruneError(f"OUTPUT_DIR {output_dir} is not a directory; set OUTPUT_DIR to one") from None
    except OSError as exc:
        raise KpruneError(f"cannot create OUTPUT_DIR {output_dir}: {exc.strerror}") from None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for attempt in range(1000):
        suffix = "" if attempt == 0 else f"-{attempt}"
        path = output_dir / f"{stamp}-{name}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run directory in {output_dir}")


def read_json(path: Path, fix: str) -> dict:
    """A JSON object kprune wrote; a damaged file is one KpruneError naming it and `fix` (what to do)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KpruneError(f"{path} cannot be read ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise KpruneError(f"{path} is not a JSON object; {fix}")
    return data


def run_status(run_dir: Path) -> str:
    """summary.json's status: `running` (or killed), `complete`, ...; `pending` when there is none,
    `unreadable` when the file is damaged."""
    try:
        status = read_json(Path(run_dir) / "summary.json", "").get("status", "failed")
    except FileNotFoundError:
        return "pending"
    except KpruneError:
        return "unreadable"
    return status if isinstance(status, str) else "unreadable"


class MetricsLog:
    """metrics.jsonl, one complete line per row, flushed as written.

    Each sink (e.g. the run's experiment trackers) is then called with the
    row exactly as the file holds it, so every consumer sees the same rows.
    """

    def __init__(self, path: Path, sinks: Iterable[Callable[[dict], None]] = ()):
        self.path = Path(path)
        self.sinks = list(sinks)
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        self._failed = False

    def write(self, row: dict) -> None:
        row = _clean(row)
        try:
            self._f.write(json.dumps(row, sort_keys=True) + "\n")
            self._f.flush()
        except OSError as exc:  # a full disk: a partial last line is skipped by read_metrics
            self._failed = True
            raise write_error(self.path, exc) from exc
        for sink in self.sinks:
            sink(row)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as exc:
            if not self._failed:  # after a failed write, closing retries the same bytes: already reported
                raise write_error(self.path, exc) from exc


def read_metrics_lines(path: Path) -> tuple[list[dict], list[int]]:
    """metrics.jsonl's rows, and the numbers of the lines that are not UTF-8 JSON objects.

    The last piece of a file without its newline is a partial line a killed run left: skipped, not counted.
    """
    lines = Path(path).read_bytes().split(b"\n")
    rows, bad = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif number < len(lines):
            bad.append(number)
    return rows, bad


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a partial last line (a killed run) and damaged lines are skipped."""
    return read_metrics_lines(path)[0]
