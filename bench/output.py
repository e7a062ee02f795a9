"""How every benchmark reports: one JSON object per line, with the machine facts it ran on."""

from __future__ import annotations

import json

import torch


def emit(result: dict) -> None:
    """Print `result` as one JSON line, followed by the CPU threads used and the torch version."""
    print(json.dumps({**result, "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
