"""The results contract: one directory per run, written so a crash never lies.

A run directory holds `config` (the .config it ran with), `command`,
`metrics.jsonl` (one JSON object per logged step, appended and flushed line
by line) and `summary.json`. summary.json is replaced atomically (temp file +
rename) and says `running` until the run ends as `complete`, `diverged`,
`interrupted` or `failed`; a killed run never leaves one that claims success.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from lib.errors import KpruneError


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


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


def create_run_dir(output_dir: Path, name: str) -> Path:
    """A new, unique directory `<output_dir>/<UTC time>-<name>`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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


def claim_run_dir(output_dir: Path, name: str) -> Path:
    """`<output_dir>/<name>`, created; an unfinished run already there is replaced.

    A directory whose summary.json says `complete` is never overwritten.
    """
    path = Path(output_dir) / name
    summary = path / "summary.json"
    if path.exists():
        if summary.exists() and json.loads(summary.read_text(encoding="utf-8")).get("status") == "complete":
            raise KpruneError(f"{path} already holds a complete run; choose another RUN_NAME or remove it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


class MetricsLog:
    """metrics.jsonl, one complete line per row, flushed as written.

    Each sink (e.g. the run's experiment trackers) is then called with the
    row exactly as the file holds it, so every consumer sees the same rows.
    """

    def __init__(self, path: Path, sinks: Iterable[Callable[[dict], None]] = ()):
        self.path = Path(path)
        self.sinks = list(sinks)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        row = _clean(row)
        self._f.write(json.dumps(row, sort_keys=True) + "\n")
        self._f.flush()
        for sink in self.sinks:
            sink(row)

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a partial last line (a killed run) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
