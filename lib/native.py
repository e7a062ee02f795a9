"""kprune's small C kernels: compiled once per machine with the system's C compiler, loaded with ctypes.

A kernel is one self-contained C file (no torch headers, so it builds in
about a second). It is compiled with `CC` (default `cc`) into kprune's cache
directory (`$XDG_CACHE_HOME/kprune`, else `~/.cache/kprune`) under a name
keyed by its source, the flags, the compiler and this CPU's features, and
loaded from there by every later process. No fast-math and no FMA
contraction: every float operation rounds as written, so a kernel can be
checked bit for bit against the same arithmetic in torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]


class BuildError(Exception):
    """The C compiler is missing or refused the source (the message says which)."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kprune"


def _machine_key(source: Path, cc: str, flags: list[str]) -> str:
    """What the built library depends on: source, flags, compiler, and this CPU (-march=native)."""
    h = hashlib.sha256(source.read_bytes())
    h.update(" ".join([cc, *flags, platform.machine()]).encode())
    h.update(subprocess.run([cc, "--version"], capture_output=True, check=True).stdout)
    try:
        with open("/proc/cpuinfo") as f:  # a cache shared by unlike nodes (a cluster's home) keeps one per CPU kind
            h.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def build(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """`source` compiled (or found in the cache) and loaded. `extra_flags` follow CFLAGS: the tests build
    the versions a kernel keeps for other CPUs with them (e.g. -mno-avx512f)."""
    cc = os.environ.get("CC") or "cc"
    flags = [*CFLAGS, *extra_flags]
    try:
        target = cache_dir() / f"{source.stem}-{_machine_key(source, cc, flags)}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built under a temporary name and renamed: processes starting together never load half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, check=True,
                               text=True)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or "").strip().splitlines() if isinstance(exc.stderr, str) else []
        raise BuildError(lines[-1] if lines else f"{cc} exited with status {exc.returncode}") from None
    except OSError as exc:
        raise BuildError(f"{cc}: {exc.strerror or exc}") from None
