"""A run's final model on disk, in the format every other tool reads.

At its end a run writes into its directory (rank 0 only, atomically):
- `model.safetensors`: every parameter and buffer, dense with the pruned
  weights as exact zeros, floats as fp32. A tied parameter (GPT-2's output
  layer is its token embedding) is stored once, under its first name; the
  metadata's `tied` maps each other name to it, so a reader can restore it.
- `masks.safetensors`: one bool tensor per prunable parameter, of its shape,
  True where the weight is pruned. Written only by runs that prune.
The metadata (one key, `kprune`, holding JSON) also holds the model's name,
the step and the model's shape (`shape`: its config fields when it has
them, and every tensor's shape).

safetensors holds raw tensors and a JSON header, no pickle: loading one runs
no code, unlike a torch checkpoint. `make export` copies these files, the
run's config and the shape into <run dir>/export/ (scripts/export.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from lib import checkpoint
from lib.errors import KpruneError
from lib.results import write_bytes_atomic, write_json_atomic

MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"


@dataclass
class FinalModel:
    """What a run wrote at its end: its tensors by name, its masks (True = pruned) and its description."""

    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    metadata: dict

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors with every tied name restored, as the model's own state_dict has them."""
        return {**self.tensors, **{name: self.tensors[source] for name, source in self.metadata["tied"].items()}}


def model_shape(model: nn.Module) -> dict:
    """The model's config fields (when it keeps a dataclass `cfg`, as GPT-2 does) and each tensor's shape."""
    cfg = getattr(model, "cfg", None)
    return {"config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
            "tensors": {name: list(t.shape) for name, t in model.state_dict(keep_vars=True).items()}}


@torch.no_grad()
def final_model_files(model: nn.Module, model_name: str, step: int, masks=None) -> dict[str, bytes]:
    """The bytes of model.safetensors and (with `masks`, a MaskSet) masks.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first_name:
            tied[name] = first_name[id(t)]
            continue
        first_name[id(t)] = name
        t = t.detach().to("cpu")
        tensors[name] = (t.float() if t.is_floating_point() else t).contiguous()
    about = {"format": 1, "model": model_name, "step": step}
    files = {MODEL_FILE: save(tensors, metadata=_metadata({**about, "tied": tied, "shape": model_shape(model)}))}
    if masks is not None:
        pruned = {name: masks.pruned_mask(i).to("cpu").contiguous() for i, name in enumerate(masks.names)}
        files[MASKS_FILE] = save(pruned, metadata=_metadata({**about, "meaning": "True = pruned"}))
    return files


def _metadata(fields: dict) -> dict[str, str]:
    """safetensors metadata as one key holding sorted JSON.

    safetensors writes its metadata keys in an order that changes from call
    to call; with one key the same model gives the same bytes every time.
    """
    return {"kprune": json.dumps(fields, sort_keys=True)}


def write_final_model(run_dir: Path | None, task, pruner, status: str, step: int) -> dict:
    """Write the run's final model into `run_dir` if the run ended soundly; what summary.json records of it.

    Sound: complete, or interrupted between steps (its checkpoint is of this
    very step, so the weights are the ones a resume continues from). A
    diverged or failed run, or one stopped mid-step, has no model worth
    keeping. A write that fails (a full disk) is recorded in the summary
    instead of hiding how the run itself ended.
    """
    if run_dir is None or status not in ("complete", "interrupted"):
        return {}
    if status == "interrupted" and checkpoint.verify(run_dir) != step:
        return {}
    try:
        files = final_model_files(task.model, task.name, step, pruner.masks if pruner is not None else None)
        for name, data in files.items():
            write_bytes_atomic(Path(run_dir) / name, data)
    except KpruneError as exc:
        return {"final_model_error": str(exc)}
    return {"final_model": sorted(files)}


def read_final_model(run_dir: Path) -> FinalModel:
    """The final model a run wrote; KpruneError says why there is none to read."""
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not path.exists():
        raise KpruneError(f"{run_dir} holds no final model ({MODEL_FILE}): it is written when a run completes "
                          "or is interrupted; train (make train) or resume (make resume RESUME=<run dir>) first")
    tensors, metadata = _read(path)
    masks = _read(run_dir / MASKS_FILE)[0] if (run_dir / MASKS_FILE).exists() else {}
    return FinalModel(tensors, masks, metadata)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["kprune"])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise KpruneError(f"{path} is not a final model kprune wrote (unreadable safetensors or no kprune "
                          f"metadata: {exc}); train the run again or resume it to write it anew") from None
    return tensors, metadata


def export_run(run_dir: Path) -> tuple[list[Path], FinalModel]:
    """Write <run dir>/export/: the final weights and masks, the run's config and the model's shape.

    The weights and masks are the run's own files, copied byte for byte (they
    are already dense with zeros, fp32, safetensors). Returns what it wrote and the model it read.
    """
    run_dir = Path(run_dir)
    final = read_final_model(run_dir)  # refuses a run without a (readable) final model
    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    written = []
    for name in (MODEL_FILE, MASKS_FILE, "config"):
        if (run_dir / name).exists():
            write_bytes_atomic(out / name, (run_dir / name).read_bytes())
            written.append(out / name)
    shape = {"model": final.metadata["model"], "step": final.metadata["step"], "tied": final.metadata["tied"],
             **final.metadata["shape"]}
    write_json_atomic(out / "shape.json", shape)
    return written + [out / "shape.json"], final
