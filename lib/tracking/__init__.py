"""Experiment trackers: W&B, trackio and TensorBoard, fed from the metrics log.

Each tracker is one small class with `start(config, run_name, group)`,
`log(row, step)` and `finish(summary)`. `Trackers` fans one run out to the
selected ones: every row MetricsLog writes to metrics.jsonl goes to each of
them as it is written, and a tracker that raises is switched off with one
line on stderr instead of failing the run. None of the packages is required:
`make install-trackers` installs them, and selecting one that is missing is
a configuration error.
"""

from lib.tracking.build import ENV_GROUP, start_trackers, tracker_problems
from lib.tracking.fanout import Trackers

__all__ = ["ENV_GROUP", "Trackers", "start_trackers", "tracker_problems"]
