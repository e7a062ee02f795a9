"""2:4 semi-structured sparsity on CUDA: which Linear layers of a loaded model qualify, and converting them.

NVIDIA's sparse tensor cores (Ampere and newer) multiply a weight that keeps
at most 2 of every 4 consecutive inputs at up to twice the dense rate. torch
exposes them as SparseSemiStructuredTensor (torch.sparse.to_sparse_semi_structured):
an nn.Linear whose weight is one runs F.linear through the 2:4 kernels.

A layer is converted only when all of these hold; otherwise it stays dense
and is listed with the reason:
- the run pruned it (it has a mask): an unpruned layer (GPT-2's output layer,
  tied to the embedding) has no pattern to exploit;
- its weight really has the pattern: an input dimension that is a multiple of
  4, and at most 2 nonzeros in every group of 4 consecutive inputs;
- dtype float16 or bfloat16, the kernels' half types;
- rows and columns multiples of what the kernels need, taken as the stricter
  of torch's two backends (CUTLASS: 32 x 64 for fp16/bf16; cuSPARSELt:
  16 x 16), so which layers qualify does not depend on the build.
On a CPU nothing is converted: the kernels exist for CUDA only, and a 2:4
model there runs the dense kernels (about 1.0x the dense latency).

`convert_at_load` is the step every program that loads a run's model for use
(make evaluate, make sample: scripts/evaluate.py `load_model`) takes: for a
run whose summary says its structure is `nm`, the conversion above, on CUDA
only, with what it did said on stderr. A model that keeps fp32 weights and
computes under bf16 autocast (the trainer's evaluation on a GPU) has its
qualifying layers converted in bfloat16, the autocast dtype; the others keep
their weights exactly as loaded.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lib.errors import KpruneError

DTYPES = (torch.float16, torch.bfloat16)
# Converted outputs must match dense ones within this share of the largest dense output magnitude:
# both kernels accumulate in fp32; what differs is the order of sums and bf16/fp16 rounding per layer.
TOLERANCE = 2e-2
CPU_NOTE = ("2:4 semi-structured kernels need a CUDA GPU: on the CPU the 2:4 model runs the dense kernels "
            "(about 1.0x the dense latency); no layer was converted")


@dataclass
class LayerChoice:
    """One Linear layer: converted to 2:4 kernels or left dense, and why."""

    name: str
    shape: tuple[int, int]
    convert: bool
    reason: str


@dataclass
class Conversion:
    """What `semi_structured_for` did to a model: the layers it converted and those it left dense."""

    layers: list[LayerChoice] = field(default_factory=list)
    note: str | None = None  # why nothing could be converted at all (a CPU)
    backend: str | None = None  # torch's 2:4 backend that runs them: cusparselt or cutlass
    device: str | None = None  # the GPU's name

    @property
    def converted(self) -> list[str]:
        return [c.name for c in self.layers if c.convert]

    @property
    def dense(self) -> dict[str, str]:
        return {c.name: c.reason for c in self.layers if not c.convert}

    def describe(self) -> dict:
        """The JSON the benchmarks record."""
        return {"converted": len(self.converted), "dense": self.dense,
                **({"backend": self.backend} if self.backend else {}), **({"note": self.note} if self.note else {})}

    def lines(self, dense: bool = True) -> list[str]:
        """What to tell a user: the note, or how many layers were converted and (with `dense`) each left dense."""
        if self.note:
            return [self.note]
        head = f"2:4 semi-structured on {self.device}: {len(self.converted)} Linear layers converted ({self.backend})"
        return [head, *(f"  left dense: {name}: {reason}" for name, reason in self.dense.items() if dense)]


def keep_two_of_four(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] with the 2 smallest-magnitude of every 4 consecutive inputs zeroed (in place)."""
    groups = weight.view(weight.shape[0], -1, 4)
    smallest = groups.abs().topk(2, dim=2, largest=False).indices
    groups.scatter_(2, smallest, 0.0)
    return weight


def pattern_problem(weight: torch.Tensor) -> str | None:
    """Why `weight` [out, in] is not 2:4 (None when it is)."""
    if weight.dim() != 2:
        return f"{weight.dim()}-d weight: the 2:4 kernels take a 2-d Linear weight"
    if weight.shape[1] % 4:
        return f"input dimension {weight.shape[1]} is no multiple of 4"
    kept = weight.detach().ne(0).view(weight.shape[0], -1, 4).sum(dim=2)
    over = int((kept > 2).sum())
    return f"not 2:4: {over} of {kept.numel()} groups of 4 inputs keep more than 2" if over else None


def shape_multiple(dtype: torch.dtype) -> tuple[int, int]:
    """The rows and columns a weight of `dtype` must be a multiple of, for both of torch's 2:4 backends."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    rows = cols = 1
    for backend in (SparseSemiStructuredTensorCUTLASS, SparseSemiStructuredTensorCUSPARSELT):
        limits = backend._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
        if limits is not None:
            rows, cols = math.lcm(rows, limits.sparse_min_rows), math.lcm(cols, limits.sparse_min_cols)
    return rows, cols


def choose_layers(model: nn.Module, pruned: set[str]) -> list[LayerChoice]:
    """Every Linear layer of `model`, converted or not and why; `pruned` names the weights the run pruned."""
    choices = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        shape = (w.shape[0], w.shape[1])
        rows, cols = shape_multiple(w.dtype)
        if f"{name}.weight" not in pruned:
            reason = "not pruned by the run (no mask)"
        elif w.dtype not in DTYPES:
            reason = f"dtype {str(w.dtype).removeprefix('torch.')}: the 2:4 kernels take float16 or bfloat16"
        elif (problem := pattern_problem(w)) is not None:
            reason = problem
        elif shape[0] % rows or shape[1] % cols:
            reason = f"shape {list(shape)}: the 2:4 kernels need rows a multiple of {rows} and columns of {cols}"
        else:
            choices.append(LayerChoice(name, shape, True, f"2:4, {list(shape)}, {str(w.dtype).removeprefix('torch.')}"))
            continue
        choices.append(LayerChoice(name, shape, False, reason))
    return choices


def backend():
    """torch's 2:4 tensor class for this build: cuSPARSELt when the build has it, else CUTLASS.

    to_sparse_semi_structured would pick cuSPARSELt even in a build without it; choosing here keeps such
    a build working.
    """
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available() \
        else SparseSemiStructuredTensorCUTLASS


def to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    """A 2:4 CUDA weight as torch's semi-structured sparse tensor (the backend's own checks apply)."""
    return backend().from_dense(weight.detach().contiguous())


@torch.no_grad()
def in_half(model: nn.Module, pruned: set[str], half: torch.dtype) -> dict[str, nn.Parameter]:
    """Each pruned Linear layer of `model` with a weight of no half type given one in `half`; their weights as
    they were, by layer name, for the layers that end up not converted to take back."""
    as_loaded = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in pruned and module.weight.dtype not in DTYPES:
            as_loaded[name] = module.weight
            module.weight = nn.Parameter(module.weight.detach().to(half), requires_grad=False)
    return as_loaded


@torch.no_grad()
def semi_structured_for(model: nn.Module, pruned: set[str], half: torch.dtype | None = None) -> Conversion:
    """Convert, in place, the Linear layers of `model` that qualify to 2:4 semi-structured weights.

    The model must already be on its device, in its inference dtype; or with
    `half` (float16 or bfloat16: the autocast dtype it computes in), its
    pruned Linear layers are judged and converted in that dtype, and those
    that do not qualify keep their weights as they were. On a CPU nothing is
    converted and the note says why. Raises KpruneError when torch refuses a
    layer that qualified (a GPU without 2:4 support).
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return Conversion(note=CPU_NOTE)
    modules = dict(model.named_modules())
    as_loaded = in_half(model, pruned, half) if half is not None else {}
    conversion = Conversion(layers=choose_layers(model, pruned), backend=backend().BACKEND,
                            device=torch.cuda.get_device_name(device))
    for choice in conversion.layers:
        linear = modules[choice.name]
        if not choice.convert:
            if choice.name in as_loaded:
                linear.weight = as_loaded[choice.name]
            continue
        try:
            sparse = to_semi_structured(linear.weight)
        except (RuntimeError, NotImplementedError) as exc:
            raise KpruneError(f"torch cannot make {choice.name} a 2:4 semi-structured weight on "
                              f"{conversion.device} ({exc}); 2:4 kernels need compute "
                              "capability 8.0+ (Ampere or newer)") from None
        linear.weight = nn.Parameter(sparse, requires_grad=False)
    return conversion


def run_structure(directory: Path) -> str | None:
    """The sparsity structure the run that wrote `directory` pruned with (its summary.json; for <run dir>/export
    the run's), or None when no summary says."""
    directory = Path(directory)
    for where in (directory, directory.parent) if directory.name == "export" else (directory,):
        try:
            summary = json.loads((where / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        structure = summary.get("sparsity_structure") if isinstance(summary, dict) else None
        return structure.get("kind") if isinstance(structure, dict) else None
    return None


def convert_at_load(model: nn.Module, directory: Path, pruned: set[str],
                    half: torch.dtype | None = None) -> Conversion | None:
    """An `nm` run's model, just loaded onto its device: its qualifying Linear layers onto the 2:4 kernels.

    None, and nothing said, for a run of another structure. On CUDA the
    layers `pruned` names are converted where they qualify (`half`: see
    semi_structured_for), and stderr says how many and each layer left dense
    with its reason; on a CPU the model is untouched and one line says so.
    """
    if run_structure(directory) != "nm":
        return None
    conversion = semi_structured_for(model, pruned, half)
    for line in conversion.lines():
        print(line, file=sys.stderr)
    return conversion
