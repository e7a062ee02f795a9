"""A tracker never fails a run, and a selected tracker that is not installed is a clear error up front."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lenet5.train import main as lenet5_main
from lib.errors import ConfigError
from lib.kconfig import kconfig_defaults, load_kconfig, read_config, settings_from_kconfig
from lib.results import read_metrics
from lib.settings import validate
from lib.tracking import Trackers
from lib.tracking.tensorboard_tracker import TensorBoardTracker
from tests.lib.tracking.readers import assert_tensorboard_holds, tensorboard_scalars

QUICK = ["--max-iters", "8", "--batch-size", "32", "--eval-interval", "4", "--log-interval", "1",
         "--lr-warmup-iters", "1", "--threads", "1"]
ROWS = [{"step": 0, "val_loss": 2.5, "achieved_sparsity": 0.0}] + [
    {"step": s, "loss": 2.0 / s, "lr": 1e-3, "mask_update": s % 2 == 0} for s in range(1, 7)]


def _broken_after(tracker, calls: int):
    """Make `tracker.log` raise from its `calls`+1-th call on, as a full disk or a dead service would."""
    real, seen = tracker.log, []

    def log(row, step):
        seen.append(step)
        if len(seen) > calls:
            raise OSError(28, "No space left on device")
        real(row, step)
    tracker.log = log
    return seen


def test_a_tracker_that_raises_is_switched_off_once_and_the_others_get_every_row(tmp_path, capsys):
    bad, good = TensorBoardTracker(tmp_path / "bad"), TensorBoardTracker(tmp_path / "good")
    calls = _broken_after(bad, 2)
    trackers = Trackers([bad, good])
    trackers.start({"kconfig": "CONFIG_SEED=1\n", "seed": 1}, "run", None)
    for row in ROWS:
        trackers.log_row(row)
    trackers.finish({"status": "complete", "iterations": 6})
    assert len(calls) == 3  # never called again after it failed
    warnings = [l for l in capsys.readouterr().err.splitlines() if "tracker" in l]
    assert warnings == ["warning: tracker tensorboard failed in log (OSError: [Errno 28] No space left on device); "
                        "it is off for the rest of this run, which goes on"]
    assert_tensorboard_holds(tensorboard_scalars(tmp_path / "good"), ROWS)
    assert len(tensorboard_scalars(tmp_path / "bad").Scalars("loss")) == 1  # rows 0 and 1 only


@pytest.mark.slow  # starts a process or trains: over a second
def test_a_tracker_raising_mid_run_does_not_fail_the_run(tmp_path, capsys, monkeypatch):
    real_start = TensorBoardTracker.start

    def start_then_break(self, config, run_name, group):
        real_start(self, config, run_name, group)
        _broken_after(self, 3)
    monkeypatch.setattr(TensorBoardTracker, "start", start_then_break)
    assert lenet5_main([*QUICK, "--output-dir", str(tmp_path), "--track-tensorboard"]) == 0
    out, err = capsys.readouterr()
    run_dir = Path(out.strip().splitlines()[-1].removeprefix("results: "))
    summary = (run_dir / "summary.json").read_text()
    assert '"status": "complete"' in summary
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # every row still logged
    assert err.count("warning: tracker tensorboard failed in log (OSError") == 1
    assert_tensorboard_holds(tensorboard_scalars(run_dir / "tensorboard"), rows[:3])  # what came before


@pytest.mark.parametrize("symbol, flag, module", [("TRACK_WANDB", "--track-wandb", "wandb"),
                                                  ("TRACK_TRACKIO", "--track-trackio", "trackio"),
                                                  ("TRACK_TENSORBOARD", "--track-tensorboard", "tensorboard")])
def test_selecting_a_tracker_that_is_not_installed_stops_before_training(tmp_path, capsys, monkeypatch,
                                                                        symbol, flag, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as it does when the package is absent
    with pytest.raises(SystemExit) as info:
        lenet5_main([*QUICK, "--output-dir", str(tmp_path / "results"), flag])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"CONFIG_{symbol}: {module} is not installed" in err  # the message make gives for .config
    assert "make install-trackers (or pip install -r requirements-trackers.txt)" in err
    assert not (tmp_path / "results").exists()  # nothing started, nothing to clean up

    config = tmp_path / "defconfig"
    config.write_text(f"CONFIG_MODEL_LENET5=y\nCONFIG_{symbol}=y\n")
    with pytest.raises(ConfigError, match=f"{config}:2: CONFIG_{symbol}: {module} is not installed"):
        read_config(config)


def test_trackers_are_off_by_default_and_offline_or_local_when_on(tmp_path):
    defaults = kconfig_defaults(load_kconfig(), "gpt2")
    assert (defaults["track_wandb"], defaults["track_trackio"], defaults["track_tensorboard"]) == (False,) * 3
    config = tmp_path / "defconfig"
    config.write_text("CONFIG_TRACK_WANDB=y\nCONFIG_TRACK_TRACKIO=y\nCONFIG_TRACK_TENSORBOARD=y\n")
    s = settings_from_kconfig(read_config(config)[0])
    assert (s.track_wandb_mode, s.track_trackio_space, s.track_tensorboard_dir) == ("offline", "", "")
    assert (s.track_project, s.track_group, s.track_wandb_entity) == ("kprune", "", "")


def test_a_trackio_space_from_the_environment_is_not_used_silently(tmp_path, monkeypatch):
    config = tmp_path / "defconfig"
    config.write_text("CONFIG_TRACK_TRACKIO=y\n")
    monkeypatch.delenv("TRACKIO_SERVER_URL", raising=False)
    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/their-space")
    with pytest.raises(ConfigError, match="CONFIG_TRACK_TRACKIO_SPACE: is empty .local only. but TRACKIO_SPACE_ID "
                                          "is set in the environment"):
        read_config(config)
    config.write_text('CONFIG_TRACK_TRACKIO=y\nCONFIG_TRACK_TRACKIO_SPACE="someone/their-space"\n')
    assert validate(settings_from_kconfig(read_config(config)[0])) == []  # asked for by name: fine
