"""Data-parallel training under torchrun: process group, rank, and agreement checks.

`make train` starts `torchrun` when DDP_NPROC_PER_NODE x DDP_NNODES > 1; each
process then finds WORLD_SIZE, RANK and LOCAL_RANK in its environment.
Inside a Slurm allocation with several nodes, `make train` starts one
`make train` per node with `srun`; each of those reads its node rank, the
head node and the node count from Slurm's environment (`slurm_node`).
Every rank computes the same masks from the same all-reduced gradients; a
digest of the masks is compared across ranks at each update, and only
rank 0 writes results.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

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


def slurm_hostnames(nodelist: str) -> list[str]:
    """Slurm's node list expression (gpu[01-04],cpu7) as host names, by `scontrol show hostnames`."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if result.returncode != 0:
        raise KpruneError(f"scontrol show hostnames {nodelist} failed: {result.stderr.strip()}")
    return result.stdout.split()


@dataclass(frozen=True)
class SlurmNode:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def srun_prefix(env: Mapping[str, str], nnodes: int) -> list[str] | None:
    """In a Slurm allocation but not yet in a job step, with several nodes: the srun that starts
    one process per node (None otherwise). The step keeps the job's CPUs and GPUs per node."""
    if nnodes == 1 or "SLURM_JOB_ID" not in env or "SLURM_STEP_ID" in env:
        return None
    allocated = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 0)
    if allocated < nnodes:
        raise KpruneError(f"DDP_NNODES={nnodes} but this Slurm allocation has {allocated} node(s): "
                          f"ask for {nnodes} (sbatch/salloc --nodes={nnodes}, or make sbatch-train)")
    # srun does not inherit the job's CPUs per task from sbatch (Slurm >= 22.05): pass them on.
    return srun_args(nnodes, env.get("SLURM_CPUS_PER_TASK"), env.get("SLURM_GPUS_PER_NODE"))


def srun_args(nnodes: int, cpus: int | str | None = None, gpus_per_node: int | str | None = None) -> list[str]:
    """srun starting one task per node on `nnodes` nodes; one failing node stops them all."""
    out = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cpus:
        out.append(f"--cpus-per-task={cpus}")
    if gpus_per_node:
        out.append(f"--gpus-per-node={gpus_per_node}")
    return out


def slurm_node(env: Mapping[str, str], nnodes: int, port: int,
               hostnames: Callable[[str], list[str]] | None = None) -> SlurmNode | None:
    """This node's place in the Slurm job step it runs in (one task per node); None outside a step.

    The head node is the first of the step's nodes; this node's rank is its position in that list
    (so rank 0 is on the head, where torchrun's rendezvous listens). The port is DDP_MASTER_PORT
    moved by the job id, so two jobs sharing a head node do not collide.
    """
    if "SLURM_STEP_ID" not in env or "SLURM_JOB_ID" not in env:
        return None
    nodes = (hostnames or slurm_hostnames)(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if len(nodes) != nnodes:
        raise KpruneError(f"DDP_NNODES={nnodes} but this Slurm job step runs on {len(nodes)} node(s) "
                          f"({', '.join(nodes)}): start it with srun --nodes={nnodes} --ntasks-per-node=1")
    here = env.get("SLURMD_NODENAME", "")
    if here not in nodes:
        raise KpruneError(f"this node ({here or 'SLURMD_NODENAME unset'}) is not in the job step's nodes "
                          f"({', '.join(nodes)})")
    moved = 1024 + (port - 1024 + int(env["SLURM_JOB_ID"]) % 1000) % (65536 - 1024)
    return SlurmNode(nnodes=nnodes, node_rank=nodes.index(here), master_addr=nodes[0], master_port=moved)


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
