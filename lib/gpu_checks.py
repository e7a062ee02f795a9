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
import warnings
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
    """Real steps: masks exact at every update, pruned weights never revive, kept at zero by kprune's
    AdamW step itself (no separate masking pass), batches prefetched through pinned host memory on
    CUDA, and the summary reports the device's peak memory."""
    from lib.pruning.masks import MaskSet
    from lib.pruning.pruner import Pruner

    pinned, real_pin = [], torch.Tensor.pin_memory
    masked_steps, separate_passes = [], []
    real_after_backward, real_separate = Pruner.after_backward, MaskSet.zero_pruned_grads

    def pin_and_note(tensor, *args, **kwargs):  # every batch's host copy, made in the prefetch thread
        out = real_pin(tensor, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out

    def after_backward_and_note(pruner):  # what the next optimizer step is told to mask
        real_after_backward(pruner)
        if pruner.masks.pruned_count:
            pool = frozenset(id(p) for p in pruner.masks.params)
            masked_steps.append((pruner.fused_masking, getattr(pruner.optimizer, "masked_params", None) == pool))

    def separate_and_note(masks):
        separate_passes.append(1)
        real_separate(masks)
    torch.Tensor.pin_memory = pin_and_note
    Pruner.after_backward, MaskSet.zero_pruned_grads = after_backward_and_note, separate_and_note
    try:
        # The defconfigs' GRAD_CLIP (1.0): the clipped step masks inside kprune's step too (lib/grad_clip.py).
        code, run_dir = train_tiny(gpt2_settings(device, workdir, "DATA_WORKERS=2"))
    finally:
        torch.Tensor.pin_memory = real_pin
        Pruner.after_backward, MaskSet.zero_pruned_grads = real_after_backward, real_separate
    summary = json.loads((run_dir / "summary.json").read_text())
    expect(code == 0 and summary["status"] == "complete", f"run ended {summary['status']}: {summary.get('error')}")
    expect(summary["target_count_exact"], "a mask update missed its exact target")
    counts = [u["pruned_count"] for u in summary["mask_updates"]]
    expect(len(counts) > 1 and counts == sorted(counts), f"pruned counts over the updates: {counts}")
    expect(summary["final_pruned_count"] >= summary["mask_pruned_count"],
           f"pruned weights revived: {summary['final_pruned_count']} zeros < {summary['mask_pruned_count']} masked")
    optimizer = summary["optimizer"]["class"]
    expect(optimizer in ("KpruneAdam", "KpruneAdamW"), f"the run stepped with {optimizer}, not kprune's Adam/AdamW")
    expect(bool(masked_steps) and all(fused for fused, _ in masked_steps),
           f"the pruner masked in a pass of its own (fused_masking False) in "
           f"{sum(not fused for fused, _ in masked_steps)} of {len(masked_steps)} pruned steps")
    expect(all(told for _, told in masked_steps), "a pruned step's optimizer was not told to mask the pruned pool")
    expect(not separate_passes, f"the separate masking pass ran {len(separate_passes)} times beside the fused step")
    out = {"mask_updates": len(counts), "final_sparsity": summary["final_sparsity"], "optimizer": optimizer,
           "fused_masking": True, "masked_steps": len(masked_steps), "separate_masking_passes": 0}
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


@contextlib.contextmanager
def device_waits(device: torch.device):
    """Collect, as the block runs, every operation that made the host wait for a CUDA device (CUDA's
    sync debug mode warns of each). On a CPU nothing waits and the list stays empty."""
    found: list[str] = []
    if device.type != "cuda":
        yield found
        return
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(before)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


def _pruner_one_step_in(device: torch.device, layers: int, rows: int):
    """A bitter5 pruner over `layers` weights [rows, 768] on `device`, and a function that runs one AdamW step."""
    from lib.pruning.methods import build_method
    from lib.pruning.pruner import Pruner
    from lib.pruning.schedules import Schedule

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(rows, 768, device=device)) for _ in range(layers)]
    opt = torch.optim.AdamW(weights, lr=1e-3)
    pruner = Pruner([(f"w{i}", w) for i, w in enumerate(weights)], Schedule("linear", start=1, end=3, final=0.5),
                    build_method("state", "bitter5"), opt)

    def step() -> None:
        for w in weights:
            w.grad = torch.randn_like(w)
        opt.step()
    return pruner, step


def check_mask_update_memory_and_waits(device: torch.device, workdir: Path) -> dict:
    """A mask update's recorded score memory (summary.json's mask_update_peak) is what the CUDA allocator
    saw it hold while scoring, chunked score included; and it waits for the device as often for 8
    weights as for 2 (not once per parameter)."""
    from lib.pruning.scores import GPU_SCORE_CHUNK, SCORE_CHUNK

    chunk = SCORE_CHUNK if device.type == "cpu" else GPU_SCORE_CHUNK
    pruner, step = _pruner_one_step_in(device, 2, 2 * chunk // 768 + 8)  # each weight is scored in 3 chunks
    step()
    pruner.after_step(1)  # sparsity 0: nothing pruned yet
    step()
    score, peaks = pruner.method.score, []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)

        def measured(*args):
            torch.cuda.reset_peak_memory_stats(device)
            score(*args)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        pruner.method.score = measured
    update = pruner.after_step(2)  # scores written into the spent gradients
    expect(update.pruned_count == update.target_count > 0, f"pruned {update.pruned_count} of {update.target_count}")
    recorded = pruner.peak_score_bytes
    expect(recorded > 0, "the update recorded no score memory: bitter5's intermediates are missing")
    out = {"recorded_peak_bytes": recorded}
    if peaks:
        # The caching allocator may hand out a block up to 1 MiB larger than asked (it splits no smaller
        # remainder), per intermediate; a wrong count of intermediates is off by 16 MiB or more.
        expect(abs(max(peaks) - recorded) <= 4 << 20, f"scoring held {max(peaks)} bytes at its peak, "
                                                      f"{recorded} recorded")
        out["measured_peak_bytes"] = max(peaks)
    waits = []
    for layers in (2, 8):
        pruner, step = _pruner_one_step_in(device, layers, 64)
        for update_step in (1, 2):
            step()
            pruner.after_step(update_step)
        step()
        with device_waits(device) as found:
            pruner.after_step(3)  # keeps the pruned weights pruned and prunes more
        waits.append(len(found))
    expect(waits[0] == waits[1], f"a mask update waited for the device {waits[0]} times over 2 weights and "
                                 f"{waits[1]} times over 8: once per parameter")
    return {**out, "device_waits_per_update": waits[0]}


def check_spt_and_spam_stay_on_device(device: torch.device, workdir: Path) -> dict:
    """SPT draws its exploration on the device from its own generator (restored from its state, it
    draws the same), and neither SPT's probe nor AdamWSPAM's step waits for the device."""
    from lib.pruning.masks import MaskSet
    from lib.pruning.methods import SPT, Observation
    from lib.spam import AdamWSPAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)
    batch = (torch.randn(16, 64, device=device), torch.randn(16, 8, device=device))

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    def spt() -> SPT:
        masks = MaskSet([("0.weight", model[0].weight), ("2.weight", model[2].weight)])
        method = SPT(epsilon=0.2, alpha=0.9, seed=3, last_step=100)
        method.bind(masks.params, masks.pruned)
        return method
    first = spt()
    expect(first.generator.device.type == device.type, f"SPT draws on {first.generator.device}, not {device}")
    opt = AdamWSPAM(model.parameters(), lr=1e-3, theta=1.0, interval=3, warmup=1)  # clips spikes, resets moments
    with device_waits(device) as found:
        for step in range(1, 5):
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            first.observe(Observation(step, model, batch, loss_fn, loss.detach()))
            opt.step()
    expect(not found, f"SPT's probe or AdamWSPAM's step waited for the device {len(found)} times: {found[:1]}")
    second = spt()
    second.load_state_dict(first.state_dict())
    loss = loss_fn(model, batch).detach()
    for method in (first, second):
        method.observe(Observation(5, model, batch, loss_fn, loss))
    expect(all(torch.equal(a, b) for a, b in zip(first.rewards, second.rewards)),
           "an SPT restored from its state explored other weights than the original")
    return {"generator_device": str(first.generator.device), "device_waits": len(found)}


def check_semi_structured_24(device: torch.device, workdir: Path) -> dict:
    """2:4-pruned Linear layers as torch's semi-structured sparse tensors: same outputs, and their latency.

    First a GPT-2 pruned 2:4 in every block, written as an nm run leaves it (final model, masks,
    summary) and loaded as make evaluate and make sample load a run's model (scripts/evaluate.py
    `load_model`, computing under bf16 autocast): every block layer converted, the tied output layer
    left dense, the logits within TOLERANCE of the largest dense logit. A CPU converts nothing and the
    check fails saying so. Then a 124M MLP projection alone: its latency dense and on the 2:4 kernels
    (what bench-gpu reports).
    """
    from safetensors.torch import save
    from torch.sparse import SparseSemiStructuredTensor

    from gpt2.model import GPT, GPTConfig
    from lib.export import MASKS_FILE, final_model_files
    from lib.semi_structured import TOLERANCE, backend, keep_two_of_four, to_semi_structured
    from scripts.evaluate import load_model

    torch.manual_seed(0)
    # a 4,096-token vocabulary: the output layer stays dense either way, and the files written stay small
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_size=4096)).eval()
    pruned = set()
    for i, block in enumerate(model.blocks):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            keep_two_of_four(block.get_submodule(name).weight.data)
            pruned.add(f"blocks.{i}.{name}.weight")
    for name, data in final_model_files(model, "gpt2-check", 0).items():
        (workdir / name).write_bytes(data)
    masks = {name: (model.get_parameter(name) == 0).contiguous() for name in sorted(pruned)}
    (workdir / MASKS_FILE).write_bytes(save(masks, metadata={"kprune": json.dumps({"meaning": "True = pruned"})}))
    (workdir / "summary.json").write_text(json.dumps({"sparsity_structure": {"kind": "nm", "n": 2, "m": 4}}))
    with contextlib.redirect_stderr(io.StringIO()) as said:
        sparse, _ = load_model(workdir, device, half=torch.bfloat16)
    converted = sorted(name for name, module in sparse.named_modules()
                       if isinstance(getattr(module, "weight", None), SparseSemiStructuredTensor))
    expect(converted == sorted(n.removesuffix(".weight") for n in pruned),
           f"converted {converted}; loading said: {said.getvalue().strip()}")
    expect("left dense: lm_head: not pruned by the run" in said.getvalue(), f"loading said: {said.getvalue()}")
    idx = torch.randint(0, 4096, (4, 128), device=device)
    dense = model.to(device)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
        dense_logits, sparse_logits = dense(idx)[0].float(), sparse(idx)[0].float()
    model_err = (sparse_logits - dense_logits).abs().max().item()
    bound = TOLERANCE * dense_logits.abs().max().item()
    expect(model_err <= bound, f"2:4 GPT-2 logits differ from dense by {model_err} (allowed {bound})")

    linear = torch.nn.Linear(3072, 768, bias=True).to(device).to(torch.bfloat16)
    keep_two_of_four(linear.weight.data)
    x = torch.randn(4096, 3072, device=device, dtype=torch.bfloat16)
    dense_out = linear(x)
    dense_ms = _latency_ms(lambda: linear(x))
    linear.weight = torch.nn.Parameter(to_semi_structured(linear.weight), requires_grad=False)
    sparse_out = linear(x)
    sparse_ms = _latency_ms(lambda: linear(x))
    err = (sparse_out.float() - dense_out.float()).abs().max().item()
    expect(err <= TOLERANCE * dense_out.float().abs().max().item(), f"2:4 outputs differ from dense by {err}")
    return {"dense_ms": round(dense_ms, 4), "sparse_24_ms": round(sparse_ms, 4),
            "speedup": round(dense_ms / sparse_ms, 3), "max_abs_diff": err,
            "backend": backend().BACKEND, "gpt2_layers_converted": len(converted),
            "gpt2_logits_max_abs_diff": model_err,
            "tolerance": f"{TOLERANCE:g} x max |dense output|"}


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
    ("mask_update_memory_and_waits", check_mask_update_memory_and_waits),
    ("spt_and_spam_stay_on_device", check_spt_and_spam_stay_on_device),
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
