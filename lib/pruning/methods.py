"""Pruning methods: what ranks the weights. Nothing here decides how many or when.

Most methods are a pure score function of the weight and its optimizer state
(lib/pruning/scores.py). Two need to watch training:

- movement (Sanh et al. 2020): S = -sum_t grad_t * w_t, accumulated every
  step in one fp32 buffer per weight. Weights moving away from zero gain
  score and are kept.
- spt (seed 000): every step, a fraction epsilon of the unpruned weights is
  removed for one extra forward pass; the loss increase this causes is their
  reward, kept as an exponential moving average with factor alpha. Weights
  whose removal hurts least (lowest reward) are pruned; never-explored weights
  keep the neutral reward 0. The extra pass leaves the model's buffers
  (BatchNorm running statistics and the like) and the global RNG as it found them.

Two read the inputs of each pruned layer instead, from calibration batches
run just before each of their mask updates (lib/pruning/calibration.py):

- wanda (Sun et al. 2023): |w| times the RMS of the weight's input column, a
  score like any other, selected by the shared machinery.
- sparsegpt (Frantar & Alistarh 2023): no score; each layer is pruned to its
  count and its kept weights updated to reconstruct its output
  (lib/pruning/sparsegpt.py), the masks recorded as every method's are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lib import distributed
from lib.pruning.registry import TEMPORARIES
from lib.pruning.scores import NONNEGATIVE_SCORES, STATE_VARIANTS, ScoreContext, ScoreFn, magnitude, score_in_chunks
from lib.pruning.sparsegpt import inverse_hessian_factor, prune_layer_


@dataclass
class Observation:
    """What a method may look at after each backward pass."""

    step: int
    model: nn.Module
    batch: tuple
    loss_fn: Callable[[nn.Module, tuple], torch.Tensor]
    loss: float | torch.Tensor  # the last micro-batch's loss (a 0-d tensor from the training loop)


class Method:
    """A score over the pool of prunable weights, optionally updated every step."""

    name: str = ""
    nonnegative: bool = False  # scores are never negative: selection can skip a key transform
    # What the method reads from calibration inputs before each mask update (lib/pruning/calibration.py):
    # "norms" or "hessian"; the pruner sets `inputs` (one LayerInputs per parameter) for that update only.
    calibration: str | None = None
    inputs: list | None = None
    reconstructs = False  # prunes layer by layer itself (prune_layer_) instead of being scored

    def bind(self, params: list[nn.Parameter], pruned: list[torch.Tensor]) -> None:
        """Called once with the pool (tied weights once) and its masks."""
        self.params, self.pruned = params, pruned

    def observe(self, obs: Observation) -> None:
        """Called after every backward pass, before gradients are masked."""

    def score(self, index: int, w: torch.Tensor, state: dict, out: torch.Tensor, ctx: ScoreContext) -> None:
        raise NotImplementedError

    @property
    def temporaries(self) -> int:
        """Float32 intermediates, each one score chunk in size, that `score` holds at once (its registry row's)."""
        return TEMPORARIES.get(self.name, 0)

    def buffers(self) -> list[torch.Tensor]:
        """Persistent per-weight tensors this method keeps (for memory accounting)."""
        return []

    def state_dict(self) -> dict:
        return {"buffers": [b.clone() for b in self.buffers()]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.buffers(), state["buffers"]):
            mine.copy_(saved)


class FunctionMethod(Method):
    """A method that is just a score function."""

    def __init__(self, name: str, fn: ScoreFn):
        self.name, self.fn = name, fn
        self.nonnegative = fn in NONNEGATIVE_SCORES

    def score(self, index, w, state, out, ctx) -> None:
        score_in_chunks(self.fn, w, state, out, ctx)  # chunk-sized intermediates, not weight-sized


class Movement(Method):
    name = "movement"

    def bind(self, params, pruned) -> None:
        super().bind(params, pruned)
        self.scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def observe(self, obs: Observation) -> None:
        for p, s in zip(self.params, self.scores):
            if p.grad is not None:
                s.addcmul_(p.grad.float(), p.float(), value=-1.0)

    def score(self, index, w, state, out, ctx) -> None:
        out.copy_(self.scores[index])

    def buffers(self) -> list[torch.Tensor]:
        return self.scores


class SPT(Method):
    """Random exploration of the unpruned weights, scored by the loss their removal causes.

    The draws come from SPT's own generator on the weights' device, seeded alike on every rank
    (so all ranks explore the same weights) and saved in the checkpoint. Nothing waits for the
    device: the probe keeps a full copy of each weight to restore it (one copy of the pool's
    weights while the probe runs), and rewards update with torch.where rather than indexing.
    """

    name = "spt"

    def __init__(self, epsilon: float, alpha: float, seed: int, last_step: int):
        if epsilon is None or not 0.0 < epsilon <= 1.0:
            raise ValueError(f"SPT epsilon {epsilon!r} must be in (0, 1] (SPT_EPSILON)")
        if alpha is None or not 0.0 <= alpha < 1.0:
            raise ValueError(f"SPT alpha {alpha!r} must be in [0, 1) (SPT_ALPHA)")
        self.epsilon, self.alpha, self.last_step, self.seed = epsilon, alpha, last_step, seed

    def bind(self, params, pruned) -> None:
        super().bind(params, pruned)
        self.rewards = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.generator = torch.Generator(device=params[0].device).manual_seed(self.seed)

    @torch.no_grad()
    def observe(self, obs: Observation) -> None:
        if obs.step > self.last_step:  # no mask update left to inform
            return
        explored, saved = [], []
        for p, m in zip(self.params, self.pruned):
            pick = torch.rand(p.shape, generator=self.generator, device=p.device) < self.epsilon
            pick &= ~m
            explored.append(pick)
            saved.append(p.detach().clone())
            p.masked_fill_(pick, 0.0)
        # Its own RNG stream: exploring must not change the dropout masks training sees. And the
        # model's buffers as they were: the probe is not a training step, so BatchNorm's running
        # statistics and batch count (or any other buffer a forward pass updates) must not move.
        buffers = [b.clone() for b in obs.model.buffers()]
        device = obs.batch[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            removed_loss = obs.loss_fn(obs.model, obs.batch).detach()
        for b, before in zip(obs.model.buffers(), buffers):
            b.copy_(before)
        for p, values in zip(self.params, saved):
            p.copy_(values)  # only the explored weights differ: copying all restores them exactly
        # Under DDP each rank saw its own batch: average, so every rank keeps the same rewards.
        reward = distributed.mean_(removed_loss.double() - torch.as_tensor(obs.loss, dtype=torch.float64,
                                                                          device=removed_loss.device))
        for r, pick in zip(self.rewards, explored):
            r.copy_(torch.where(pick, self.alpha * r + (1.0 - self.alpha) * reward, r))

    def score(self, index, w, state, out, ctx) -> None:
        out.copy_(self.rewards[index])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])

    def buffers(self) -> list[torch.Tensor]:
        return self.rewards


class Wanda(Method):
    """Wanda (Sun et al. 2023): |w_rj| * ||X_j||, ||X_j|| = sqrt(mean x_j^2) of the layer's calibration inputs."""

    name = "wanda"
    nonnegative = True  # |w| times a square root: never negative, never -0.0
    calibration = "norms"

    @property
    def inputs(self) -> list | None:
        return self._norms

    @inputs.setter
    def inputs(self, stats: list | None) -> None:
        # Each layer's column norms, computed once per update in the calibration's own memory.
        self._norms = None if stats is None else [s.sums.div_(s.count).sqrt_() for s in stats]

    def score(self, index, w, state, out, ctx) -> None:
        norm = self.inputs[index]  # one per column of w.view(rows, -1)
        rows = w.shape[0]
        scores = out.view(rows, -1)
        torch.abs(w.view(rows, -1), out=scores).mul_(norm)  # in place: no weight-sized temporary


class SparseGPT(Method):
    """SparseGPT (Frantar & Alistarh 2023): layer-wise pruning with the OBS update (lib/pruning/sparsegpt.py)."""

    name = "sparsegpt"
    calibration = "hessian"
    reconstructs = True

    def __init__(self, block_size: int, dampening: float):
        if block_size is None or block_size < 1:
            raise ValueError(f"SparseGPT block size {block_size!r} must be at least 1 (SPARSEGPT_BLOCK_SIZE)")
        if dampening is None or not dampening > 0.0:
            raise ValueError(f"SparseGPT dampening {dampening!r} must be above 0 (SPARSEGPT_DAMPENING)")
        self.block_size, self.dampening = block_size, dampening

    def score(self, index, w, state, out, ctx) -> None:
        raise NotImplementedError("SparseGPT chooses weights while it reconstructs each layer: it has no score")

    @torch.no_grad()
    def prune_layer_(self, index: int, name: str, pruned: torch.Tensor, count: int, nm: tuple[int, int] | None,
                     first_index: int) -> torch.Tensor:
        """Prune `count` weights of parameter `index` (its earlier `pruned` among them), updating the kept ones.

        Returns the bool mask. A convolution's columns are reordered so that
        each N:M group (M input channels at one kernel position) is M
        consecutive columns.
        """
        p, stats = self.params[index], self.inputs[index]
        rows = p.shape[0]
        order = None
        if p.dim() == 4 and nm:  # [out, in, kh, kw]: columns in (kh, kw, in) order
            _, c, kh, kw = p.shape
            order = torch.arange(c * kh * kw, device=p.device).view(c, kh, kw).permute(1, 2, 0).reshape(-1)
        u = inverse_hessian_factor(stats.sums if order is None else stats.sums[order][:, order], stats.count,
                                   self.dampening, name)
        self.inputs[index] = None  # the Hessian is the largest thing here: freed as soon as it is factored
        w = p.detach().float().view(rows, -1)
        before = pruned.view(rows, -1)
        if order is not None:
            w, before = w[:, order], before[:, order]
        else:
            w = w.clone()
        mask = prune_layer_(w, u, before, count, block=self.block_size, nm=nm, first_index=first_index)
        if order is not None:
            w, mask = w[:, order.argsort()], mask[:, order.argsort()]
        p.detach().copy_(w.view(p.shape))
        return mask.view(p.shape)


CALIBRATED_METHODS: frozenset[str] = frozenset(m.name for m in (Wanda, SparseGPT))


def build_method(method: str, variant: str | None = None, *, spt_epsilon: float = 0.01, spt_alpha: float = 0.9,
                 seed: int = 0, last_step: int = 0, sparsegpt_block_size: int = 128,
                 sparsegpt_dampening: float = 0.01) -> Method:
    """The method a configuration names."""
    if method == "magnitude":
        return FunctionMethod("magnitude", magnitude)
    if method == "state":
        if variant not in STATE_VARIANTS:
            raise ValueError(f"unknown state variant '{variant}' (one of: {', '.join(STATE_VARIANTS)})")
        return FunctionMethod(variant, STATE_VARIANTS[variant])
    if method == "movement":
        return Movement()
    if method == "spt":
        return SPT(spt_epsilon, spt_alpha, seed, last_step)
    if method == "wanda":
        return Wanda()
    if method == "sparsegpt":
        return SparseGPT(sparsegpt_block_size, sparsegpt_dampening)
    raise ValueError(f"unknown pruning method '{method}'")
