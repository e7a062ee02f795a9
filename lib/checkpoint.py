"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is `checkpoint.pt` in the run directory (model, optimizer with
its SPAM and Adam state, pruning masks and method buffers, schedule position,
data position, every RNG state, the settings and .config) and
`checkpoint.json` beside it (step, sha256 of the .pt). Both are written
atomically, the .pt first, so the .json always describes a complete file.
Loading checks the hash and that the run asking is the same run: same model,
same settings (apart from where it writes and how many threads it uses).

`save_run` and `resume_run` are what the training loop calls: they gather
and restore the model, optimizer, pruner, data position, RNG and `Progress`.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib import distributed
from lib.errors import KpruneError
from lib.results import (read_json, read_metrics_lines, run_status, write_bytes_atomic, write_json_atomic,
                         write_text_atomic)

FORMAT = 1
# Settings that may differ between the interrupted run and its resumption.
MAY_DIFFER = frozenset({"output_dir", "run_name", "resume_from", "threads", "checkpoint_interval", "data_workers"})


@dataclass
class Progress:
    """Where the loop is: what a checkpoint restores besides the tensors, and what the summary reports."""

    step: int = 0
    train_time_s: float = 0.0
    last_eval: dict = field(default_factory=dict)
    last_loss: float = float("nan")
    items_per_step: int = 0  # per optimizer step: micro-batch items x accumulation steps
    data_state: dict | None = None  # the data position after the last batch consumed (with prefetching)
    compile_step_s: float = 0.0  # first steps under COMPILE (mostly compiling; one per process), out of throughput
    compile_steps: int = 0


def rng_state() -> dict:
    """This process's RNG states; on CUDA, only its own device's (each rank saves its own)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        if isinstance(cuda, list):  # older checkpoints hold every visible device's state
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def own_rng_state(saved: dict | list, rank: int) -> dict:
    """This rank's entry of a checkpoint's RNG states (one per rank, in rank order)."""
    return saved[rank] if isinstance(saved, list) else saved  # a dict: written before per-rank states


def save(run_dir: Path, payload: dict) -> Path:
    """Write checkpoint.pt and checkpoint.json atomically; returns the .pt path."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    data = buffer.getvalue()
    path = Path(run_dir) / "checkpoint.pt"
    write_bytes_atomic(path, data)
    write_json_atomic(Path(run_dir) / "checkpoint.json", {
        "format": FORMAT, "step": payload["step"], "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data), "model": payload["model_name"]})
    return path


_DAMAGED = ("the checkpoint of {run_dir} is damaged and cannot be resumed: start the run again "
            "in a new directory (another RUN_NAME)")


def verify(run_dir: Path) -> int | None:
    """The step of `run_dir`'s checkpoint if checkpoint.pt and checkpoint.json exist and match, else None."""
    meta_path, path = Path(run_dir) / "checkpoint.json", Path(run_dir) / "checkpoint.pt"
    try:
        meta = read_json(meta_path, "")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    except (OSError, KpruneError):
        return None
    step = meta.get("step")
    return step if digest.hexdigest() == meta.get("sha256") and isinstance(step, int) else None


def load(run_dir: Path, model_name: str, settings: dict) -> dict:
    """The checkpoint of `run_dir`, verified; KpruneError says why one cannot be used."""
    run_dir = Path(run_dir)
    meta_path, path = run_dir / "checkpoint.json", run_dir / "checkpoint.pt"
    if not meta_path.exists() or not path.exists():
        raise KpruneError(f"{run_dir} has no checkpoint to resume from (checkpoint.pt and checkpoint.json); "
                          "runs write one when interrupted and every CHECKPOINT_INTERVAL steps")
    meta = read_json(meta_path, _DAMAGED.format(run_dir=run_dir))
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise KpruneError(f"{path} is corrupt: its sha256 does not match checkpoint.json; it cannot be resumed")
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise KpruneError(f"{path} was written by another checkpoint format ({payload.get('format')})")
    if payload["model_name"] != model_name:
        raise KpruneError(f"{path} is a checkpoint of {payload['model_name']}, not of {model_name}")
    saved = payload["settings"]
    differ = sorted(k for k in set(saved) | set(settings)
                    if k not in MAY_DIFFER and saved.get(k) != settings.get(k))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} then, {settings.get(k)!r} now" for k in differ)
        raise KpruneError(f"{path} was written with other settings ({details}); resume with the run's own "
                          f"config ({run_dir / 'config'}), e.g. make resume RESUME={run_dir}")
    return payload


def save_run(run_dir: Path | None, settings, task, optimizer, pruner, progress: Progress) -> None:
    """Checkpoint the run at `progress.step`. Every rank takes part (each has its own data position)."""
    data = distributed.gather(progress.data_state if progress.data_state is not None else task.data_state())
    rngs = distributed.gather(rng_state())  # each rank's own: dropout streams differ between ranks
    if pruner is not None and pruner.masks.states_zeroed_by_step:
        pruner.masks.zero_pruned_states(optimizer)  # the next step would take them as 0: saved as 0
    if run_dir is None:  # ranks other than 0 write nothing
        return
    save(run_dir, {
        "step": progress.step, "model_name": task.name, "settings": settings.as_dict(),
        "config": (run_dir / "config").read_text(encoding="utf-8"),
        "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
        "pruner": pruner.state_dict() if pruner is not None else None,
        "rng": rngs, "data": data,
        "loop": {"train_time_s": progress.train_time_s, "last_eval": progress.last_eval,
                 "compile_step_s": progress.compile_step_s, "compile_steps": progress.compile_steps,
                 "last_loss": progress.last_loss},
    })


def resume_run(run_dir: Path, settings, task, optimizer, pruner, progress: Progress,
               rewrite_metrics: bool = True) -> None:
    """Restore everything `save_run` wrote into the live objects; drop metrics rows after the checkpoint."""
    if run_status(run_dir) == "complete":
        raise KpruneError(f"{run_dir} is complete: nothing to resume")
    payload = load(run_dir, task.name, settings.as_dict())
    task.model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if pruner is not None:
        pruner.load_state_dict(payload["pruner"])
    rank, size = distributed.world()
    if len(payload["data"]) != size:
        raise KpruneError(f"{run_dir} was checkpointed by {len(payload['data'])} processes, not {size}")
    task.load_data_state(payload["data"][rank])
    set_rng_state(own_rng_state(payload["rng"], rank))
    progress.step = payload["step"]
    progress.train_time_s = payload["loop"]["train_time_s"]
    progress.compile_step_s = payload["loop"].get("compile_step_s", 0.0)  # older checkpoints: none recorded
    progress.compile_steps = payload["loop"].get("compile_steps", 0)
    progress.last_eval, progress.last_loss = payload["loop"]["last_eval"], payload["loop"]["last_loss"]
    if not rewrite_metrics:
        return
    # Rows logged after the checkpoint are redone: drop them so each step appears once.
    metrics = Path(run_dir) / "metrics.jsonl"
    rows, bad = read_metrics_lines(metrics) if metrics.exists() else ([], [])
    if bad:  # keep the damaged original: the rewrite below holds only the rows that could be read
        kept = metrics.with_name("metrics.jsonl.damaged")
        write_bytes_atomic(kept, metrics.read_bytes())
        print(f"warning: {metrics}: {len(bad)} damaged line(s) (not UTF-8 JSON) left out; the original is kept "
              f"as {kept}", file=sys.stderr)
    rows = [r for r in rows if r.get("step", 0) <= progress.step]
    write_text_atomic(metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
