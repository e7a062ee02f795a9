"""Which trackers a run's settings select, whether they can run, and starting them."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from lib.tracking.fanout import Trackers

# The test-matrix runner puts the matrix directory's name here, so a matrix's runs share a group.
ENV_GROUP = "KPRUNE_TRACK_GROUP"
INSTALL = "make install-trackers (or pip install -r requirements-trackers.txt)"

# settings field, Kconfig symbol, the package it needs
_SELECTED = (("track_wandb", "TRACK_WANDB", "wandb"),
             ("track_trackio", "TRACK_TRACKIO", "trackio"),
             ("track_tensorboard", "TRACK_TENSORBOARD", "tensorboard"))


def tracker_problems(s) -> list[tuple[str, str]]:
    """(symbol, problem) for each selected tracker that cannot run as configured."""
    problems = []
    for field, symbol, package in _SELECTED:
        if not getattr(s, field):
            continue
        try:
            importlib.import_module(package)
        except ImportError as exc:
            problems.append((symbol, f"{package} is not installed ({exc}); install the optional trackers "
                                     f"with {INSTALL}"))
    if s.track_trackio and not s.track_trackio_space:
        for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
            if os.environ.get(var):
                problems.append(("TRACK_TRACKIO_SPACE", f"is empty (local only) but {var} is set in the environment, "
                                 f"which would make trackio send the run there; unset {var}, or name the "
                                 "Space in TRACK_TRACKIO_SPACE"))
    return problems


def start_trackers(s, run_dir: Path) -> Trackers | None:
    """Start the trackers `s` selects for the run in `run_dir` (its config already written); None if none."""
    from lib.tracking.tensorboard_tracker import TensorBoardTracker
    from lib.tracking.trackio_tracker import TrackioTracker
    from lib.tracking.wandb_tracker import WandbTracker

    run_dir = Path(run_dir)
    group = s.track_group or os.environ.get(ENV_GROUP) or None
    chosen = []
    if s.track_wandb:
        chosen.append(WandbTracker(s.track_project, s.track_wandb_entity, s.track_wandb_mode, run_dir))
    if s.track_trackio:
        chosen.append(TrackioTracker(s.track_project, s.track_trackio_space))
    if s.track_tensorboard:
        if s.track_tensorboard_dir:
            log_dir = Path(s.track_tensorboard_dir, *([group] if group else []), run_dir.name)
        else:
            log_dir = run_dir / "tensorboard"
        chosen.append(TensorBoardTracker(log_dir))
    if not chosen:
        return None
    trackers = Trackers(chosen)
    config = {**s.as_dict(), "kconfig": (run_dir / "config").read_text(encoding="utf-8")}
    trackers.start(config, run_dir.name, group)
    return trackers
