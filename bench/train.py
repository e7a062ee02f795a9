"""`make bench-train`: training throughput of the demo GPT-2, kprune vs a bare loop.

The demo shape (GPT-2 tiny: 4 layers, 4 heads, width 128, block 64, batch 8,
vocab 50,304, AdamW lr 1e-3, no weight decay, fp32) on the bundled
Shakespeare, on the CPU with BENCH_THREADS (default 2) threads. That is also
the shape the peer trainers were measured on (../shared/docs/ANCHORS.md), so
the peer_shape_* keys report the same runs. Prints one JSON object:

  dense_tokens_per_s      kprune's loop, AdamW, no pruning
  pruned_tokens_per_s     kprune's loop, AdamWPrune + bitter7 to 50%, masks updated every
                          SCHEDULE_FREQUENCY steps throughout the measured window (updates included)
  bare_tokens_per_s       a plain PyTorch loop written here: same model, data, optimizer
  pruning_overhead_ratio  dense / pruned (1.0 = pruning costs nothing)
  framework_ratio         dense / bare (1.0 = the loop adds nothing)
  tracker_overhead_ratio  tokens/s of the dense arm with W&B (offline), trackio (local) and TensorBoard on,
                          over tokens/s without them, both by the wall-clock time of the whole run (so the
                          trackers' start and finish count); rows stream at the demo's LOG_INTERVAL in both

Each arm runs BENCH_STEPS steps (default 200) and the best of BENCH_ROUNDS rounds
(default 2) counts; evaluation is excluded from every arm's time except in the
*_wall_* keys, which time the whole run (the same evaluations with and without trackers).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from bench.knobs import knob
from bench.output import emit
from gpt2.model import GPT, config_for
from gpt2.train import build_task, token_files
from lib.data.tokens import TokenBatches
from lib.device import keep_freed_memory
from lib.kconfig import REPO_ROOT, read_config, settings_from_kconfig
from lib.optim import build_optimizer
from lib.tracking import tracker_problems
from lib.train_loop import run

DEMO = REPO_ROOT / "defconfigs" / "demo"


def demo_settings(steps: int, threads: int, output_dir: Path):
    kconf, _ = read_config(DEMO)
    base = settings_from_kconfig(kconf)
    return dataclasses.replace(base, max_iters=steps, eval_interval=steps, log_interval=steps, threads=threads,
                               output_dir=str(output_dir), run_name="", lr_warmup_iters=10,
                               data_dir=str(REPO_ROOT / "data"))


def kprune_tokens_per_s(settings) -> tuple[float, float]:
    """(tokens/s over the loop's timed steps, tokens/s over the wall-clock time of the whole run)."""
    sink = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(sink), redirect_stderr(io.StringIO()):
        assert run(settings, build_task, command=["bench"]) == 0
    wall = time.perf_counter() - start
    run_dir = Path(sink.getvalue().strip().splitlines()[-1].removeprefix("results: "))
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["throughput"], summary["items_per_step"] * summary["iterations"] / wall


def with_trackers(settings):
    """`settings` with all three trackers on, offline / local, writing below the benchmark's output."""
    os.environ.setdefault("TRACKIO_DIR", str(Path(settings.output_dir) / "trackio"))  # read when trackio loads
    tracked = dataclasses.replace(settings, track_wandb=True, track_trackio=True, track_tensorboard=True,
                                  track_project="kprune-bench", track_group="bench", track_wandb_entity="",
                                  track_wandb_mode="offline", track_trackio_space="", track_tensorboard_dir="")
    problems = tracker_problems(tracked)
    if problems:
        raise SystemExit("bench-train's tracker arm: " + "; ".join(f"{sym}: {msg}" for sym, msg in problems))
    return tracked


def bare_tokens_per_s(settings) -> float:
    """The loop a researcher would write by hand for the same model, data and optimizer."""
    torch.manual_seed(settings.seed)
    train_path, _ = token_files(Path(settings.data_dir), settings.gpt2_dataset)
    data = TokenBatches(train_path, settings.block_size)
    gen = torch.Generator().manual_seed(settings.seed)
    model = GPT(config_for(settings.gpt2_size, settings.block_size, settings.dropout))
    optimizer = build_optimizer(model, settings)  # the same AdamW kprune builds
    model.train()
    start = time.perf_counter()
    for _ in range(settings.max_iters):
        x, y = data.sample(settings.batch_size, gen, torch.device("cpu"))
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        loss.item()
    elapsed = time.perf_counter() - start
    return settings.max_iters * settings.batch_size * settings.block_size / elapsed


def main() -> int:
    threads = knob("BENCH_THREADS", 2, minimum=1)
    rounds = knob("BENCH_ROUNDS", 2, minimum=1)
    demo = settings_from_kconfig(read_config(DEMO)[0])
    frequency = demo.schedule_frequency
    # The pruned arm updates its masks every `frequency` steps from step 1 to the last.
    steps = knob("BENCH_STEPS", 200, minimum=frequency + 1)
    torch.set_num_threads(threads)
    keep_freed_memory()  # as every kprune run does; the bare loop gets it too
    out = REPO_ROOT / "bench" / "out"
    base = demo_settings(steps, threads, out)
    # The dense arm logs at the demo's interval, so the tracked copy of it streams rows as the demo would.
    dense = dataclasses.replace(base, optimizer="adamw", pruning_method="none", log_interval=demo.log_interval)
    tracked = with_trackers(dense)
    pruned = dataclasses.replace(base, optimizer="adamwprune", pruning_method="state", state_variant="bitter7",
                                 target_sparsity=0.5, schedule="cubic-ramp", schedule_start=1,
                                 schedule_end=steps, schedule_frequency=base.schedule_frequency)
    best = {"dense": 0.0, "pruned": 0.0, "bare": 0.0, "dense_wall": 0.0, "tracked_wall": 0.0}
    for _ in range(rounds):  # interleaved, so drift in the machine's speed hits every arm alike
        best["bare"] = max(best["bare"], bare_tokens_per_s(dense))
        steps_rate, wall_rate = kprune_tokens_per_s(dense)
        best["dense"], best["dense_wall"] = max(best["dense"], steps_rate), max(best["dense_wall"], wall_rate)
        best["pruned"] = max(best["pruned"], kprune_tokens_per_s(pruned)[0])
        best["tracked_wall"] = max(best["tracked_wall"], kprune_tokens_per_s(tracked)[1])
    result = {
        "benchmark": "train",
        "shape": "gpt2 tiny: 4 layers, 4 heads, width 128, block 64, batch 8, vocab 50304, fp32",
        "steps": steps,
        "mask_update_every": pruned.schedule_frequency,
        "dense_tokens_per_s": round(best["dense"]),
        "pruned_tokens_per_s": round(best["pruned"]),
        "bare_tokens_per_s": round(best["bare"]),
        "pruning_overhead_ratio": round(best["dense"] / best["pruned"], 3),
        "framework_ratio": round(best["dense"] / best["bare"], 3),
        "untracked_wall_tokens_per_s": round(best["dense_wall"]),
        "tracked_wall_tokens_per_s": round(best["tracked_wall"]),
        "tracker_overhead_ratio": round(best["tracked_wall"] / best["dense_wall"], 3),
        "peer_shape_dense_tokens_per_s": round(best["dense"]),
        "peer_shape_pruned_tokens_per_s": round(best["pruned"]),
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
