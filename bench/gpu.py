"""make bench-gpu: GPT-2 124M on the GPU at block 1024 (bf16, compiled), dense and bitter7-pruned.

Reports tokens/s and model FLOPs utilisation (MFU) for each arm, and the 2:4 semi-structured
inference latency of a 124M-shaped MLP layer against dense, as JSON lines. The pruned arm
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
import sys
import tempfile
from pathlib import Path

import torch

from bench.knobs import knob
from bench.output import emit

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
    if peak is None:
        print(f"note: no peak bf16 rate known for {name}: set BENCH_PEAK_TFLOPS for the MFU", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
