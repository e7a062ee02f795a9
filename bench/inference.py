"""`make bench-inference`: forward latency and memory of a dense model against what pruning bought.

With RESULTS=<run dir> (a GPT-2, LeNet-5 or ResNet run with a final model):
the run's model as trained (full shape, pruned weights as zeros: what a
dense model of its shape costs) against what its pruning buys: the smaller
model without the units pruning removed whole (GPT-2 heads and MLP neurons,
LeNet-5 conv filters and fc neurons, ResNet block-internal filters: the
<model>/shrink.py make export uses), when there are any; on CUDA, the model
with its 2:4-pruned Linear layers as semi-structured sparse weights
(lib/semi_structured.py), when any qualify. The result is also written to
<run dir>/inference.json, which `make plots` reads. With RESULTS=<matrix
dir>: each completed run of the matrix in turn, one JSON line and one
inference.json each. Without RESULTS: a 124M-shaped GPT-2 (random weights:
timing does not depend on them) dense, and pruned 50% three ways:
`unstructured` keeps the shape and runs the same dense matmuls (about 1.0x);
`nm` (2:4) does too on a CPU, and runs the 2:4 kernels on CUDA; `channel`
removes half the heads and half the MLP neurons of every block and runs
smaller.

One process, one JSON line per model measured. For each arm and each batch
size (1 and a training-sized batch: BENCH_BATCH, default 8, or the run's
BATCH_SIZE) of random inputs (GPT-2: full-context token sequences; LeNet-5:
1x28x28 images; ResNet: 3x32x32): `<arm>_latency_s_b<batch>`, the median
over BENCH_REPEATS (default 5) forwards after one warm-up; `<arm>_speedup_b<batch>`
= dense / arm; `<arm>_peak_bytes`, the memory a forward at the larger batch
adds (resident-set high-water mark on a CPU, CUDA peak allocation on a GPU);
`<arm>_params`. BENCH_DEVICE (auto, cpu, cuda; default auto) picks the
device: CUDA runs every arm in bfloat16, the CPU in float32. BENCH_SCALE
(default 1) shrinks the random model's width and context for a quick run;
BENCH_THREADS (default 2) sets the CPU threads. Compare the numbers within
one run, on a quiet machine.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.knobs import choice_knob, knob
from bench.output import emit
from bench.pruning import _reset_high_water, _status_bytes
from gpt2.model import GPT, GPTConfig
from gpt2.shrink import shrink
from lenet5.model import LeNet5
from lib.cli import make_variable
from lib.device import pick_device
from lib.errors import KpruneError
from lib.export import read_final_model
from lib.report.inference import RESULT_FILE, model_file_stamp
from lib.report.runs import load_matrix
from lib.results import write_json_atomic
from lib.semi_structured import keep_two_of_four, run_structure, semi_structured_for
from resnet.model import ResNet
from scripts.export import model_from_final, shrink_module

# What a run's pruning can buy, first found first: the report's speedup is this arm's.
BOUGHT = ("sparse24", "smaller")
BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class Where:
    """The device and dtype every arm runs in: bfloat16 on CUDA (the 2:4 kernels take no fp32), fp32 on a CPU."""

    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def place(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, self.dtype).eval()


def random_124m(scale: float) -> GPT:
    """GPT-2 124M's shape (12 layers, 12 heads, width 768, context 1024), width and context times `scale`."""
    head_dim = max(1, round(64 * scale))
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=12 * head_dim, block_size=max(8, round(1024 * scale)))
    return GPT(cfg).eval()


def block_weight_names(model: GPT) -> set[str]:
    """The weights pruning covers in a GPT-2: the four projections of every block."""
    return {f"blocks.{i}.{layer}.weight" for i in range(model.cfg.n_layer) for layer in BLOCK_LAYERS}


@torch.no_grad()
def prune_half(model: GPT, structure: str) -> GPT:
    """`model` with 50% of its block weights pruned with `structure` (zeros; channel: whole units)."""
    pruned = GPT(model.cfg).eval()
    pruned.load_state_dict(model.state_dict())
    head_dim = model.cfg.n_embd // model.cfg.n_head
    for block in pruned.blocks:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            w = layer.weight
            if structure == "unstructured":
                w.mul_(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
            elif structure == "nm":  # 2 of every 4 consecutive inputs kept: the larger two
                keep_two_of_four(w)
        if structure == "channel":  # every other head and every other neuron: their output columns go
            heads = torch.arange(model.cfg.n_head)[::2]
            cols = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            block.attn.c_proj.weight[:, cols] = 0
            block.mlp.c_proj.weight[:, ::2] = 0
    return shrink(pruned) if structure == "channel" else pruned


def as_semi_structured(model: nn.Module, pruned: set[str], info: dict, nm: bool = True) -> nn.Module | None:
    """A copy of `model` (already placed) with its 2:4 layers on the 2:4 kernels, or None when none qualify.

    Records what was converted and what stayed dense (with reasons) in `info`, and says it on stderr:
    each dense layer for an `nm` model, one line for a model of another structure that has no 2:4 layer.
    """
    sparse = copy.deepcopy(model)
    conversion = semi_structured_for(sparse, pruned)
    info["semi_structured"] = conversion.describe()
    for line in conversion.lines(dense=nm or bool(conversion.converted)):
        print(line, file=sys.stderr)
    return sparse if conversion.converted else None


def example_shape(model: nn.Module) -> tuple[int, ...]:
    """The shape of one input of `model`: GPT-2 a full context of token ids, LeNet-5 a 1x28x28 image (MNIST),
    ResNet a 3x32x32 one (CIFAR)."""
    if isinstance(model, GPT):
        return (model.cfg.block_size,)
    if isinstance(model, LeNet5):
        return (1, 28, 28)
    if isinstance(model, ResNet):
        return (3, 32, 32)
    raise KpruneError(f"bench-inference has no input for a {type(model).__name__}: it times GPT-2, LeNet-5 and ResNet")


def random_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random inputs of `model`, on its device and (images) in its dtype: timing does not depend on values."""
    param = next(model.parameters())
    if isinstance(model, GPT):
        return torch.randint(0, 50257, (batch, *example_shape(model)), generator=gen).to(param.device)
    return torch.randn((batch, *example_shape(model)), generator=gen).to(param.device, param.dtype)


def measure(model: nn.Module, batches: list[int], repeats: int) -> dict:
    """Median forward latency per batch size, and the memory a forward at the largest batch adds."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    out: dict = {"params": sum(p.numel() for p in model.parameters())}
    gen = torch.Generator().manual_seed(0)
    # no_grad rather than inference_mode: the 2:4 weights are a tensor subclass inference tensors do not mix with.
    with torch.no_grad():
        for batch in batches:
            inputs = random_inputs(model, batch, gen)
            model(inputs)  # warm-up: first-call allocations and kernel choices
            sync()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(inputs)
                sync()
                times.append(time.perf_counter() - t0)
            out[f"latency_s_b{batch}"] = statistics.median(times)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model(inputs)
            sync()
            out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        else:
            before, measured = _status_bytes("VmRSS"), _reset_high_water()
            model(inputs)
            out["peak_bytes"] = max(0, _status_bytes("VmHWM") - before) if measured else None
    return out


def random_arms(scale: float, where: Where, info: dict) -> dict[str, GPT]:
    """Dense and pruned 50% with each structure; on CUDA the 2:4 arm runs the 2:4 kernels."""
    torch.manual_seed(0)
    dense = random_124m(scale)
    arms = {"dense": dense, **{s: prune_half(dense, s) for s in ("unstructured", "nm", "channel")}}
    arms = {name: where.place(model) for name, model in arms.items()}
    sparse = as_semi_structured(arms["nm"], block_weight_names(dense), info)
    if sparse is not None:
        arms["nm"] = sparse
    return arms


def smaller_model(model: nn.Module, name: str) -> nn.Module | None:
    """`model` without the units its pruning removed whole; None, saying why, when that is no smaller model.

    Run on the CPU in fp32, before the model moves: the cut follows its exact zeros.
    """
    if isinstance(model, GPT) and (model.cfg.heads is not None or model.cfg.hidden is not None):
        print("the model is already a smaller one (export/small): it is measured as it is", file=sys.stderr)
        return None
    kind = shrink_module(name)
    small = kind.shrink(model)
    if sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()):
        return small
    print(f"no whole {kind.UNITS} is pruned: no smaller model", file=sys.stderr)
    return None


def run_arms(run_dir: Path, where: Where, info: dict) -> tuple[dict[str, nn.Module], int | None]:
    """The run's model as trained and what its pruning buys; the run's training batch size when recorded."""
    final = read_final_model(run_dir)
    model = model_from_final(final, run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}  # a run directory without a readable summary: BENCH_BATCH
    batch = (summary.get("settings") or {}).get("batch_size")
    small = smaller_model(model, final.metadata["model"])
    arms = {"dense": where.place(model)}
    if small is not None:
        arms["smaller"] = where.place(small)
    structure = run_structure(run_dir)
    if where.device.type == "cuda" or structure == "nm":  # a CPU only says why nothing is converted
        sparse = as_semi_structured(arms["dense"], set(final.masks), info, nm=structure == "nm")
        if sparse is not None:
            arms["sparse24"] = sparse
    return arms, batch


def bench_arms(arms: dict[str, nn.Module], batches: list[int], repeats: int) -> dict:
    """Every arm measured, with its speedup over `dense`; `pruned_arm` names what pruning bought, if anything."""
    dense = arms["dense"]
    shape = {"context": dense.cfg.block_size} if isinstance(dense, GPT) else {"input_shape": list(example_shape(dense))}
    result: dict = {"batch_sizes": batches, **shape, "repeats": repeats}
    measured = {name: measure(model, batches, repeats) for name, model in arms.items()}
    for name, m in measured.items():
        result[f"{name}_params"], result[f"{name}_peak_bytes"] = m["params"], m["peak_bytes"]
        for b in batches:
            result[f"{name}_latency_s_b{b}"] = m[f"latency_s_b{b}"]
            if name != "dense":
                result[f"{name}_speedup_b{b}"] = measured["dense"][f"latency_s_b{b}"] / m[f"latency_s_b{b}"]
    bought = next((name for name in BOUGHT if name in arms), None)
    result["pruned_arm"] = bought
    for b in batches:  # nothing bought: the pruned model is the dense computation, 1.0x by construction
        result[f"speedup_b{b}"] = result[f"{bought}_speedup_b{b}"] if bought else 1.0
    return result


def runs_to_measure(path: Path) -> tuple[list[Path], bool]:
    """The run directories RESULTS names: itself, or a matrix's completed runs; and whether it is a matrix."""
    if not path.is_dir():
        raise KpruneError(f"RESULTS={path} is no directory: give a run directory (the `results:` line of "
                          "make train) or a matrix directory")
    if not (path / "plan.json").is_file():
        return [path], False
    matrix = load_matrix(path)  # refuses a matrix without a completed run
    skipped = [r.id for r in matrix.runs if not r.complete]
    if skipped:
        print(f"not complete, not measured: {', '.join(skipped)}", file=sys.stderr)
    return [r.path for r in matrix.runs if r.complete], True


def main() -> int:
    scale = knob("BENCH_SCALE", 1.0, minimum=0.02)
    torch.set_num_threads(knob("BENCH_THREADS", 2, minimum=1))
    repeats = knob("BENCH_REPEATS", 5, minimum=1)
    batch = knob("BENCH_BATCH", 8, minimum=1)
    results = make_variable("RESULTS")
    try:
        where = Where(pick_device(choice_knob("BENCH_DEVICE", "auto", ("auto", "cpu", "cuda"))))
        if not results:
            info: dict = {}
            arms = random_arms(scale, where, info)
            measured = bench_arms(arms, list(dict.fromkeys([1, batch])), repeats)
            emit({"source": f"random GPT-2 124M shape x {scale}", "device": where.name,
                  "dtype": str(where.dtype).removeprefix("torch."), **measured, **info})
            return 0
        run_dirs, is_matrix = runs_to_measure(Path(results))
        written = 0
        for run_dir in run_dirs:
            info, stamp = {}, model_file_stamp(run_dir)  # which final model this measures
            try:
                arms, run_batch = run_arms(run_dir, where, info)
            except KpruneError as exc:
                if not is_matrix:
                    raise
                print(f"not measured: {run_dir.name}: {exc}", file=sys.stderr)
                continue
            measured = bench_arms(arms, list(dict.fromkeys([1, run_batch or batch])), repeats)
            result = {"source": str(run_dir), "device": where.name, "dtype": str(where.dtype).removeprefix("torch."),
                      "model_file": stamp, **measured, **info,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}
            del arms  # one run's models at a time
            write_json_atomic(run_dir / RESULT_FILE, result)
            emit(result)
            print(f"wrote: {run_dir / RESULT_FILE}", file=sys.stderr)
            written += 1
        if not written:
            raise KpruneError(f"no run of {results} could be measured (only runs with a final model can)")
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
