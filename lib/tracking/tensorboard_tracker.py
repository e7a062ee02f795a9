"""TensorBoard: one event file per run; numbers as scalars, the config and summary as text."""

from __future__ import annotations

import json
from pathlib import Path

from lib.tracking.fanout import numeric_items


def _code(text: str) -> str:
    """Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = None

    def start(self, config: dict, run_name: str, group: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        settings = {k: v for k, v in config.items() if k != "kconfig"}
        self.writer.add_text("kconfig", _code(config.get("kconfig", "")), 0)
        self.writer.add_text("settings", _code(json.dumps(settings, indent=2, sort_keys=True)), 0)

    def log(self, row: dict, step: int) -> None:
        for key, value in numeric_items(row).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict) -> None:
        step = int(summary.get("iterations") or 0)
        final = {k: v for k, v in summary.items() if k != "settings"}  # the settings are already there as text
        self.writer.add_text("summary", _code(json.dumps(final, indent=2, sort_keys=True, default=str)), step)
        self.writer.close()
