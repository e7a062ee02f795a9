"""Importance scores: one small named function per method or state variant.

Higher score = kept. Each function writes the score of weight `w` into `out`
(a float32 tensor shaped like `w`) in place, so a mask update holds one score
buffer. `state` is the optimizer's state for `w` (empty before its first
step): m = exp_avg, v = exp_avg_sq, t = state["step"]. Before Adam has state,
every state variant falls back to |w|.

Some scores need intermediate tensors beside `out` (bitter0 one, bitter5,
bitter6 and bitter9 two at once). Every score is elementwise, so a method
runs it over chunks of rows (`score_in_chunks`): the values are the same and
the intermediates are chunk-sized, not weight-sized. How many each score
holds is declared in its registry row (`temporaries`), and a mask update's
recorded peak memory adds them.

mtz ("movement to zero") = sign(w) * m / (sqrt(v) + eps) is positive when
Adam's next update moves w toward zero (the update is -lr * m / sqrt(v)), so
bitter5 and bitter9 subtract it: a weight Adam is shrinking ranks lower. The
source documents' snippets had this sign inverted relative to their intent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lib.pruning.registry import METHODS, VARIANTS

EPS = 1e-8


@dataclass(frozen=True)
class ScoreContext:
    """What a score may need beside the weight and its optimizer state."""

    step: int
    beta1: float = 0.9


ScoreFn = Callable[[torch.Tensor, dict, torch.Tensor, ScoreContext], None]


def _moments(state: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return state.get("exp_avg"), state.get("exp_avg_sq")


# A score runs over chunks of about this many weights, so its intermediates are chunk-sized: 1 MiB
# each on a CPU, where they stay in cache, and 16 MiB on a GPU, where GPT-2 124M's largest weight
# takes 10 chunks (a few dozen kernel launches more, once per mask update).
SCORE_CHUNK = 1 << 18  # CPUs: a chunk's w, state and score pieces stay in L2/L3 across the score's operations
GPU_SCORE_CHUNK = 1 << 22


def score_chunk_numel(shape: torch.Size, device: torch.device) -> int:
    """Weights in the largest chunk `score_in_chunks` scores at once: whole rows, one at least."""
    numel = shape.numel()
    size = SCORE_CHUNK if device.type == "cpu" else GPU_SCORE_CHUNK
    if numel <= size:
        return numel
    row = numel // shape[0]
    return min(numel, max(1, size // row) * row)


def score_in_chunks(fn: ScoreFn, w: torch.Tensor, state: dict, out: torch.Tensor, ctx: ScoreContext) -> None:
    """fn over chunks of rows of `w`, of its state tensors and of `out`: fn's values, chunk-sized intermediates.

    Chunks are narrowed along dim 0, so any strides work and no copy is made.
    """
    chunk = score_chunk_numel(out.shape, out.device)
    if chunk >= out.numel():
        return fn(w, state, out, ctx)
    rows = chunk // (out.numel() // out.shape[0])
    per_weight = [k for k, t in state.items() if torch.is_tensor(t) and t.shape == w.shape]
    for r0 in range(0, out.shape[0], rows):
        n = min(rows, out.shape[0] - r0)
        part = {**state, **{k: state[k].narrow(0, r0, n) for k in per_weight}}
        fn(w.narrow(0, r0, n), part, out.narrow(0, r0, n), ctx)


def _mtz(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # sign(w) * m / (sqrt(v) + eps), computed in place: two intermediates at once, not three
    return torch.sign(w).mul_(m).div_(v.sqrt().add_(EPS))


def magnitude(w, state, out, ctx) -> None:
    """|w|"""
    torch.abs(w, out=out)


def bitter0(w, state, out, ctx) -> None:
    """|w| * |m| * |w| / (sqrt(v) + eps): the original hybrid of momentum and stability."""
    m, v = _moments(state)
    if m is None or v is None:
        return magnitude(w, state, out, ctx)
    torch.mul(w, w, out=out)
    out.mul_(m.abs()).div_(v.sqrt().add_(EPS))


def bitter3(w, state, out, ctx) -> None:
    """|w| * sqrt(|m| + eps): magnitude weighted by recent gradient activity."""
    m, _ = _moments(state)
    if m is None:
        return magnitude(w, state, out, ctx)
    torch.abs(m, out=out)
    out.add_(EPS).sqrt_().mul_(w).abs_()


def bitter5(w, state, out, ctx) -> None:
    """-mtz + 0.1 * |w|: weights Adam is pushing toward zero rank lowest."""
    m, v = _moments(state)
    if m is None or v is None:
        return magnitude(w, state, out, ctx)
    torch.abs(w, out=out)
    out.mul_(0.1).sub_(_mtz(w, m, v))


def bitter6(w, state, out, ctx) -> None:
    """|w| * sqrt(|m| + eps) * sqrt(m^2 / (v + eps)): penalises oscillating gradients."""
    m, v = _moments(state)
    if m is None or v is None:
        return magnitude(w, state, out, ctx)
    bitter3(w, state, out, ctx)
    out.mul_((m * m).div_(v + EPS).sqrt_())


def bitter7(w, state, out, ctx) -> None:
    """|w| * (|v| + eps)^0.25: weights whose gradients stayed small over a long history rank lowest."""
    _, v = _moments(state)
    if v is None:
        return magnitude(w, state, out, ctx)
    # Two square roots are the fourth root, and much cheaper than pow.
    # (|v| + eps)^0.25 > 0, so |w * x| = |w| * x.
    torch.abs(v, out=out)
    out.add_(EPS).sqrt_().sqrt_().mul_(w).abs_()


def bitter8(w, state, out, ctx) -> None:
    """|w| * sqrt(|m / (1 - beta1^t)| + eps): bitter3 with Adam's bias-corrected momentum."""
    m, _ = _moments(state)
    if m is None:
        return magnitude(w, state, out, ctx)
    torch.abs(m, out=out)
    out.div_(_bias_correction(state, ctx)).add_(EPS).sqrt_().mul_(w).abs_()


def _bias_correction(state: dict, ctx: ScoreContext) -> float | torch.Tensor:
    """1 - beta1^t, Adam's first-moment bias correction at the state's step."""
    t = state.get("step", ctx.step)
    if torch.is_tensor(t):  # kept as a tensor: a fused Adam's step is on the GPU, and reading it would wait
        return 1.0 - torch.pow(ctx.beta1, t.double().clamp_min(1.0))
    return 1.0 - ctx.beta1 ** max(float(t), 1.0)


def bitter9(w, state, out, ctx) -> None:
    """|w| * sqrt(|m| + eps) - 0.1 * mtz: magnitude, activity and direction together."""
    m, v = _moments(state)
    if m is None or v is None:
        return magnitude(w, state, out, ctx)
    bitter3(w, state, out, ctx)
    out.sub_(_mtz(w, m, v).mul_(0.1))


# The scores lib/pruning/select.c computes too, with the moments each reads (m: exp_avg, v: exp_avg_sq).
# On the CPU a mask update turns them into selection keys in one C pass (selection.score_keys) instead
# of the torch operations above: same formulas, correctly rounded square roots.
NATIVE_READS: dict[ScoreFn, str] = {magnitude: "", bitter0: "mv", bitter3: "m", bitter5: "mv", bitter6: "mv",
                                    bitter7: "v", bitter8: "m", bitter9: "mv"}


def native_arguments(fn: ScoreFn, state: dict, ctx: ScoreContext):
    """(formula, m, v, correction) for selection.score_keys, or None for a score select.c does not have.

    Before Adam has the moments a formula reads, the formula is magnitude, as the torch function's fallback.
    """
    reads = NATIVE_READS.get(fn)
    if reads is None:
        return None
    m, v = _moments(state)
    if ("m" in reads and m is None) or ("v" in reads and v is None):
        return "magnitude", None, None, 1.0
    correction = float(_bias_correction(state, ctx)) if fn is bitter8 else 1.0
    return fn.__name__, m if "m" in reads else None, v if "v" in reads else None, correction


# Derived from the tables in lib/pruning/registry.py: nothing to edit here when a variant is added.
STATE_VARIANTS: dict[str, ScoreFn] = {v.name: globals()[v.score] for v in VARIANTS}

# Scores that are never negative (and never -0.0): their float bits already sort as integers.
NONNEGATIVE_SCORES: frozenset[ScoreFn] = frozenset(
    [STATE_VARIANTS[v.name] for v in VARIANTS if v.nonnegative]
    # a method's score function bears its name; a method that is a class (wanda) says so itself, as the tests check
    + [globals()[m.name] for m in METHODS if m.nonnegative and callable(globals().get(m.name))])
