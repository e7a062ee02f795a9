"""`make bench-inference`: forward latency and memory of a dense GPT-2 against what pruning bought.

With RESULTS=<run dir> (a GPT-2 run with a final model): the run's model as
trained (full shape, pruned weights as zeros) against the smaller model
without the heads and MLP neurons pruning removed whole (gpt2/shrink.py),
when there are any. Without RESULTS: a 124M-shaped GPT-2 (random weights:
timing does not depend on them) dense, and pruned 50% three ways:
`unstructured` and `nm` (2:4) leave the shape as it is, so on a CPU they run
the same dense matmuls (about 1.0x, reported as measured); `channel` removes
half the heads and half the MLP neurons of every block and runs smaller.

One process, one JSON line. For each arm and each batch size (1 and a
training-sized batch: BENCH_BATCH, default 8, or the run's BATCH_SIZE) of
full-context sequences: `<arm>_latency_s_b<batch>`, the median over
BENCH_REPEATS (default 5) forwards after one warm-up; `<arm>_speedup_b<batch>`
= dense / arm; `<arm>_peak_bytes`, the resident-set high-water mark a forward
at the larger batch adds; `<arm>_params`. BENCH_SCALE (default 1) shrinks
the random model's width and context for a quick run; BENCH_THREADS (default
2) sets the threads. Compare the numbers within one run, on a quiet machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.knobs import knob
from bench.output import emit
from bench.pruning import _reset_high_water, _status_bytes
from gpt2.hf import gpt_from_run
from gpt2.model import GPT, GPTConfig
from gpt2.shrink import shrink
from lib.cli import make_variable
from lib.errors import KpruneError


def random_124m(scale: float) -> GPT:
    """GPT-2 124M's shape (12 layers, 12 heads, width 768, context 1024), width and context times `scale`."""
    head_dim = max(1, round(64 * scale))
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=12 * head_dim, block_size=max(8, round(1024 * scale)))
    return GPT(cfg).eval()


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
                groups = w.view(w.shape[0], -1, 4)
                smallest = groups.abs().topk(2, dim=2, largest=False).indices
                groups.scatter_(2, smallest, 0.0)
        if structure == "channel":  # every other head and every other neuron: their output columns go
            heads = torch.arange(model.cfg.n_head)[::2]
            cols = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            block.attn.c_proj.weight[:, cols] = 0
            block.mlp.c_proj.weight[:, ::2] = 0
    return shrink(pruned) if structure == "channel" else pruned


def measure(model: GPT, batches: list[int], repeats: int) -> dict:
    """Median forward latency per batch size, and the RSS high-water mark the largest batch adds."""
    out: dict = {"params": sum(p.numel() for p in model.parameters())}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in batches:
            idx = torch.randint(0, 50257, (batch, model.cfg.block_size), generator=gen)
            model(idx)  # warm-up: first-call allocations and kernel choices
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(idx)
                times.append(time.perf_counter() - t0)
            out[f"latency_s_b{batch}"] = statistics.median(times)
        before, measured = _status_bytes("VmRSS"), _reset_high_water()
        model(idx)
        out["peak_bytes"] = max(0, _status_bytes("VmHWM") - before) if measured else None
    return out


def arms_to_measure(results: str | None, scale: float, batch: int) -> tuple[dict[str, GPT], list[int], str]:
    """The models to time, the batch sizes and where they came from."""
    if not results:
        torch.manual_seed(0)
        dense = random_124m(scale)
        arms = {"dense": dense, **{s: prune_half(dense, s) for s in ("unstructured", "nm", "channel")}}
        return arms, [1, batch], f"random GPT-2 124M shape x {scale}"
    run_dir = Path(results)
    model = gpt_from_run(run_dir)
    try:
        batch = json.loads((run_dir / "summary.json").read_text())["settings"]["batch_size"]
    except (OSError, ValueError, KeyError):
        pass  # a run directory without a readable summary: BENCH_BATCH
    arms = {"dense": model}
    small = shrink(model)
    if sum(small.cfg.heads) < model.cfg.n_layer * model.cfg.n_head or \
            sum(small.cfg.hidden) < model.cfg.n_layer * 4 * model.cfg.n_embd:
        arms["smaller"] = small
    else:
        print("no whole head or MLP neuron is pruned: only the model as trained is measured", file=sys.stderr)
    return arms, [1, batch], str(run_dir)


def main() -> int:
    scale = knob("BENCH_SCALE", 1.0, minimum=0.02)
    torch.set_num_threads(knob("BENCH_THREADS", 2, minimum=1))
    repeats = knob("BENCH_REPEATS", 5, minimum=1)
    try:
        arms, batches, source = arms_to_measure(make_variable("RESULTS"), scale, knob("BENCH_BATCH", 8, minimum=1))
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result: dict = {"source": source, "batch_sizes": batches, "context": arms["dense"].cfg.block_size,
                    "repeats": repeats}
    measured = {name: measure(model, batches, repeats) for name, model in arms.items()}
    for name, m in measured.items():
        result[f"{name}_params"], result[f"{name}_peak_bytes"] = m["params"], m["peak_bytes"]
        for b in batches:
            result[f"{name}_latency_s_b{b}"] = m[f"latency_s_b{b}"]
            if name != "dense":
                result[f"{name}_speedup_b{b}"] = measured["dense"][f"latency_s_b{b}"] / m[f"latency_s_b{b}"]
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
