"""trackio: trackio's local SQLite store ($TRACKIO_DIR) unless a Hugging Face Space is named."""

from __future__ import annotations

from lib.tracking.fanout import numeric_items


class TrackioTracker:
    name = "trackio"

    def __init__(self, project: str, space: str):
        self.project, self.space = project, space
        self.run = None

    def start(self, config: dict, run_name: str, group: str | None) -> None:
        import trackio

        # No CPU/GPU sampling threads: the run's own rows are what is logged.
        self.run = trackio.init(project=self.project, name=run_name, group=group, space_id=self.space or None,
                                config=config, auto_log_cpu=False, auto_log_gpu=False, embed=False)

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def finish(self, summary: dict) -> None:
        import trackio

        # trackio has no run summary: its numbers go in one last row, as summary/<key>, at the final step.
        final = {k: v for k, v in summary.items() if k != "settings"}  # the settings are the run's config
        self.run.log(numeric_items(final, "summary/"), step=int(summary.get("iterations") or 0))
        trackio.finish()
