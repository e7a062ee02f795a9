"""The checks `make check-gpu` runs: each CUDA path of kprune, exercised for real on one device.

Each check takes the device (and a scratch directory), runs the path on it and returns what it
measured; it raises CheckFailed (or anything else) when the path does not work. `run_checks`
prints one JSON line per check and a summary line, and returns the exit status: 1 if any failed.
The checks take the device as a parameter, so those a CPU can run are tested on the CPU
(tests/lib/test_gpu_checks.py); on the GPU the same code runs against CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lib import distributed, optim
from lib.device import autocast_for, bf16_supported, configure_backends, pick_device
from lib.kconfig import REPO_ROOT, apply_overrides, read_config, settings_from_kconfig

# A few dozen steps of tiny GPT-2 on the bundled Shakespeare tokens: seconds on a GPU.
TINY_RUN = ["MAX_ITERS=12", "EVAL_INTERVAL=12", "LOG_INTERVAL=4", "GPT2_EVAL_ITERS=2", "LR_WARMUP_ITERS=2",
            "BATCH_SIZE=4", "GPT2_BLOCK_SIZE=64"]
SCHEDULE = ["SCHEDULE_START=2", "SCHEDULE_END=10", "SCHEDULE_FREQUENCY=2"]  # updates at 2, 4, 6, 8, 10


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def gpt2_settings(device: torch.device, out_dir: Path, *overrides: str, prune: bool = True):
    """Settings of a tiny gpt2-bitter7 run (or unpruned AdamW) on `device` writing into `out_dir`."""
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "gpt2-bitter7")
    method = SCHEDULE if prune else ["PRUNING_METHOD_NONE=y", "OPTIMIZER_ADAMW=y"]
    given = [*TINY_RUN, *method, f"DEVICE={device.type}", f"DATA_DIR={REPO_ROOT / 'data'}",
             f"OUTPUT_DIR={out_dir}", "THREADS=0", *overrides]
    merged = {item.split("=", 1)[0]: item for item in given}  # a later value of a symbol replaces an earlier one
    apply_overrides(kconf, seen, list(merged.values()))
    return settings_from_kconfig(kconf)


def train_tiny(settings, wrap: Callable = lambda task: None) -> tuple[int, Path]:
    """Run the GPT-2 trainer in this process; (exit status, run directory). Its output is kept quiet."""
    from gpt2.train import build_task
    from lib.train_loop import run

    def build(s, device):
        task = build_task(s, device)
        wrap(task)
        return task
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        code = run(settings, build, command=["check-gpu"])
    return code, Path(out.getvalue().strip().splitlines()[-1].removeprefix("results: "))


# ---------------------------------------------------------------------------------- the checks

def check_device_auto(device: torch.device, workdir: Path) -> dict:
    picked = pick_device("auto")
    expect(picked.type == device.type, f"DEVICE=auto picked {picked}, not {device.type}")
    return {"picked": str(picked)}


def check_bf16_and_tf32(device: torch.device, workdir: Path) -> dict:
    precision = "auto" if device.type == "cuda" else "bf16"  # auto means fp32 on a CPU
    settings = type("S", (), {"precision": precision, "tf32": True, "deterministic": False})()
    if device.type == "cuda":
        expect(bf16_supported(device), f"{torch.cuda.get_device_name(device)} has no real bf16: PRECISION=auto "
                                       "trains in fp32 here")
    configure_backends(settings, device)
    a = torch.randn(64, 64, device=device)
    with autocast_for(settings, device)():
        product = a @ a
    expect(product.dtype == torch.bfloat16, f"autocast gave {product.dtype}, not bfloat16")
    out = {"autocast_dtype": str(product.dtype)}
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.fp32_precision
        expect(tf32 == "tf32", f"TF32=y left matmul fp32_precision at {tf32!r}")
        out["matmul_fp32_precision"] = tf32
    return out


def check_compile_gpt2(device: torch.device, workdir: Path) -> dict:
    from gpt2.model import GPT, config_for

    torch.manual_seed(0)
    model = GPT(config_for("tiny", 64, 0.0)).to(device)
    x = torch.randint(0, 50257, (2, 64), device=device)
    eager = model(x, x)[1]
    start = time.perf_counter()
    compiled = torch.compile(model)
    loss = compiled(x, x)[1]
    loss.backward()
    seconds = time.perf_counter() - start
    expect(torch.isfinite(loss).item(), "the compiled GPT-2's loss is not finite")
    expect(abs(loss.item() - eager.item()) < 1e-3, f"compiled loss {loss.item()} != eager {eager.item()}")
    expect(all(p.grad is not None for p in model.parameters() if p.requires_grad), "gradients missing")
    return {"compile_and_step_s": round(seconds, 2), "loss": loss.item()}


def check_fused_adamw(device: torch.device, workdir: Path) -> dict:
    from gpt2.model import GPT, config_for

    # kprune's one-pass AdamW (lib/fused_adam.py): on CUDA its arithmetic compiled into one kernel per
    # parameter. It must match the CPU's C kernel, and keep masked zero weights at zero.
    torch.manual_seed(0)
    model = GPT(config_for("tiny", 64, 0.0))
    with torch.no_grad():
        model.lm_head.weight.view(-1)[::2] = 0.0  # "pruned" half of the (tied) output layer
    twin = copy.deepcopy(model)
    model = model.to(device)
    settings = gpt2_settings(device, workdir, prune=False)
    opt, cpu_opt = optim.build_optimizer(model, settings), optim.build_optimizer(twin, settings)
    expect(type(opt).__name__ == "KpruneAdamW", f"{type(opt).__name__} is not kprune's one-pass AdamW")
    opt.masked_params = frozenset([id(model.lm_head.weight)])
    cpu_opt.masked_params = frozenset([id(twin.lm_head.weight)])
    x = torch.randint(0, 50257, (2, 64))
    model(x.to(device), x.to(device))[1].backward()
    twin(x, x)[1].backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.cpu()  # the same gradients on both sides
    opt.step()
    cpu_opt.step()
    diff = max(float((p.detach().cpu() - q.detach()).abs().max())
               for p, q in zip(model.parameters(), twin.parameters()))
    expect(diff < 1e-6, f"the {device.type} step differs from the CPU's by {diff:.3g}")
    kept_zero = bool((model.lm_head.weight.view(-1)[::2] == 0).all())
    expect(kept_zero, "a masked zero weight moved in the step")
    return {"optimizer": type(opt).__name__, "fused": True, "max_abs_diff_vs_cpu": diff}


def check_exact_selection(device: torch.device, workdir: Path) -> dict:
    """The same scores select the same weights on `device` as on the CPU, exactly k of them."""
    from lib.pruning.build import build_pruner

    settings = gpt2_settings(device, workdir)  # bitter7 needs the optimizer state: magnitude here
    settings = dataclasses.replace(settings, pruning_method="magnitude")
    gen = torch.Generator().manual_seed(5)
    # Many exact ties: the tie-break must agree across devices too.
    weights = [torch.randint(-50, 50, shape, generator=gen).float() / 7 for shape in [(300, 200), (1000,), (64, 64)]]
    masks = []
    for where in (torch.device("cpu"), device):
        params = [torch.nn.Parameter(w.clone().to(where)) for w in weights]
        opt = torch.optim.SGD(params, lr=0.0)
        pruner, _ = build_pruner(settings, [(f"w{i}", p) for i, p in enumerate(params)], opt, 0)
        update = pruner.update(settings.schedule_end)
        expect(update.pruned_count == update.target_count,
               f"{where}: pruned {update.pruned_count}, target {update.target_count}")
        masks.append([b.cpu() for b in pruner.masks.bits])
    expect(all(torch.equal(a, b) for a, b in zip(*masks)), f"{device} selects other weights than the CPU")
    return {"pruned": update.pruned_count}


def check_train_masks_memory_prefetch(device: torch.device, workdir: Path) -> dict:
    """Real steps: masks exact at every update, pruned weights never revive, batches prefetched through
    pinned host memory on CUDA, and the summary reports the device's peak memory."""
    pinned, real_pin = [], torch.Tensor.pin_memory

    def pin_and_note(tensor, *args, **kwargs):  # every batch's host copy, made in the prefetch thread
        out = real_pin(tensor, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out
    torch.Tensor.pin_memory = pin_and_note
    try:
        code, run_dir = train_tiny(gpt2_settings(device, workdir, "DATA_WORKERS=2"))
    finally:
        torch.Tensor.pin_memory = real_pin
    summary = json.loads((run_dir / "summary.json").read_text())
    expect(code == 0 and summary["status"] == "complete", f"run ended {summary['status']}: {summary.get('error')}")
    expect(summary["target_count_exact"], "a mask update missed its exact target")
    counts = [u["pruned_count"] for u in summary["mask_updates"]]
    expect(len(counts) > 1 and counts == sorted(counts), f"pruned counts over the updates: {counts}")
    expect(summary["final_pruned_count"] >= summary["mask_pruned_count"],
           f"pruned weights revived: {summary['final_pruned_count']} zeros < {summary['mask_pruned_count']} masked")
    out = {"mask_updates": len(counts), "final_sparsity": summary["final_sparsity"]}
    if device.type == "cuda":
        peak = summary["memory"].get("cuda_max_allocated")
        expect(bool(peak), "no CUDA peak memory (memory.cuda_max_allocated) in the summary")
        expect(len(pinned) > 0 and all(pinned), f"batches were not copied from pinned host memory "
                                                f"({sum(pinned)} of {len(pinned)} pinned)")
        out.update(cuda_max_allocated=peak, pinned_batches=len(pinned))
    return out


def check_ddp_one_allreduce(device: torch.device, workdir: Path, accum: int = 4, steps: int = 3) -> dict:
    """nccl (gloo on a CPU) DDP, world size 1: one gradient all-reduce per optimizer step under
    accumulation and torch.compile."""
    from gpt2.model import GPT, config_for
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    backend, _ = distributed.placement(device.type, "auto", torch.cuda.device_count(), 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        model = GPT(config_for("tiny", 64, 0.0)).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        calls = []
        ddp.register_comm_hook(None, lambda state, bucket: (calls.append(1), allreduce_hook(state, bucket))[1])
        compiled = torch.compile(ddp)
        x = torch.randint(0, 50257, (2, 64), device=device)

        def step(micro_batches: int) -> int:
            before = len(calls)
            for micro in range(micro_batches):
                with distributed.accumulating(ddp, micro, micro_batches):
                    compiled(x, x)[1].backward()
            return len(calls) - before
        step(1)  # DDP sizes its buckets after the first step: count from the second on
        one_round = step(1)  # the all-reduce calls (one per bucket) of a step without accumulation
        per_step = [step(accum) for _ in range(steps)]
    finally:
        dist.destroy_process_group()
    expect(one_round > 0 and per_step == [one_round] * steps,
           f"gradient all-reduce calls per step of {accum} micro-batches: {per_step}; one round is {one_round}")
    return {"backend": backend, "allreduce_calls_per_step": one_round, "micro_batches": accum}


def check_checkpoint_resume(device: torch.device, workdir: Path) -> dict:
    """An interrupted run resumed on the device ends with the masks and (within tolerance) the loss of an
    uninterrupted one. DETERMINISTIC=y: atomics in CUDA backward kernels (embedding gradients) would
    otherwise let two runs part by rounding, and near-ties in the scores with them."""
    try:
        return _checkpoint_resume(device, workdir)
    finally:
        torch.use_deterministic_algorithms(False)  # what the runs switched on stays with them


def _checkpoint_resume(device: torch.device, workdir: Path) -> dict:
    stop_at = 6
    repeatable = [f"CHECKPOINT_INTERVAL={stop_at}", "DETERMINISTIC=y"]
    code, straight = train_tiny(gpt2_settings(device, workdir / "straight", *repeatable))
    expect(code == 0, f"the uninterrupted run failed ({code})")
    interrupted = gpt2_settings(device, workdir / "resumed", *repeatable)

    def stop_after(task):
        make, drawn = task.next_batch, []

        def next_batch():
            drawn.append(1)
            if len(drawn) == stop_at + 1:
                os.kill(os.getpid(), signal.SIGTERM)  # stop after this step, as a scheduler would
            return make()
        task.next_batch = next_batch
    code, run_dir = train_tiny(interrupted, stop_after)
    expect(code == 130, f"the run to interrupt ended with {code}, not 130")
    code, run_dir = train_tiny(gpt2_settings(device, workdir / "resumed", *repeatable, f"RESUME_FROM={run_dir}"))
    expect(code == 0, f"the resumed run failed ({code})")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, run_dir))
    expect([u["pruned_count"] for u in a["mask_updates"]] == [u["pruned_count"] for u in b["mask_updates"]],
           "the resumed run's mask updates differ")
    masks_a, masks_b = (torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False)["pruner"]["bits"]
                        for d in (straight, run_dir))
    expect(len(masks_a) == len(masks_b) and all(torch.equal(x, y) for x, y in zip(masks_a, masks_b)),
           "the resumed run's masks differ from the uninterrupted run's")
    gap = abs(a["final_train_loss"] - b["final_train_loss"])
    expect(gap <= 1e-3 * max(1.0, abs(a["final_train_loss"])), f"final loss {b['final_train_loss']} vs {a['final_train_loss']}")
    return {"final_loss_gap": gap}


def check_semi_structured_24(device: torch.device, workdir: Path) -> dict:
    """A 2:4-pruned Linear as torch's semi-structured sparse tensor: same outputs, and its latency."""
    from torch.sparse import to_sparse_semi_structured

    expect(device.type == "cuda", "2:4 semi-structured kernels need a CUDA GPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 768, bias=True).to(device).to(torch.bfloat16)
    w = linear.weight.detach()
    groups = w.view(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    linear.weight.data = (groups * keep).view_as(w)
    x = torch.randn(4096, 3072, device=device, dtype=torch.bfloat16)
    dense_out = linear(x)
    dense_ms = _latency_ms(lambda: linear(x))
    linear.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
    sparse_out = linear(x)
    sparse_ms = _latency_ms(lambda: linear(x))
    err = (sparse_out.float() - dense_out.float()).abs().max().item()
    expect(err <= 0.05 * dense_out.float().abs().max().item(), f"2:4 outputs differ from dense by {err}")
    return {"dense_ms": round(dense_ms, 4), "sparse_24_ms": round(sparse_ms, 4),
            "speedup": round(dense_ms / sparse_ms, 3), "max_abs_diff": err}


def _latency_ms(fn: Callable, repeats: int = 50) -> float:
    """Median milliseconds of `fn` on CUDA, synchronized around each call."""
    with torch.no_grad():
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


CHECKS: list[tuple[str, Callable[[torch.device, Path], dict]]] = [
    ("device_auto", check_device_auto),
    ("bf16_autocast_and_tf32", check_bf16_and_tf32),
    ("compile_gpt2", check_compile_gpt2),
    ("fused_adamw", check_fused_adamw),
    ("exact_selection_equals_cpu", check_exact_selection),
    ("masks_exact_prefetch_peak_memory", check_train_masks_memory_prefetch),
    ("ddp_one_allreduce_per_step", check_ddp_one_allreduce),
    ("checkpoint_resume", check_checkpoint_resume),
    ("semi_structured_2of4", check_semi_structured_24),
]


def run_checks(checks, device: torch.device, emit: Callable[[str], None] = print) -> int:
    """Run each (name, check) on `device`; one JSON line each, then a summary line. 1 if any failed."""
    failed = []
    for name, check in checks:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"kprune-check-{name}-") as scratch:
            try:
                line = {"check": name, "ok": True, **check(device, Path(scratch))}
            except Exception as exc:  # a failing path is a result to report, and the next check still runs
                line = {"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
                failed.append(name)
        line["seconds"] = round(time.perf_counter() - start, 2)
        emit(json.dumps(line, sort_keys=True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit(json.dumps({"summary": "check-gpu", "device": name, "torch": torch.__version__,
                     "passed": len(checks) - len(failed), "failed": failed}, sort_keys=True))
    return 1 if failed else 0
