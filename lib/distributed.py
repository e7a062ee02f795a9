"""Data-parallel training under torchrun: process group, rank, and agreement checks.

`make train` starts `torchrun` when DDP_NPROC_PER_NODE x DDP_NNODES > 1; each
process then finds WORLD_SIZE, RANK and LOCAL_RANK in its environment.
Every rank computes the same masks from the same all-reduced gradients; a
digest of the masks is compared across ranks at each update, and only
rank 0 writes results.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lib.errors import KpruneError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def placement(device: str, backend: str, gpus: int, local_rank: int) -> tuple[str, torch.device]:
    """(backend, this rank's device) for DEVICE=`device` and DDP_BACKEND=`backend` with `gpus` visible.

    DEVICE=cpu trains on the CPU with gloo, GPUs or not. Otherwise CUDA is used when there is a GPU,
    each rank on cuda:LOCAL_RANK whatever the backend; `auto` means nccl on CUDA and gloo on the CPU.
    """
    cuda = device != "cpu" and gpus > 0
    if device == "cuda" and not cuda:
        raise KpruneError("DEVICE=cuda but torch sees no CUDA GPU; set DEVICE=auto or DEVICE=cpu")
    if backend == "nccl" and not cuda:
        why = "DEVICE=cpu trains on the CPU" if device == "cpu" else "torch sees no CUDA GPU"
        raise KpruneError(f"DDP_BACKEND=nccl needs CUDA GPUs but {why}: set DDP_BACKEND=gloo (or auto)")
    if not cuda:
        return "gloo", torch.device("cpu")
    if local_rank >= gpus:
        raise KpruneError(f"rank with LOCAL_RANK={local_rank} has no GPU of its own ({gpus} visible): "
                          f"set DDP_NPROC_PER_NODE to at most {gpus}")
    return ("nccl" if backend == "auto" else backend), torch.device("cuda", local_rank)


def init(device_setting: str, backend: str, expected_world: int) -> torch.device:
    """Join the process group torchrun set up; returns this rank's device."""
    size = int(os.environ["WORLD_SIZE"])
    if size != expected_world:
        raise KpruneError(f"torchrun started {size} processes but DDP_NPROC_PER_NODE x DDP_NNODES is "
                          f"{expected_world}: start runs with make train so the two agree")
    gpus = torch.cuda.device_count() if device_setting != "cpu" else 0
    backend, device = placement(device_setting, backend, gpus, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return device


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_(t: torch.Tensor) -> torch.Tensor:
    """`t` averaged over all ranks in place, on its device, without waiting for the result."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def shard_sum(values: Iterable[Callable[[], torch.Tensor]], device: torch.device) -> list[float]:
    """The element-wise sum of every value, each rank computing its share: item i on rank i % world size.

    `values` yields one thunk per item, in the same order on every rank (drawing a batch as it goes,
    so every rank's generator advances alike); only this rank's thunks run, each returning a 0-d or
    1-d tensor of the same length. The partial sums stay on the device and meet in one all-reduce.
    DDP broadcasts buffers (BatchNorm statistics) at the first forward pass after training only, so
    every rank needs a share: as many items as ranks or more.
    """
    rank, size = world()
    total = None
    for i, value in enumerate(values):
        if i % size == rank:
            v = value().detach().double().reshape(-1)
            total = v if total is None else total + v
    if total is None:
        raise KpruneError(f"rank {rank} has nothing to evaluate: fewer evaluation batches than the {size} ranks")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total.tolist()


def step_stats(loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """(the step's loss averaged over ranks, whether any rank was asked to stop), in one reduction.

    `loss` is this rank's step loss, still on the device. The loss and the stop flag travel in one
    float64 tensor: one all-reduce per step under DDP, and one wait for the device.
    """
    flag = torch.tensor(float(stop_requested), dtype=torch.float64, device=loss.device)
    value, stop = mean_(torch.stack([loss.detach().double(), flag])).tolist()
    return value, stop > 0


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel | None:
    """`model` in DistributedDataParallel under torchrun with more than one rank, else None."""
    if world()[1] <= 1:
        return None
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def accumulating(ddp: DistributedDataParallel | None, micro: int, accum: int):
    """The context for micro-batch `micro` of `accum`: no gradient all-reduce before the last one."""
    return ddp.no_sync() if ddp is not None and micro < accum - 1 else contextlib.nullcontext()


def mask_checksum(bits: list[torch.Tensor]) -> int:
    """A 63-bit digest (BLAKE2b) of every mask's bytes and length, in order.

    A weighted sum of the bytes cannot tell apart masks that prune as many
    weights in other places (bytes 1,0,0,1 and 0,1,1,0 weigh the same); a
    cryptographic digest changes with any moved bit. The masks are one bit
    per weight, so copying them to the CPU at a mask update is cheap.
    """
    digest = hashlib.blake2b(digest_size=8)
    for b in bits:
        data = b.detach().to("cpu").contiguous().numpy()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data.data)
    return int.from_bytes(digest.digest(), "little") >> 1  # fits an int64 for all_reduce


def check_masks_agree(bits: list[torch.Tensor], step: int) -> None:
    """Stop the run if any rank's masks differ from the others'."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    device = bits[0].device
    local = torch.tensor([mask_checksum(bits)], dtype=torch.int64, device=device)
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low) != int(high):
        raise KpruneError(f"the masks differ across ranks after the update at step {step} "
                          f"(checksums {int(low)} .. {int(high)}); the ranks no longer train the same model")


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (just [obj] outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
