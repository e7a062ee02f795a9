"""CPU-side parts of the GPU paths: device and backend rules, one reduction per step, per-rank RNG,
determinism switches, and DDP all-reducing gradients once per optimizer step under accumulation."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lib import distributed
from lib.checkpoint import own_rng_state, rng_state, set_rng_state
from lib.device import autocast_for, bf16_supported, configure_backends
from lib.errors import KpruneError

CPU = torch.device("cpu")


def test_device_cpu_means_gloo_on_the_cpu_even_with_gpus():
    assert distributed.placement("cpu", "auto", gpus=4, local_rank=1) == ("gloo", CPU)
    with pytest.raises(KpruneError, match="DDP_BACKEND=nccl.*DEVICE=cpu"):
        distributed.placement("cpu", "nccl", gpus=4, local_rank=1)


def test_on_cuda_every_rank_gets_its_own_gpu_whatever_the_backend():
    assert distributed.placement("auto", "auto", gpus=4, local_rank=2) == ("nccl", torch.device("cuda", 2))
    assert distributed.placement("cuda", "gloo", gpus=4, local_rank=3) == ("gloo", torch.device("cuda", 3))
    with pytest.raises(KpruneError, match="LOCAL_RANK=4.*at most 4"):
        distributed.placement("auto", "auto", gpus=4, local_rank=4)


def test_without_gpus_auto_is_gloo_and_nccl_or_cuda_are_refused():
    assert distributed.placement("auto", "auto", gpus=0, local_rank=1) == ("gloo", CPU)
    with pytest.raises(KpruneError, match="nccl needs CUDA"):
        distributed.placement("auto", "nccl", gpus=0, local_rank=0)
    with pytest.raises(KpruneError, match="DEVICE=cuda"):
        distributed.placement("cuda", "auto", gpus=0, local_rank=0)


def test_auto_precision_is_fp32_without_real_bf16():
    settings = SimpleNamespace(precision="auto")
    assert not bf16_supported(CPU)
    with autocast_for(settings, CPU)():
        assert torch.get_autocast_dtype("cpu") is not None and not torch.is_autocast_enabled("cpu")


@pytest.fixture
def restore_backends():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.conv.fp32_precision, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[3], saved[4]
    if saved[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_deterministic_on_cuda_is_complete_and_off_lets_cudnn_autotune(restore_backends, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = torch.device("cuda", 0)
    configure_backends(SimpleNamespace(tf32=True, deterministic=True), cuda)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" == torch.backends.cudnn.conv.fp32_precision
    configure_backends(SimpleNamespace(tf32=False, deterministic=False), cuda)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" == torch.backends.cudnn.conv.fp32_precision


def test_cpu_runs_leave_the_backends_alone(restore_backends):
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    configure_backends(SimpleNamespace(tf32=True, deterministic=not before[0]), CPU)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_a_rank_without_evaluation_batches_is_refused():
    with pytest.raises(KpruneError, match="fewer evaluation batches than"):
        distributed.shard_sum(iter([]), CPU)


def test_one_process_step_stats_are_the_loss_and_the_local_flag():
    loss = torch.tensor(1.25, dtype=torch.float64)
    assert distributed.step_stats(loss, False) == (1.25, False)
    assert distributed.step_stats(loss, True) == (1.25, True)


def test_each_rank_restores_its_own_rng_state():
    states = []
    for seed in (11, 22):  # two ranks whose streams differ (dropout draws per rank)
        torch.manual_seed(seed)
        states.append(rng_state())
    assert "cuda" not in states[0]  # CUDA never initialized: nothing of it saved (nor initialized to save it)
    set_rng_state(own_rng_state(states, 1))
    got = torch.rand(3)
    torch.manual_seed(22)
    assert torch.equal(got, torch.rand(3))
    set_rng_state(own_rng_state(states, 0))
    torch.manual_seed(11)
    expected = torch.rand(3)
    set_rng_state(own_rng_state(states, 0))
    assert torch.equal(torch.rand(3), expected)


def _count_allreduces(rank: int, port: int, accum: int, steps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        ddp = distributed.wrap(model, CPU)
        calls = []

        def hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(dist.group.WORLD, hook)
        for _ in range(steps):
            for micro in range(accum):
                with distributed.accumulating(ddp, micro, accum):
                    ddp(torch.randn(4, 8)).pow(2).mean().backward()
        buckets = len(calls) // steps
        # Stop-flag agreement: rank 1 saw a signal, rank 0 did not; both learn it from one reduction.
        loss, anywhere = distributed.step_stats(torch.tensor(float(rank), dtype=torch.float64), rank == 1)
        # Validation: each rank evaluates its share of the batches, the sum is everyone's.
        evaluated = []
        total = distributed.shard_sum(((lambda i=i: evaluated.append(i) or torch.tensor([float(i), 1.0])) for i in range(5)),
                                      CPU)
        out.put((rank, len(calls), buckets, loss, anywhere, total, evaluated))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_ddp_all_reduces_once_per_optimizer_step_and_shards_evaluation():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_count_allreduces, args=(r, port, 4, 3, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, calls, buckets, loss, anywhere, total, evaluated in results:
        assert calls == 3 * 1, f"rank {rank}: {calls} gradient all-reduces for 3 steps of 4 micro-batches"
        assert loss == 0.5 and anywhere is True
        assert total == [0 + 1 + 2 + 3 + 4, 5] and evaluated == [[0, 2, 4], [1, 3]][rank]


def test_masking_uses_whole_tensors_on_a_gpu_and_cache_sized_chunks_on_the_cpu():
    from lib.pruning.masks import CHUNK, chunk_size, chunks

    assert chunk_size(CPU) == CHUNK
    gpt2_wte = 50257 * 768  # the largest GPT-2 124M weight: one masking pass, one set of kernels
    assert list(chunks(gpt2_wte, chunk_size(torch.device("cuda", 0)))) == [(0, gpt2_wte)]
    assert len(list(chunks(gpt2_wte, chunk_size(CPU)))) == 37


def test_spt_explores_without_waiting_for_the_device_and_restores_weights_exactly(monkeypatch):
    from torch import nn

    from lib.pruning.methods import SPT, Observation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    params = [model[0].weight, model[2].weight]
    pruned = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    pruned[0][:4] = True
    spt = SPT(epsilon=0.3, alpha=0.5, seed=3, last_step=10)
    spt.bind(params, pruned)
    assert spt.generator.device == params[0].device  # drawn where the weights are
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    before = [p.detach().clone() for p in params]
    loss = loss_fn(model, (x, y)).detach()
    generator_state = spt.generator.get_state()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("SPT read a tensor's truth value"))
        m.setattr(torch.Tensor, "item", lambda self: pytest.fail("SPT copied a value to the host"))
        spt.observe(Observation(1, model, (x, y), loss_fn, loss))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    explored = [r != 0 for r in spt.rewards]
    assert sum(int(e.sum()) for e in explored) > 0 and not explored[0][:4].any()  # pruned weights never explored
    # The rewards' exploration is the generator's: the saved state replays the same picks.
    spt.generator.set_state(generator_state)
    again = torch.rand(params[0].shape, generator=spt.generator) < 0.3
    assert torch.equal(explored[0], again & ~pruned[0])


@pytest.mark.slow  # compiling takes tens of seconds on a CPU
def test_the_compiling_step_is_kept_out_of_the_training_speed(tmp_path, capsys):
    import json

    from lib.results import read_metrics
    from tests.lib.test_loop_features import _run_small

    torch._dynamo.reset()  # compile afresh: another test may have compiled the same model in this process
    run_dir = _run_small(tmp_path, capsys, "--compile")  # a row every step
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert rows[0]["step"] == 1 and "samples_per_s" not in rows[0] and "step_time_s" not in rows[0]
    assert all(r["samples_per_s"] > 0 for r in rows[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    # The first step compiled: it took longer than every later step, and is reported on its own.
    assert summary["compile_step_s"] > max(r["step_time_s"] for r in rows[1:])
    # The summary's throughput is that of the timed steps only.
    timed = summary["wall_time_s"] - summary["compile_step_s"]
    assert summary["throughput"] == pytest.approx(summary["items_per_step"] * (summary["iterations"] - 1) / timed)
