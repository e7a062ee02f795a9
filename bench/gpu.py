"""make bench-gpu: GPT-2 124M on the GPU at block 1024 (bf16, compiled), dense and bitter7-pruned.

Reports tokens/s and model FLOPs utilisation (MFU) for each arm, and the 2:4 semi-structured
inference latency of a 124M-shaped MLP layer against dense, and the cost of one optimizer step
on 124M-shaped weights half pruned (`optimizer_step_costs`), as JSON lines. The pruned arm
reaches 50% with bitter7 while its masks keep updating inside the measured steps. The first
steps (compiling) are left out of tokens/s. Bundled data only (Shakespeare tokens).

MFU counts the model's own FLOPs per token: 6 per weight (forward and backward) plus the
attention scores, 12 x layers x width x block, as in the PaLM paper's appendix. Pruned
weights still cost FLOPs in dense kernels, so the pruned arm's MFU counts them too.

The GPU's peak bf16 rate (dense tensor cores, no sparsity) comes from the table below by
device name, or from BENCH_PEAK_TFLOPS. Other knobs: BENCH_GPU_STEPS (steps per arm).
Without CUDA: says so and exits 0.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.knobs import knob
from bench.output import emit
from bench.pruning import layer_shapes
from lib.device import synchronize
from lib.optim import OPTIMIZERS
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.settings import Settings

# NVIDIA's datasheet dense bf16 tensor-core rates, TFLOP/s (the SXM parts where there are two).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "RTX A6000": 155.0}


def peak_tflops(device_name: str, override: float) -> float | None:
    """The peak bf16 TFLOP/s: the override if given (> 0), else the table's longest match in the name."""
    if override > 0:
        return override
    matches = [key for key in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def flops_per_token(params: int, layers: int, width: int, block: int) -> float:
    return 6.0 * params + 12.0 * layers * width * block


def measured_tokens_per_s(run_dir: Path, skip_steps: int) -> float:
    """The median tokens/s of the logged windows after the first `skip_steps` steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > skip_steps)
    return rates[len(rates) // 2]


# An fp32 Adam step reads w, g, m, v and writes w, m, v: the least memory traffic it can have, per weight.
STEP_BYTES_PER_WEIGHT = 7 * 4


def other_shapes(scale: float) -> list[tuple[int, ...]]:
    """GPT-2's tensors besides layer_shapes' weight matrices, never pruned: per block two LayerNorms
    (weight, bias) and four Linear biases, the final LayerNorm and the position embedding. With
    layer_shapes: the 148 tensors a GPT-2 124M step updates."""
    d = int(768 * scale)
    block = [(d,), (d,), (d,), (d,), (3 * d,), (d,), (4 * d,), (d,)]
    return block * 12 + [(d,), (d,), (1024, d)]


@dataclass
class PrunedAdamW:
    """kprune's AdamW over GPT-2-shaped tensors with every weight matrix pruned to 50%, as a pruned
    run holds them between mask updates; the three ways to step it that bench-gpu times."""

    weights: list[nn.Parameter]  # the pruned pool (layer_shapes)
    others: list[nn.Parameter]   # biases, norms, position embedding: stepped, never masked
    optimizer: torch.optim.Optimizer
    pruner: Pruner  # fusing its masking into the step

    def masked_step(self) -> None:
        """The pruned run's steady state: after_backward marks the pool masked, the step masks inside."""
        self.pruner.after_backward()
        self.optimizer.step()

    def unmasked_step(self) -> None:
        """A dense run's step: the same kernel with nothing masked."""
        self.optimizer.masked_params = frozenset()
        self.optimizer.step()

    def separate_masking(self) -> None:
        """The pass the fused step replaces: every pruned weight's gradient set to 0 on its own."""
        self.pruner.masks.zero_pruned_grads()


def gpt2_shaped_params(device: torch.device, scale: float) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weight matrices, other tensors), fp32 on `device`, each with a gradient."""
    gen = torch.Generator().manual_seed(0)

    def made(shape):  # drawn on the CPU: the same values on every device
        p = nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        return p
    return [made(s) for s in layer_shapes(scale)], [made(s) for s in other_shapes(scale)]


def pruned_adamw(weights: list[nn.Parameter], others: list[nn.Parameter]) -> PrunedAdamW:
    """kprune's AdamW as lib.optim builds it, its states populated by one step, then every weight
    matrix pruned to exactly 50% by magnitude (pruned weights and their moments exactly 0)."""
    settings = Settings(lr=1e-4, beta1=0.9, beta2=0.999, adam_eps=1e-8, amsgrad=False, weight_decay=0.1)
    optimizer = OPTIMIZERS["adamw"]([{"params": weights, "weight_decay": 0.1},
                                     {"params": others, "weight_decay": 0.0}], settings)
    optimizer.step()
    pruner = Pruner([(f"w{i}", p) for i, p in enumerate(weights)], Schedule("one-shot", start=1, end=1, final=0.5),
                    build_method("magnitude"), optimizer, scope="layer", fuse_masking=True)
    pruner.update(1)
    return PrunedAdamW(weights, others, optimizer, pruner)


def _seconds(fn, device: torch.device) -> float:
    synchronize(device)  # nothing queued before is billed to fn
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def optimizer_step_costs(device: torch.device, scale: float, repeats: int = 10, warmup: int = 3) -> dict:
    """One optimizer step over GPT-2-shaped fp32 tensors on `device`, every weight matrix 50% pruned:
    torch's fused AdamW, kprune's AdamW with nothing masked and with the pruned weights masked inside
    the step, and the separate masking pass that masking replaces. Medians of `repeats` timed calls
    after `warmup` untimed ones (which hold the compiling on CUDA)."""
    weights, others = gpt2_shaped_params(device, scale)
    params = weights + others
    fused = torch.optim.AdamW([{"params": weights, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                              lr=1e-4, fused=True)
    for _ in range(warmup):
        fused.step()
    torch_fused = statistics.median(_seconds(fused.step, device) for _ in range(repeats))
    fused.state.clear()  # its moments: the memory kprune's own need
    del fused
    graphs_before = _compiled_graphs()
    start = time.perf_counter()
    arms = pruned_adamw(weights, others)
    pruned = arms.pruner.pruned_count
    arms.masked_step()  # with live gradients on the pruned weights: the masking must hold them at 0
    kept = sum(int((w == 0).sum()) for w in weights) == pruned
    arms.separate_masking()  # from here on the unmasked steps leave them at 0 too (their moments are 0)
    for _ in range(warmup):
        arms.unmasked_step()
        arms.masked_step()
        arms.separate_masking()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    masked, unmasked = [], []
    for _ in range(repeats):  # alternated: the two are compared with each other
        masked.append(_seconds(arms.masked_step, device))
        unmasked.append(_seconds(arms.unmasked_step, device))
    separate = statistics.median(_seconds(arms.separate_masking, device) for _ in range(repeats))
    masked_s, unmasked_s = statistics.median(masked), statistics.median(unmasked)
    n = sum(p.numel() for p in params)
    return {"params": n, "tensors": len(params),
            "pruned_weights": pruned, "optimizer": type(arms.optimizer).__name__,
            "torch_fused_step_s": torch_fused, "kprune_step_s": unmasked_s, "kprune_masked_step_s": masked_s,
            "separate_masking_s": separate, "masking_vs_own_step": (masked_s - unmasked_s) / unmasked_s,
            "separate_masking_vs_own_step": separate / unmasked_s, "kprune_vs_torch_fused": unmasked_s / torch_fused,
            "kprune_step_gb_per_s": n * STEP_BYTES_PER_WEIGHT / unmasked_s / 1e9,
            "torch_fused_step_gb_per_s": n * STEP_BYTES_PER_WEIGHT / torch_fused / 1e9,
            "masked_step_kept_pruned_zero": kept, "kprune_setup_and_warmup_s": warmup_s,
            "kprune_compiled_graphs": _compiled_graphs() - graphs_before, "repeats": repeats}


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (kprune's step compiles its own on CUDA)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def main() -> int:
    if not torch.cuda.is_available():
        print(f"bench-gpu: no CUDA GPU here (torch {torch.__version__} sees none); nothing measured")
        return 0
    from gpt2.model import SIZES
    from lib.gpu_checks import check_semi_structured_24, gpt2_settings, train_tiny

    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, knob("BENCH_PEAK_TFLOPS", 0.0, 0.0))
    steps = knob("BENCH_GPU_STEPS", 60, 20)
    layers, _, width = SIZES["124m"]
    block, batch = 1024, 8
    shape = ["GPT2_SIZE_124M=y", "GPT2_BLOCK_SIZE=1024", f"BATCH_SIZE={batch}", "PRECISION_BF16=y", "COMPILE=y",
             f"MAX_ITERS={steps}", f"EVAL_INTERVAL={steps}", "LOG_INTERVAL=5", "GPT2_EVAL_ITERS=2",
             "LR_WARMUP_ITERS=5"]
    arms = {"dense": ([], False),
            "bitter7-50%": ([f"SCHEDULE_START={steps // 4}", f"SCHEDULE_END={steps - 5}", "SCHEDULE_FREQUENCY=5"],
                            True)}
    with tempfile.TemporaryDirectory(prefix="kprune-bench-gpu-") as scratch:
        for arm, (schedule, prune) in arms.items():
            settings = gpt2_settings(device, Path(scratch) / arm, *shape, *schedule, prune=prune)
            code, run_dir = train_tiny(settings)
            summary = json.loads((run_dir / "summary.json").read_text())
            if code != 0:
                print(f"error: bench-gpu arm {arm} ended {summary['status']}: {summary.get('error')}", file=sys.stderr)
                return 1
            rate = measured_tokens_per_s(run_dir, skip_steps=10)
            flops = flops_per_token(summary["params"], layers, width, block)
            emit({"bench": "gpu-train", "arm": arm, "device": name, "block_size": block, "batch_size": batch,
                  "tokens_per_s": rate, "mfu": rate * flops / (peak * 1e12) if peak else None,
                  "peak_bf16_tflops": peak, "final_sparsity": summary["final_sparsity"],
                  "mask_updates": len(summary.get("mask_updates", [])),
                  "compile_step_s": summary.get("compile_step_s"),
                  "cuda_max_allocated": summary["memory"].get("cuda_max_allocated")})
        latency = check_semi_structured_24(device, Path(scratch))
    emit({"bench": "gpu-2of4-inference", "device": name, "layer": "124M MLP c_proj (3072 -> 768), bf16, 4096 tokens",
          **latency})
    torch.cuda.empty_cache()  # the training arms' cached blocks, for the step's 124M-weight tensors
    costs = optimizer_step_costs(device, 1.0)
    emit({"bench": "gpu-optimizer-step", "device": name, **{k: round(v, 6) if isinstance(v, float) else v
                                                             for k, v in costs.items()}})
    if peak is None:
        print(f"note: no peak bf16 rate known for {name}: set BENCH_PEAK_TFLOPS for the MFU", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
