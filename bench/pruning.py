"""`make bench-pruning`: the cost of kprune's pruning on GPT-2 124M-shaped layers.

12 blocks x {768->2304, 768->768, 768->3072, 3072->768} plus the 768->50257
output layer, no biases (123,532,032 weights), fp32 on the CPU, AdamW states
populated, state/bitter7 pruned to 50%. Prints one JSON object:

  mask_update_s              one full mask update (score, exact global selection,
                             masks, zeroing of weights and states), each from the same
                             trained weights and moments (restored before each: untimed);
                             REPEATS rounds of one update and one streaming pass: the
                             times of the round whose ratio is the median
  pruned_count_exact         the pruned count equals round(0.5 * params)
  stream_pass_s              the machine's yardstick: one pass that reads every weight
                             and its exp_avg_sq and writes one float32 per weight
                             (torch.mul into preallocated buffers)
  update_vs_stream           mask_update_s / stream_pass_s: the median of the rounds' ratios
  dense_step_s               torch AdamW (foreach) step on the same tensors, unpruned
  torch_fused_step_s         torch's fused AdamW step on the same tensors, unpruned
  masked_step_s              kprune's steady state between updates: after_backward,
                             then kprune's AdamW step (lib/fused_adam.py), which
                             masks the pruned weights inside its one pass; timed in
                             STEP_REPEATS rounds with the unmasked step, and both are the
                             times of the round whose masking ratio is the median
  kprune_unmasked_step_s     the same step with nothing masked (what a dense run does),
                             after pruning (half the moments exactly zero)
  masking_vs_own_step        (masked_step_s - kprune_unmasked_step_s) / kprune_unmasked_step_s:
                             what keeping pruned weights at zero costs per step (noise
                             can make it slightly negative); the median round's
  separate_masking_s,        the separate masking pass the step replaces (best of REPEATS; still used
  separate_masking_vs_own_step  with SGD and AdamWSPAM) and its ratio
  masked_clipped_step_s      the same steady state with gradient clipping (GRAD_CLIP=1.0,
                             as every shipped defconfig): after_backward, the norm of
                             the gradients with the pruned ones left out (one pass,
                             lib/grad_clip.py), then the step, which masks and scales
                             every gradient by the clipping coefficient inside its pass
  kprune_unmasked_clipped_step_s  the same with nothing masked: a dense run's norm + step
  masking_vs_own_step_clipped  (masked_clipped_step_s - kprune_unmasked_clipped_step_s)
                             / kprune_unmasked_clipped_step_s: what keeping pruned
                             weights at zero costs per step with clipping (the four clipped
                             steps are timed in STEP_REPEATS rounds; each pair compared is
                             the pair of the round whose ratio is the median)
  torch_clipped_step_s       the way before (a dense run): torch's clip_grad_norm_
                             (reads the gradients, then reads and writes them), then
                             kprune's step
  separate_clipped_step_s,   the way before for a pruned run: the separate masking pass,
  separate_masking_vs_own_step_clipped  clip_grad_norm_, the step; and what its masking
                             cost, (separate_clipped - torch_clipped) / torch_clipped
  step_overhead_ratio        masked_step_s / dense_step_s
  state_bytes_per_weight     persistent pruning state (masks) per prunable weight
  peak_extra_bytes_per_weight  transient memory a mask update adds at its peak
                             (resident-set high-water mark, the heap's free pages given
                             back first: two untimed updates), per weight; the update
                             runs as in training, right after a step, so it writes
                             the scores into the spent gradients
  peak_extra_bytes_per_weight_own_buffer  the same for an update called while the
                             gradients are still live (Pruner.update outside
                             after_step): it allocates its own float32 score buffer

BENCH_SCALE=0.25 shrinks every dimension for a quick run. BENCH_STRUCTURE=nm
(2:4), block (4x4 tiles) or channel (every head and MLP neuron a unit, the
output layer left out) measures the same update and masking with that
sparsity structure (default: unstructured); `structure`, `prunable_params`
and the update's `target_groups`/`pruned_groups` say what was pruned.
Nothing here is a pass/fail test: the numbers are compared as ratios within
one run. Each ratio pairs two arms timed back to back in one round and takes
the median round: the machine's memory bandwidth drifts between rounds, and a
ratio of two best-of times moved with whichever arm had the luckier round.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from bench.knobs import KnobError, choice_knob, knob
from bench.output import emit
from lib.device import keep_freed_memory, release_free_memory
from lib.errors import KpruneError
from lib.grad_clip import clipped_step
from lib.optim import OPTIMIZERS
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner, target_count
from lib.pruning.registry import STRUCTURES
from lib.pruning.schedules import Schedule
from lib.pruning.build import build_structure
from lib.pruning.units import UnitFamily, Units, attention_heads, consecutive
from lib.settings import Settings

REPEATS = 5  # rounds of an update and the streaming pass (odd: the median is a round)
# The steps compared with each other take ~0.05 s, and the machine's noise is of the order of the masking's
# cost: more rounds.
STEP_REPEATS = 15
CLIP = 1.0  # GRAD_CLIP of every shipped defconfig


def layer_shapes(scale: float) -> list[tuple[int, int]]:
    d, vocab = int(768 * scale), int(50257 * scale)
    block = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # (out, in) like nn.Linear.weight
    return block * 12 + [(vocab, d)]


def channel_units(params: list[nn.Parameter], width: int) -> Units:
    """GPT-2's heads and MLP neurons over the benchmark's layers (12 heads where the width allows)."""
    n_head = 12 if width % 12 == 0 else 1
    families = []
    for b in range(12):
        qkv, proj, fc, out = params[4 * b:4 * b + 4]
        families.append(UnitFamily(f"{b}.heads", (attention_heads(f"{b}.qkv", qkv, n_head, width),
                                                  consecutive(f"{b}.proj", proj, 1, n_head, width // n_head))))
        families.append(UnitFamily(f"{b}.neurons", (consecutive(f"{b}.fc", fc, 0, 4 * width),
                                                    consecutive(f"{b}.out", out, 1, 4 * width))))
    return Units(families, left_out={"w48": "the output layer's rows are the logits"})


def _status_bytes(field: str) -> int:
    """A memory figure from /proc/self/status (VmRSS, VmHWM, ...), in bytes; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _best(fn, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rounds(arms, count: int) -> list[list[float]]:
    """`count` rounds, each timing every function of `arms` once, back to back: [round][arm] seconds."""
    return [[_best(fn, 1) for fn in arms] for _ in range(count)]


def median_round(times: list[list[float]], ratio) -> list[float]:
    """The round whose ratio(times of its arms) is the median of the rounds' (the upper one of an even count)."""
    return sorted(times, key=lambda arms: ratio(*arms))[len(times) // 2]


def restorer(params: list[nn.Parameter], optimizer: torch.optim.Optimizer):
    """A function that puts the weights and their optimizer states (those of their shape) back as they are now."""
    saved = [(p.detach().clone(), {name: t.clone() for name, t in optimizer.state[p].items()
                                   if torch.is_tensor(t) and t.shape == p.shape}) for p in params]

    def restore() -> None:
        for p, (w, state) in zip(params, saved):
            p.data.copy_(w)
            for name, t in state.items():
                optimizer.state[p][name].copy_(t)
    return restore


def main() -> int:
    scale = knob("BENCH_SCALE", 1.0, minimum=0.02)  # below 0.02 the widths round to zero
    threads = knob("BENCH_THREADS", 2, minimum=1)
    kind = choice_knob("BENCH_STRUCTURE", "unstructured", STRUCTURES)
    torch.set_num_threads(threads)
    # As every kprune run on the CPU (lib/device.py prepare_process): freed memory stays in the process, so
    # the gradients an update frees, and the next backward allocates, cost no unmapping and no page faults.
    keep_freed_memory()
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape) * 0.02) for shape in layer_shapes(scale)]
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    reference = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
    reference.step()  # populate exp_avg / exp_avg_sq
    dense_step_s = _best(reference.step)
    del reference
    fused = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    fused.step()
    torch_fused_step_s = _best(fused.step)
    del fused
    # kprune's own AdamW, as lib.optim builds it for a run (lib/fused_adam.py's one-pass step).
    settings = Settings(lr=1e-4, beta1=0.9, beta2=0.999, adam_eps=1e-8, amsgrad=False, weight_decay=0.1)
    optimizer = OPTIMIZERS["adamw"]([{"params": params, "weight_decay": 0.1}], settings)
    optimizer.step()

    schedule = Schedule("one-shot", start=1, end=1, final=0.5)
    structure = build_structure(kind, nm_n=2, nm_m=4, block_rows=4, block_cols=4,
                                units=channel_units(params, int(768 * scale)) if kind == "channel" else None)
    try:
        pruner = Pruner([(f"w{i}", p) for i, p in enumerate(params)], schedule, build_method("state", "bitter7"),
                        optimizer, structure=structure, fuse_masking=True)
    except KpruneError as exc:
        raise KnobError(f"BENCH_STRUCTURE={kind} at BENCH_SCALE={scale:g}: {exc}") from None

    gradients = [p.grad.clone() for p in params]
    # Every timed update starts from this trained state: an update zeroes the weights and moments it prunes,
    # and an update over those zeros would find its k-th key in the mass of exact zeros (a trivial case).
    restore = restorer(params, optimizer)

    def backward() -> None:
        """What the next backward pass does: every weight gets a gradient again."""
        for p, g in zip(params, gradients):
            if p.grad is None:
                p.grad = g.clone()

    def fresh_update(after_step: bool = True, measure_memory: bool = False) -> tuple[float, int | None]:
        """One mask update from no pruning: seconds, peak extra bytes (with measure_memory, else None).

        As in training it runs right after a step, so the scores go into the
        spent gradients (which it then frees); with after_step=False it is
        called with the gradients still live and allocates a score buffer.
        The process keeps freed memory resident, as training does, so what an
        update allocates shows in the resident set only after the free pages
        are given back (measure_memory; the timed updates do not).
        """
        pruner.clear()
        restore()
        backward()
        if measure_memory:
            release_free_memory()
        rss_before = _status_bytes("VmRSS")
        measured_peak = _reset_high_water()
        t0 = time.perf_counter()
        pruner.after_step(1) if after_step else pruner.update(1)
        seconds = time.perf_counter() - t0
        return seconds, max(0, _status_bytes("VmHWM") - rss_before) if measured_peak and measure_memory else None

    fresh_update()  # warm-up: first-touch of buffers
    backward()

    def masked_step() -> None:
        pruner.after_backward()
        optimizer.step()

    def unmasked_step() -> None:
        optimizer.masked_params = frozenset()  # what a dense run's step does
        optimizer.step()

    def extra(masked: float, unmasked: float) -> float:
        return (masked - unmasked) / unmasked

    # Back to back in each round: the two are compared with each other, so they share the machine's moods.
    # The gradients of pruned weights are zeroed once, so the unmasked steps leave them pruned too.
    pruner.masks.zero_pruned_grads()
    masked_step_s, kprune_dense_step_s = median_round(rounds([masked_step, unmasked_step], STEP_REPEATS), extra)
    masking_s = _best(pruner.masks.zero_pruned_grads)

    # With gradient clipping: the loop's path (lib/grad_clip.py) and the one it replaced, alternated.
    # torch's clip rescales the gradients in place; the pruned ones stay 0, so every variant keeps them pruned.
    def masked_clipped_step() -> None:
        pruner.after_backward()
        clipped_step(optimizer, params, CLIP)

    def unmasked_clipped_step() -> None:
        optimizer.masked_params = frozenset()
        clipped_step(optimizer, params, CLIP)

    def torch_clipped_step() -> None:
        optimizer.masked_params = frozenset()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()

    def separate_clipped_step() -> None:
        pruner.masks.zero_pruned_grads()
        torch_clipped_step()

    clipped = rounds([masked_clipped_step, unmasked_clipped_step, torch_clipped_step, separate_clipped_step],
                     STEP_REPEATS)
    masked_clipped_s, unmasked_clipped_s = median_round([r[:2] for r in clipped], extra)
    torch_clipped_s, separate_clipped_s = median_round([r[2:] for r in clipped], lambda t, sep: extra(sep, t))

    streams = [torch.empty_like(p) for p in params]  # preallocated float32 outputs

    def stream_pass() -> None:
        for p, out in zip(params, streams):
            torch.mul(p.detach(), optimizer.state[p]["exp_avg_sq"], out=out)

    stream_pass()  # first touch
    for p in params:
        p.grad = None  # backward() gives them their gradients back
    # The yardstick and the update back to back in each round, so that they share the machine's moods.
    paired = []
    for _ in range(REPEATS):
        stream_time = _best(stream_pass, 1)
        paired.append((stream_time, *fresh_update()))
    del streams
    stream_s, update_s, _ = median_round(paired, lambda stream, update, peak: update / stream)
    measured = [fresh_update(measure_memory=True)[1] for _ in range(2)]  # untimed, free pages given back first
    peak_extra = None if None in measured else max(measured)
    _, own_buffer_peak = fresh_update(after_step=False, measure_memory=True)  # the same, with a score buffer
    last = pruner.updates[-1]
    exact = (pruner.masks.count() == last.pruned_count == last.target_count == pruner.pruned_count
             and last.pruned_groups == last.target_groups == target_count(0.5, sum(structure.layer_sizes())))

    def per_weight(peak: int | None) -> float | None:
        return None if peak is None else round(peak / n, 3)

    result = {
        "benchmark": "pruning",
        "params": n,
        "structure": kind,
        "prunable_params": pruner.numel,
        "target_groups": last.target_groups,
        "pruned_groups": last.pruned_groups,
        "scale": scale,
        "mask_update_s": round(update_s, 4),
        "pruned_count_exact": bool(exact),
        "stream_pass_s": round(stream_s, 4),
        "update_vs_stream": round(update_s / stream_s, 2),
        "dense_step_s": round(dense_step_s, 4),
        "torch_fused_step_s": round(torch_fused_step_s, 4),
        "masked_step_s": round(masked_step_s, 4),
        "step_overhead_ratio": round(masked_step_s / dense_step_s, 3),
        "optimizer": type(optimizer).__name__,
        "kprune_unmasked_step_s": round(kprune_dense_step_s, 4),
        "masking_vs_own_step": round((masked_step_s - kprune_dense_step_s) / kprune_dense_step_s, 3),
        "separate_masking_s": round(masking_s, 4),
        "separate_masking_vs_own_step": round(masking_s / kprune_dense_step_s, 3),
        "masked_clipped_step_s": round(masked_clipped_s, 4),
        "kprune_unmasked_clipped_step_s": round(unmasked_clipped_s, 4),
        "masking_vs_own_step_clipped": round((masked_clipped_s - unmasked_clipped_s) / unmasked_clipped_s, 3),
        "torch_clipped_step_s": round(torch_clipped_s, 4),
        "separate_clipped_step_s": round(separate_clipped_s, 4),
        "separate_masking_vs_own_step_clipped": round((separate_clipped_s - torch_clipped_s) / torch_clipped_s, 3),
        "state_bytes_per_weight": round(pruner.masks.state_bytes() / n, 4),
        "peak_extra_bytes_per_weight": per_weight(peak_extra),
        "peak_extra_bytes_per_weight_own_buffer": per_weight(own_buffer_peak),
    }
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
