"""A trainer whose global batch splits exactly across ranks, for tests/test_distributed.py.

The real trainers give every rank its own random stream, so two ranks of 8
never see what one process of 16 sees. Here every rank draws the same global
batch of 16 and keeps its own slice: under torchrun with two processes, DDP's
averaged gradient must then equal the single process's full-batch gradient,
up to float rounding. Run as `python -m tests.split_batch_trainer <lenet5
flags>` (alone or under torchrun); each rank writes its final weights to
`weights-rank<r>.pt` in the run's output directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lib import distributed
from lib.classification import evaluate
from lib.cli import trainer_main
from lib.settings import Settings
from lib.train_loop import Task

GLOBAL_BATCH = 16
FEATURES, CLASSES = 12, 4
_built: dict[str, nn.Module] = {}


def build_task(s: Settings, device: torch.device) -> Task:
    rank, world = distributed.world()
    per_rank = GLOBAL_BATCH // world
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES))  # seeded alike on every rank
    _built["model"] = model
    data = torch.Generator().manual_seed(s.seed + 1)
    held_out = torch.Generator().manual_seed(s.seed + 2)
    val_x, val_y = torch.randn(64, FEATURES, generator=held_out), torch.randint(0, CLASSES, (64,), generator=held_out)

    def next_batch():
        x = torch.randn(GLOBAL_BATCH, FEATURES, generator=data)
        y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=data)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        return x[mine].to(device), y[mine].to(device)

    return Task(name="split-batch", model=model, prunable=[(n, p) for n, p in model.named_parameters()
                                                            if n.endswith(".weight")],
                group_of=lambda n: n.split(".")[0], next_batch=next_batch,
                loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                evaluate=lambda m: evaluate(m, val_x, val_y, 16, device),  # 4 batches: 2 per rank under DDP
                items_per_step=per_rank,
                item_unit="samples", quality_key="val_accuracy")


def main(argv: list[str]) -> int:
    code = trainer_main("lenet5", build_task, argv, prog="python -m tests.split_batch_trainer", description=__doc__)
    output_dir = Path(argv[argv.index("--output-dir") + 1])
    rank, _ = distributed.world()
    torch.save({k: v.detach().clone() for k, v in _built["model"].state_dict().items()},
               output_dir / f"weights-rank{rank}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
