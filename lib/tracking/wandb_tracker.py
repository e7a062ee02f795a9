"""Weights & Biases: offline by default, the run written under <run dir>/wandb/."""

from __future__ import annotations

import os
from pathlib import Path


class WandbTracker:
    name = "wandb"

    def __init__(self, project: str, entity: str, mode: str, run_dir: Path):
        self.project, self.entity, self.mode, self.run_dir = project, entity, mode, Path(run_dir)
        self.run = None

    def start(self, config: dict, run_name: str, group: str | None) -> None:
        import wandb

        if self.mode == "offline":
            # W&B's own crash reports are network calls too; offline means none unless the user set this.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        # No console capture, system-metrics sampling, code or requirements upload: the rows are the record.
        quiet = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, x_save_requirements=False,
                               disable_git=True, save_code=False, silent=True)
        self.run = wandb.init(project=self.project, entity=self.entity or None, group=group, name=run_name,
                              dir=str(self.run_dir), mode=self.mode, config=config, settings=quiet)

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary.get("status") == "complete" else 1)
