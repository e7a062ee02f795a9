"""make check-gpu: run every check of lib/gpu_checks.py on CUDA device 0; without CUDA, say so and exit 0."""

from __future__ import annotations

import os
import sys

import torch

from lib.gpu_checks import CHECKS, run_checks


def main() -> int:
    if not torch.cuda.is_available():
        print(f"check-gpu: no CUDA GPU here (torch {torch.__version__} sees none); no check was run")
        return 0
    # Before any CUDA work creates cuBLAS's handle: the checkpoint check runs with DETERMINISTIC=y.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return run_checks(CHECKS, torch.device("cuda", 0))


if __name__ == "__main__":
    sys.exit(main())
