"""Which GPU each matrix job runs on: only the GPUs this process was given.

A job scheduler or the user hands the runner its GPUs in CUDA_VISIBLE_DEVICES:
indices ("2,3"), UUIDs ("GPU-8f1c..."), or MIG instances ("MIG-..."). A child
process sees only what its own CUDA_VISIBLE_DEVICES lists, so each job gets
one entry of the parent's list, as written, never an index of its own making
(index 0 of the child is not GPU 0 of the machine). With more jobs at once
than GPUs, jobs share GPUs and slow each other down: `sharing_note` says so.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping


def _device_count() -> int:
    import torch

    return torch.cuda.device_count()


def visible_gpus(environ: Mapping[str, str] = os.environ,
                 device_count: Callable[[], int] = _device_count) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(device_count())]
    gpus = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):  # CUDA ignores everything from an invalid entry (or -1) on
            break
        gpus.append(entry)
    return gpus


def gpu_for(slot: int, gpus: list[str]) -> str | None:
    """The CUDA_VISIBLE_DEVICES value of the job running in `slot` (None without GPUs)."""
    return gpus[slot % len(gpus)] if gpus else None


def sharing_note(jobs: int, gpus: list[str]) -> str | None:
    """A warning when `jobs` at once must share the GPUs, else None."""
    if not gpus or jobs <= len(gpus):
        return None
    per_gpu = -(-jobs // len(gpus))
    return (f"JOBS={jobs} runs at once share {len(gpus)} GPU(s), up to {per_gpu} per GPU: their speeds "
            f"(tokens/s, step time) are not comparable; set JOBS={len(gpus)} for one run per GPU")
