"""Multi-node training inside a Slurm allocation: the commands, from a Slurm environment given as a dict."""

from __future__ import annotations

import sys

import pytest

import lib.distributed as distributed
from lib.errors import KpruneError
from lib.kconfig import REPO_ROOT, apply_overrides, read_config
from scripts.kconfig import trainer_command

NODES = {"gpu[01-03]": ["gpu01", "gpu02", "gpu03"]}


def _kconf(*overrides: str):
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / "gpt2-bitter7")
    apply_overrides(kconf, seen, list(overrides))
    return kconf


@pytest.fixture
def fake_scontrol(monkeypatch):
    monkeypatch.setattr(distributed, "slurm_hostnames", lambda nodelist: NODES[nodelist])


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_in_a_batch_script_srun_starts_one_make_train_per_node(fake_scontrol):
    env = {"SLURM_JOB_ID": "4321", "SLURM_JOB_NUM_NODES": "3", "SLURM_CPUS_PER_TASK": "16",
           "SLURM_GPUS_PER_NODE": "4", "SLURM_JOB_NODELIST": "gpu[01-03]"}
    argv = trainer_command(_kconf("DDP_NNODES=3", "DDP_NPROC_PER_NODE=4"), env,
                           per_node=("train", "--config", "results/x/config"))
    assert argv == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "--cpus-per-task=16", "--gpus-per-node=4",
                    sys.executable, "-m", "scripts.kconfig", "train", "--config", "results/x/config"]


@pytest.mark.parametrize("node, rank", [("gpu01", 0), ("gpu02", 1), ("gpu03", 2)])
def test_in_the_step_each_node_starts_torchrun_with_its_rank_from_slurm(fake_scontrol, node, rank):
    env = {"SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[01-03]",
           "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURMD_NODENAME": node}
    kconf = _kconf("DDP_NNODES=3", "DDP_NPROC_PER_NODE=4", "DDP_NODE_RANK=0", "DDP_MASTER_ADDR=10.0.0.9")
    argv = trainer_command(kconf, env)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    # The head node is the first of the step's nodes; the port moves with the job id (29500 + 4321 % 1000).
    expected = {"--nproc-per-node": "4", "--nnodes": "3", "--node-rank": str(rank), "--master-addr": "gpu01",
                "--master-port": "29821"}
    flags = _flags(argv)
    assert {k: flags.get(k) for k in expected} == expected
    assert argv[argv.index("-m", 3):][:2] == ["-m", "gpt2.train"]


def test_outside_slurm_the_configured_rendezvous_is_used():
    kconf = _kconf("DDP_NNODES=2", "DDP_NPROC_PER_NODE=2", "DDP_NODE_RANK=1", "DDP_MASTER_ADDR=10.0.0.9")
    flags = _flags(trainer_command(kconf, {}))
    assert (flags["--node-rank"], flags["--master-addr"], flags["--master-port"]) == ("1", "10.0.0.9", "29500")


def test_a_step_on_other_nodes_than_configured_is_an_error(fake_scontrol):
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[01-03]", "SLURMD_NODENAME": "gpu01"}
    with pytest.raises(KpruneError, match="DDP_NNODES=2 but this Slurm job step runs on 3 node"):
        trainer_command(_kconf("DDP_NNODES=2", "DDP_NPROC_PER_NODE=2"), env)


def test_an_allocation_with_too_few_nodes_is_an_error():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}
    with pytest.raises(KpruneError, match="DDP_NNODES=2 but this Slurm allocation has 1 node"):
        trainer_command(_kconf("DDP_NNODES=2", "DDP_NPROC_PER_NODE=2"), env)


def test_port_stays_a_valid_port_for_any_job_id():
    env = {"SLURM_JOB_ID": "999999", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n1", "SLURMD_NODENAME": "n1"}
    node = distributed.slurm_node(env, 1, 65535, hostnames=lambda _: ["n1"])
    assert 1024 <= node.master_port <= 65535
