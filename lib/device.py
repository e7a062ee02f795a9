"""Device choice and reproducibility."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from lib import distributed
from lib.errors import KpruneError


def pick_device(name: str) -> torch.device:
    """`auto` | `cpu` | `cuda` -> a torch device (CUDA device 0 for cuda)."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KpruneError("DEVICE=cuda but torch sees no CUDA GPU; set DEVICE=auto or DEVICE=cpu "
                          "(make train SET=\"DEVICE=cpu\")")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS.

    By default glibc serves large blocks (GPT-2's 50k-wide logits) with mmap
    and unmaps them on free, so every step faults the same pages in again;
    on CPU that costs GPT-2 ~40% of its step time. This is what
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> do, set from inside the
    process so standalone trainer runs get it too. Returns False where the C
    library is not glibc (nothing changes there).
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h> constants
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**30))


def release_free_memory() -> bool:
    """Give the free pages of glibc's heap back to the OS (malloc_trim), which keep_freed_memory keeps
    resident: what a measurement of the resident set needs before it can see new allocations. False where
    the C library is not glibc."""
    malloc_trim = _glibc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def _glibc_function(name: str):
    """The C library's function `name`, or None where it has none (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def configure_backends(s, device: torch.device) -> None:
    """TF32 and determinism on CUDA, as `s` says; the CPU needs neither (its kernels are deterministic)."""
    if device.type != "cuda":
        return
    # The fp32_precision API (torch >= 2.9): the older allow_tf32 flags are deprecated, and mixing
    # the two APIs is an error under torch.compile.
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        precision = "tf32" if s.tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # an older torch on a GPU node's own environment
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s.tf32
    if s.deterministic:
        # cuBLAS reads this when it creates its handle, at the first matmul: still ahead of us here.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(s.deterministic)
    torch.backends.cudnn.deterministic = s.deterministic
    torch.backends.cudnn.benchmark = not s.deterministic  # autotuning picks the fastest, run to run varying


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` has real bf16 arithmetic (CUDA compute capability 8.0+, i.e. Ampere and newer).

    torch.cuda.is_bf16_supported() also says yes on older GPUs, where bf16 is emulated and slower than fp32.
    """
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_for(s, device: torch.device):
    """A context-manager factory: bf16 autocast where configured, else a no-op."""
    use_bf16 = s.precision == "bf16" or (s.precision == "auto" and bf16_supported(device))
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a clock read after it bills them to the right step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_precision(precision, loss_fn):
    """`loss_fn` run under `precision` (what autocast_for returns), for methods that take extra passes."""
    def loss(m, batch):
        with precision():
            return loss_fn(m, batch)
    return loss


def prepare_process(s) -> torch.device:
    """Set this process up to train as `s` says (process group under torchrun, threads, seeds, backends);
    returns the device it trains on."""
    if distributed.launched_by_torchrun():
        device = distributed.init(s.device, s.ddp_backend, s.ddp_nproc_per_node * s.ddp_nnodes)
    else:
        device = pick_device(s.device)
    if device.type == "cpu":
        keep_freed_memory()
    set_threads(s.threads)
    seed_everything(s.seed, device)
    configure_backends(s, device)
    return device
