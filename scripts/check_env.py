"""Check that an existing Python has what kprune needs (make ... VENV= uses it instead of .venv).

A GPU node often brings its own Python with a CUDA build of torch (a cluster
module, a container) and no package index. With VENV= the make targets run
PYTHON as it is; this check runs first and names every missing package with
the pip command that installs it. A version other than the pinned one is
reported but accepted: the node's CUDA torch build is the point of using it.

Usage: python -m scripts.check_env [--tests] [requirements file ...]  (default: requirements.txt)
pytest and its plugins are needed only to run the tests: checked with --tests.
"""

from __future__ import annotations

import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def pins(path: Path) -> list[tuple[str, str]]:
    """(name, version) of each `name==version` line of a requirements file."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if match:
            out.append((match.group(1), match.group(2)))
    return out


def check(required: list[tuple[str, str]], installed=metadata.version) -> tuple[list[str], list[str]]:
    """(missing requirement specs, notes on versions that differ from the pins)."""
    missing, notes = [], []
    for name, version in required:
        try:
            have = installed(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name}=={version}")
            continue
        if have.split("+")[0] != version:
            notes.append(f"{name} {have} (requirements pin {version})")
    return missing, notes


def main(argv: list[str]) -> int:
    tests = "--tests" in argv
    files = [Path(a) for a in argv if a != "--tests"] or [REPO_ROOT / "requirements.txt"]
    required = [(n, v) for f in files for n, v in pins(f) if tests or not n.startswith("pytest")]
    missing, notes = check(required)
    python = shlex.quote(sys.executable)
    if notes:
        print(f"note: {python} has other versions than the pins: {', '.join(notes)}", file=sys.stderr)
    if missing:
        print(f"error: {python} lacks {', '.join(m.split('==')[0] for m in missing)}: install with\n"
              f"  {python} -m pip install {' '.join(shlex.quote(m) for m in missing)}\n"
              f"or drop VENV= to let make create .venv", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
