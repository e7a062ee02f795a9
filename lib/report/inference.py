"""What `make bench-inference` measured for a run (<run dir>/inference.json), per run and per arm.

bench/inference.py writes the file: the device, the batch sizes (1 and the
run's training batch), and `speedup_b<batch>`, the dense model's latency over
that of what the run's pruning bought (`pruned_arm`: the smaller model, the
2:4 kernels on CUDA, or nothing — then the pruned model is the dense
computation and the speedup is 1.0), and `model_file`, the size and
modification time of the model.safetensors it timed: a run resumed since
then has another final model, and its old measurement is not used. Runs
never measured have no file and show "—" in the report.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

RESULT_FILE = "inference.json"
MODEL_FILE = "model.safetensors"  # lib/export.py's name for a run's final model
# How report.md names what the speedup was measured on.
BOUGHT_NAMES = {"smaller": "smaller model", "sparse24": "2:4 kernels", None: "dense kernels"}


@dataclass
class Inference:
    """One run's measurement: speedup over dense at each batch size, on `device`."""

    device: str
    speedup: dict[int, float]  # batch size -> dense latency / pruned latency
    pruned_arm: str | None

    @property
    def training_batch(self) -> int:
        return max(self.speedup)


@dataclass
class ArmInference:
    """The mean speedups of an arm's measured runs."""

    b1: float
    training_batch: int
    at_training_batch: float
    devices: list[str]
    bought: list[str]
    measured: int  # how many of the arm's completed runs were measured


def model_file_stamp(run_dir: Path) -> dict | None:
    """The size and modification time of the run's final model file, which tell one final model from the next."""
    try:
        stat = (Path(run_dir) / MODEL_FILE).stat()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_inference(run_dir: Path) -> tuple[Inference | None, str | None]:
    """The run's inference.json (None when never measured), and what was wrong with it when unreadable."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        speedup = {int(b): float(data[f"speedup_b{b}"]) for b in data["batch_sizes"]}
        if 1 not in speedup:
            raise ValueError("no speedup at batch size 1")
        stamp = model_file_stamp(run_dir)
        if data.get("model_file") and stamp and data["model_file"] != stamp:
            return None, (f"{path}: measured an earlier final model than the run's {MODEL_FILE} (the run went on "
                          f"after it was measured); left out; measure it again with make bench-inference "
                          f"RESULTS={run_dir}")
        return Inference(str(data["device"]), speedup, data.get("pruned_arm")), None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, (f"{path}: not a result bench-inference wrote ({type(exc).__name__}: {exc}); its inference "
                      f"column is left empty; measure it again with make bench-inference RESULTS={run_dir}")


def arm_inference(results: list[Inference | None]) -> ArmInference | None:
    """Means over the measured runs of an arm (None when none was measured)."""
    measured = [r for r in results if r is not None]
    if not measured:
        return None
    batch = max(r.training_batch for r in measured)
    at_batch = [r.speedup[batch] for r in measured if batch in r.speedup]
    return ArmInference(b1=statistics.fmean(r.speedup[1] for r in measured),
                        training_batch=batch, at_training_batch=statistics.fmean(at_batch),
                        devices=sorted({r.device for r in measured}),
                        bought=list(dict.fromkeys(BOUGHT_NAMES.get(r.pruned_arm, str(r.pruned_arm))
                                                  for r in measured)),
                        measured=len(measured))


def format_inference(a: ArmInference | None, complete: int) -> str:
    """'1.52× b1, 1.71× b8 (cpu; smaller model)', with '2 of 3 runs' when not every completed run was measured."""
    if a is None:
        return "—"
    notes = [", ".join(a.devices), ", ".join(a.bought)]
    if a.measured < complete:
        notes.append(f"{a.measured} of {complete} runs")
    return f"{a.b1:.2f}× b1, {a.at_training_batch:.2f}× b{a.training_batch} ({'; '.join(notes)})"
