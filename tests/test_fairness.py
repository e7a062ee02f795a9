"""Fair A/B comparisons: every method prunes the same count at the same steps, and nothing revives.

The loop below is lib/train_loop.py's order: loss -> zero_grad -> backward ->
pruner.observe -> pruner.after_backward -> clip -> optimizer.step ->
pruner.after_step(step). Optimizers and pruners are built from Settings
exactly as a run builds them (lib.optim.build_optimizer, lib.pruning.build.build_pruner).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2.model import GPT, GPTConfig
from gpt2.train import prunable_parameters
from lenet5.model import LeNet5
from lib.errors import KpruneError
from lib.optim import build_optimizer
from lib.pruning.build import build_pruner
from lib.pruning.methods import Observation
from lib.pruning.pruner import target_count
from lib.pruning.registry import FIXED_SCOPE, LAYER_ADAPTIVE_VARIANTS, METHOD_NAMES, VARIANT_NAMES
from lib.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# Every method that ranks the one global pool; sparsegpt selects per layer only (FIXED_SCOPE): its exact counts
# and no revival are tested in tests/lib/pruning/test_oneshot.py.
METHODS = ([(m, None) for m in METHOD_NAMES if m not in ("none", "state") and m not in FIXED_SCOPE]
           + [("state", v) for v in VARIANT_NAMES])
METHOD_IDS = [v or m for m, v in METHODS]


@pytest.fixture(autouse=True)
def _one_thread_and_rng_restored():
    """Tiny models: one intra-op thread. In-process trainer runs reseed the global RNGs: put them back."""
    threads = torch.get_num_threads()
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def _settings(method: str, variant: str | None, **kw) -> Settings:
    values = dict(
        seed=0, lr=1e-3, optimizer="adamwprune", adamwprune_base="adamw", sgd_momentum=0.9, weight_decay=0.0,
        beta1=0.9, beta2=0.999, adam_eps=1e-8, amsgrad=False, spam_theta=5000.0, spam_interval=500, spam_warmup=150,
        pruning_method=method, state_variant=variant or "bitter7", variant_budget=False, spt_epsilon=0.01,
        spt_alpha=0.9, adaptive_pruning=False, target_sparsity=0.6, schedule="linear", schedule_start=2,
        schedule_end=20, initial_sparsity=0.0, schedule_frequency=3, grad_clip=1.0, calibration_batches=2)
    values.update(kw)
    return Settings(**values)


# --- tasks: same init (seeded), same random data --------------------------------

def _lenet5_task():
    torch.manual_seed(1234)
    model = LeNet5()
    g = torch.Generator().manual_seed(99)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]
    pool = [(n, p) for n, p in model.named_parameters() if n.endswith(".weight")]  # as lenet5/train.py

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    return model, pool, batches, loss_fn


def _gpt2_task(prune_embeddings: bool = False):
    torch.manual_seed(1234)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128))
    g = torch.Generator().manual_seed(99)
    batches = []
    for _ in range(8):
        tokens = torch.randint(0, 128, (4, 17), generator=g)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))  # as TokenBatches gives them

    def loss_fn(m, b):
        return m(*b)[1]

    return model, prunable_parameters(model, prune_embeddings), batches, loss_fn


TASKS = {"lenet5": _lenet5_task, "gpt2": _gpt2_task, "gpt2-embeddings": lambda: _gpt2_task(True)}


def _train(task, s: Settings, steps: int, each_step=None):
    model, pool, batches, loss_fn = task()
    optimizer = build_optimizer(model, s)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # wanda calibrates on the task's first batches, as a trainer's calibration_batches would give them
    calibration = SimpleNamespace(model=model, calibration_batches=lambda n: batches[:n], loss=loss_fn)
    pruner, _ = build_pruner(s, pool, optimizer, n_params, task=calibration)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(1, steps + 1):
        batch = batches[step % len(batches)]
        model.train()
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        pruner.observe(Observation(step, model, batch, loss_fn, loss.item()))
        pruner.after_backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        if each_step is not None:
            each_step("before_step", step, model, optimizer, pruner)
        optimizer.step()
        update = pruner.after_step(step)
        if each_step is not None:
            each_step("after_step", step, model, optimizer, pruner)
        if update is not None:
            # exact count, from the masks and from the weights themselves
            expected = target_count(pruner.schedule.target(step), pruner.numel)
            assert update.pruned_count == update.target_count == expected == pruner.masks.count(), \
                f"{s.pruning_method}/{s.variant} step {step}"
            for p, m in zip(pruner.masks.params, pruner.masks.pruned):
                assert (p.detach()[m] == 0).all()
    return model, optimizer, pruner


# --- a. fairness ---------------------------------------------------------------------

@pytest.mark.parametrize("task_name", list(TASKS))
def test_every_method_prunes_the_same_count_at_the_same_steps(task_name):
    task = TASKS[task_name]
    trajectories, masks = {}, {}
    for (method, variant), name in zip(METHODS, METHOD_IDS):
        # wanda compares per row unless told otherwise: here it ranks the one global pool like the others
        s = _settings(method, variant, sparsity_scope="global" if method == "wanda" else None)
        if method == "wanda" and task_name == "gpt2-embeddings":  # the tied embedding has no inputs to read
            with pytest.raises(KpruneError, match="PRUNE_EMBEDDINGS=n"):
                _train(task, s, steps=25)
            continue
        _, _, pruner = _train(task, s, steps=25)
        assert pruner.layer_adaptive is (variant in LAYER_ADAPTIVE_VARIANTS)
        trajectories[name] = [(u.step, u.pruned_count) for u in pruner.updates]
        masks[name] = torch.cat([m.reshape(-1) for m in pruner.masks.pruned])
    schedule = pruner.schedule
    assert (schedule.kind, schedule.start, schedule.end, schedule.frequency) == ("linear", 2, 20, 3)
    expected = [(t, target_count(schedule.target(t), pruner.numel)) for t in schedule.update_steps()]
    assert [t for t, _ in expected] == [2, 5, 8, 11, 14, 17, 20]
    assert expected[-1][1] == target_count(0.6, pruner.numel) > 0
    for name, trajectory in trajectories.items():
        assert trajectory == expected, f"{name} pruned a different count than the schedule asks"
    # the same counts, but not the same weights: the comparison is between real rankings
    distinct = {tuple(m.nonzero().reshape(-1).tolist()) for m in masks.values()}
    assert len(distinct) >= 5
    assert not torch.equal(masks["magnitude"], masks["movement"])
    assert not torch.equal(masks["magnitude"], masks["spt"])
    assert not torch.equal(masks["magnitude"], masks["bitter7"])


def test_gpt2_tied_embedding_is_one_prunable_parameter():
    model, pool, _, _ = _gpt2_task(True)
    s = _settings("magnitude", None)
    pruner, _ = build_pruner(s, pool, build_optimizer(model, s), 1)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    assert pruner.numel == blocks + 128 * 32 + 16 * 32  # wte (= lm_head) once, wpe
    assert sum(p is model.lm_head.weight for p in pruner.masks.params) == 1


# --- b. no revival under SPAM (clipping, resets, re-warm) and SGD momentum -------------------

class _RevivalChecker:
    """Called around every optimizer step: pruned weights and their states stay exactly 0, nothing is NaN."""

    def __init__(self, state_keys, spam_theta=None, spam_interval=None):
        self.state_keys = state_keys
        self.ever = None
        self.theta, self.interval = spam_theta, spam_interval
        self.clipped_elements = 0
        self.resets_seen = 0
        self.checks = 0

    def __call__(self, when, step, model, optimizer, pruner):
        if self.ever is None:
            self.ever = [torch.zeros_like(m) for m in pruner.masks.pruned]
        if when == "before_step":
            for p, m in zip(pruner.masks.params, pruner.masks.pruned):
                assert (p.grad[m] == 0).all(), f"step {step}: a pruned weight has a gradient"
            if self.theta is not None:
                self._count_spikes(optimizer)
            return
        for p in model.parameters():
            assert torch.isfinite(p).all(), f"step {step}: NaN/inf in the weights"
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    assert torch.isfinite(value).all(), f"step {step}: NaN/inf in {key}"
        for i, (p, m) in enumerate(zip(pruner.masks.params, pruner.masks.pruned)):
            assert not (self.ever[i] & ~m).any(), f"step {step}: a mask was revived"
            self.ever[i] |= m
            assert (p.detach()[self.ever[i]] == 0.0).all(), f"step {step}: a pruned weight moved off 0"
            state = optimizer.state[p]
            for key in self.state_keys:
                assert (state[key][self.ever[i]] == 0).all(), f"step {step}: {key} of a pruned weight is not 0"
            self.checks += int(self.ever[i].sum())
        if self.interval is not None:
            group = optimizer.param_groups[0]
            beta1 = group["betas"][0]
            if group["spam_step"] > 1 and (group["spam_step"] - 1) % self.interval == 0:
                # reset before this call's update: the first moment holds this gradient only
                # (and 0 where a mask update right after the step pruned the weight)
                masks = {id(p): m for p, m in zip(pruner.masks.params, pruner.masks.pruned)}
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    expected = (1 - beta1) * p.grad
                    if id(p) in masks:
                        expected = expected.masked_fill(masks[id(p)], 0.0)
                    assert torch.equal(optimizer.state[p]["exp_avg"], expected), f"step {step}: no reset"
                self.resets_seen += 1

    def _count_spikes(self, optimizer):
        # the spike test AdamWSPAM applies on this call: g^2 > theta * v once v has 20 updates since the reset
        from lib.spam import SPIKE_CLIP_DELAY

        for group in optimizer.param_groups:
            if group.get("spam_step", 0) % self.interval < SPIKE_CLIP_DELAY:
                continue
            for p in group["params"]:
                state = optimizer.state.get(p)
                if p.grad is not None and state:
                    self.clipped_elements += int((p.grad * p.grad > self.theta * state["exp_avg_sq"]).sum())


def _mlp_task():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 3))
    g = torch.Generator().manual_seed(6)
    batches = []
    for i in range(10):
        x = torch.randn(32, 12, generator=g)
        if i == 7:
            x[:, :3] *= 50.0  # a gradient spike now and then
        batches.append((x, torch.randn(32, 3, generator=g)))
    pool = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]

    def loss_fn(m, b):
        return F.mse_loss(m(b[0]), b[1])

    return model, pool, batches, loss_fn


NO_REVIVAL_SCHEDULE = dict(target_sparsity=0.7, schedule="linear", schedule_start=10, schedule_end=120,
                           schedule_frequency=10, weight_decay=0.1, lr=1e-2, grad_clip=0.0)


@pytest.mark.parametrize("interval, warmup, amsgrad", [(25, 3, False), (7, 3, False), (25, 3, True)])
@pytest.mark.parametrize("method, variant", [("magnitude", None), ("state", "bitter7"), ("state", "bitter0"),
                                             ("movement", None), ("spt", None)])
def test_no_revival_with_adamwspam(method, variant, interval, warmup, amsgrad):
    theta = 5.0
    s = _settings(method, variant, optimizer="adamwprune", adamwprune_base="adamwspam", spam_theta=theta,
                  spam_interval=interval, spam_warmup=warmup, amsgrad=amsgrad, **NO_REVIVAL_SCHEDULE)
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    checker = _RevivalChecker(keys, spam_theta=theta, spam_interval=interval)
    model, optimizer, pruner = _train(_mlp_task, s, steps=150, each_step=checker)
    assert type(optimizer).__name__ == "AdamWSPAM"
    assert pruner.masks.count() == target_count(0.7, pruner.numel)
    assert checker.resets_seen == (150 - 1) // interval
    if interval > 21:
        assert checker.clipped_elements > 0, "the run never exercised spike clipping"
    assert checker.checks > 0
    zeros = sum(pruner.masks.zeros_in_weights())
    assert zeros >= pruner.masks.count()


@pytest.mark.parametrize("method, variant", [("magnitude", None), ("movement", None)])
def test_no_revival_with_sgd_momentum_and_weight_decay(method, variant):
    s = _settings(method, variant, optimizer="sgd", sgd_momentum=0.9, **NO_REVIVAL_SCHEDULE)
    checker = _RevivalChecker(("momentum_buffer",))
    _, optimizer, pruner = _train(_mlp_task, s, steps=150, each_step=checker)
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert pruner.masks.count() == target_count(0.7, pruner.numel)
    assert checker.checks > 0


@pytest.mark.parametrize("variant", ["bitter0", "bitter6"])
def test_mask_update_on_a_spam_reset_step_still_ranks_weights(variant):
    # With ADAMWPRUNE_BASE=adamwspam, AdamWSPAM zeroes exp_avg/exp_avg_sq at the end of every
    # SPAM_INTERVAL-th step, and the pruner updates the masks right after that optimizer step. When the
    # two coincide (GPT-2 defaults: updates at 80, 100, ..., 640 and a reset at step 500), a score
    # built on m or v must not collapse to a constant: the selection would then be the first k weights
    # in parameter order (whole early layers), not a ranking.
    s = _settings("state", variant, optimizer="adamwprune", adamwprune_base="adamwspam", spam_interval=10,
                  spam_warmup=2, target_sparsity=0.5, schedule="one-shot", schedule_start=10, lr=1e-2)
    _, _, pruner = _train(_mlp_task, s, steps=10)
    flat = torch.cat([m.reshape(-1) for m in pruner.masks.pruned])
    k = pruner.masks.count()
    assert k == target_count(0.5, pruner.numel)
    assert not flat[:k].all(), f"{variant} pruned exactly the first {k} weights in buffer order"
    assert all(m.any() for m in pruner.masks.pruned[1:]), "later layers were left untouched"


# --- c. the real trainer entry point ---------------------------------------------------

def _lenet5_main(tmp_path: Path, method_args: list[str]) -> dict:
    from lenet5.train import main

    out = tmp_path / "-".join(method_args[1::2])
    argv = ["--device", "cpu", "--threads", "1", "--data-dir", str(REPO / "data"), "--output-dir", str(out),
            "--optimizer", "adamwprune", "--adamwprune-base", "adamw", *method_args,
            "--max-iters", "12", "--batch-size", "32", "--target-sparsity", "0.6",
            "--schedule", "linear", "--schedule-start", "2", "--schedule-end", "10", "--schedule-frequency", "2",
            "--eval-interval", "12", "--log-interval", "4", "--lr-warmup-iters", "2"]
    assert main(argv) == 0
    (summary_path,) = out.glob("*/summary.json")
    return json.loads(summary_path.read_text())


@pytest.mark.slow  # starts a process or trains: over a second
def test_trainer_runs_prune_identical_trajectories(tmp_path):
    runs = {"magnitude": _lenet5_main(tmp_path, ["--pruning-method", "magnitude"]),
            "bitter7": _lenet5_main(tmp_path, ["--pruning-method", "state", "--state-variant", "bitter7"])}
    numel = 6 * 25 + 16 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    expected_steps = [2, 4, 6, 8, 10]
    trajectories = {}
    for name, summary in runs.items():
        assert summary["status"] == "complete"
        assert summary["iterations"] == 12
        assert summary["prunable_params"] == numel
        assert summary["schedule"]["kind"] == "linear" and summary["schedule"]["frequency"] == 2
        updates = summary["mask_updates"]
        trajectories[name] = [(u["step"], u["pruned_count"]) for u in updates]
        assert [u["step"] for u in updates] == expected_steps
        assert all(u["pruned_count"] == u["target_count"] for u in updates)
        assert summary["target_count_exact"] is True
        assert summary["final_pruned_count"] == summary["mask_pruned_count"] == target_count(0.6, numel)
        assert summary["final_sparsity"] == pytest.approx(target_count(0.6, numel) / numel)
    assert runs["magnitude"]["variant"] is None and runs["bitter7"]["variant"] == "bitter7"
    assert trajectories["magnitude"] == trajectories["bitter7"]
    assert trajectories["magnitude"] == [(t, target_count(0.6 * (t - 2) / 8, numel)) for t in expected_steps]
