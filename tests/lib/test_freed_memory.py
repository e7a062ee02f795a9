"""lib/device.py's glibc controls: freed memory stays resident (every CPU run), and release_free_memory gives
it back (what bench-pruning's memory figures need before an update can show what it allocates)."""

from __future__ import annotations

import json
import subprocess
import sys

from lib.kconfig import REPO_ROOT

PROBE = """
import json, torch
from lib.device import keep_freed_memory, release_free_memory

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

kept = keep_freed_memory()
big = torch.ones(1 << 27)  # 512 MiB, written
small = torch.ones(1 << 10)  # allocated after it: the heap cannot shrink past it from the top
before = rss()
del big
freed = rss()
released = release_free_memory()
print(json.dumps({"kept": kept, "released": released, "held_after_free": freed - before + (1 << 29),
                  "after_release": rss() - before + (1 << 29)}))
"""


def test_freed_memory_stays_resident_until_released():
    # A fresh process: the settings are the process's, and the suite's own heap would blur the figures.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["kept"] and got["released"]
    mib = 1 << 20
    assert got["held_after_free"] >= 500 * mib  # freeing 512 MiB gave (almost) nothing back
    assert got["after_release"] <= 64 * mib  # released: the 512 MiB left the resident set
