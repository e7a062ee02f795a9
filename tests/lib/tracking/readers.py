"""Reading back what each tracker wrote, with that package's own reader, and running
things where the trackers can only write below tmp_path (offline / local only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lib.kconfig import REPO_ROOT


def offline_env(tmp_path: Path) -> dict:
    """An environment in which the trackers can only write below tmp_path."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HOME": str(home), "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp_path / "wandb-dir"), "TRACKIO_DIR": str(tmp_path / "trackio"),
            "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "WANDB_ERROR_REPORTING": "false",
            # any connection attempt fails at once instead of reaching out
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=offline_env(tmp_path), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def wandb_records(tmp_path: Path, run_dir: Path) -> list[dict]:
    """The records of the run's offline .wandb transaction log, decoded by W&B's own inspector."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    out = cli(tmp_path, "-m", "wandb", "leet", "inspect", str(offline), "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def trackio_store(tmp_path: Path, project: str, run: str) -> dict:
    """The run as trackio's local store holds it, read with trackio's SQLiteStorage (in a process
    of its own: trackio fixes its store directory, TRACKIO_DIR, when it is imported)."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; p, r = sys.argv[1:]; "
            "print(json.dumps({'runs': S.get_runs(p), 'config': S.get_run_config(p, r), "
            "'logs': S.get_logs(p, r)}, default=str))")
    return json.loads(cli(tmp_path, "-c", code, project, run).stdout)


def tensorboard_scalars(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tensorboard_text(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def assert_tensorboard_holds(acc: EventAccumulator, rows: list[dict]) -> None:
    """Every number of every row is a scalar at the row's step (TensorBoard keeps float32)."""
    keys = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert keys <= set(acc.Tags()["scalars"])
    for key in keys:
        want = [(r["step"], float(np.float32(r[key]))) for r in rows if isinstance(r.get(key), (int, float))]
        assert [(e.step, e.value) for e in acc.Scalars(key)] == want, key
