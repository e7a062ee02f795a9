"""AdamWSPAM: AdamW with SPAM's spike clipping, momentum reset and re-warm.

SPAM ("SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
Huang, Zhu, Jin, Liu, Wang and Liu, ICLR 2025, arXiv:2501.06842) starts from
one observation: in LLM training a few gradient coordinates occasionally jump
to hundreds or thousands of times their usual size. Adam's moments absorb such
a spike and then carry it for a long time (the second moment with
beta2 = 0.999 remembers it for thousands of steps), which shrinks or skews the
updates long after the spike itself is gone. SPAM adds three mechanisms to
Adam; here they sit on top of AdamW (decoupled weight decay):

1. Spike-aware clipping, element-wise. A gradient element g whose square
   exceeds theta times its second-moment EMA from before this step,
   g^2 > theta * v, is replaced by sign(g) * sqrt(theta * v): it keeps its
   direction but is cut to the largest magnitude still considered normal.
   Unlike global norm clipping, only the spiked elements change.
2. Momentum reset. Every `interval` steps both moments (exp_avg, exp_avg_sq,
   and the AMSGrad maximum when enabled) are set to zero, so whatever a spike
   left in them is thrown away.
3. Cosine re-warm. Right after a reset the moments hold a single gradient and
   the update is noisy, so for `warmup` steps after each reset the Adam update
   is multiplied by a factor that rises along a cosine from 0.01 to 1.

Defaults and where they come from
---------------------------------
theta = 5000, interval (the paper's Delta T) = 500, warmup (the paper's N) =
150. These are the settings of the paper's LLM pre-training runs: the authors'
README runs them with `--threshold 5000 --DeltaT 500 --warmup_epoch 150`, and
their pre-release optimizer (`galore_torch/SPAM.py`, mirrored e.g. in
ffuhu/SPAM-tests) defaults to `threshold=5000, DeltaT=500, warmup_steps=150`;
summaries of the paper list the same three defaults. (The paper PDF itself was
not available to check against.) lr, betas and weight_decay are
torch.optim.AdamW's defaults, eps is 1e-8 (AdamW's; the authors' code uses
1e-6).

Decisions
---------
Step counting and reset timing. Each parameter group counts its `step()` calls
in ``group["spam_step"]`` (an int, saved with the optimizer's state_dict); call
t = 1, 2, ... The reset happens at the start of every call t > 1 with
(t - 1) % interval == 0 (calls interval + 1, 2 * interval + 1, ...), before that
call's update. This is one call LATER than the reference code, which resets at
the start of calls interval, 2 * interval, ... (its test is t % DeltaT == 0 on
the same 1-based count). The shift is deliberate: kprune's mask updates run
after an optimizer step, and schedules put them on round step numbers such as
multiples of the interval. Resetting at the start of call `interval` would
leave a state-based mask update after that call reading moments that hold a
single gradient; here, after call `interval` the moments still hold the whole
history, and after call `interval + 1` they hold that one gradient. The
re-warm and the clipping delay count from the reset, so they move by the same
one call; the spacing of resets is unchanged. The moments of every parameter
in the group are reset, including parameters that have no gradient in that
call.

Bias correction is not restarted by a reset. The per-parameter ``state["step"]``
is a float32 scalar tensor (float64 when the default dtype is float64), the
same type torch.optim.AdamW uses, counting the updates that parameter has
received since the start of training; 1 - beta^step uses it. This follows the
reference code (its per-parameter step keeps counting across resets) and the
paper's Algorithm 1 as published summaries reproduce it (1 - beta^t with the
global t). A consequence: on the first step after a reset, m/sqrt(v) is
(1-beta1)/sqrt(1-beta2) ~ 3.2 instead of ~1, corrected only by
sqrt(1-beta2^t)/(1-beta1^t); the re-warm factor of 0.01 on that step is what
keeps it small. kprune's mask machinery skips the key
"step" and only zeroes state tensors of the parameter's shape, so this scalar
is never touched by pruning.

When clipping applies. The paper's update rule states no delay, but right after a
start or reset v is zero or holds a handful of gradients, and every element
would count as a spike. The reference code therefore skips clipping until 20
steps have gone by (``grad_accu_steps=20``, both at the start and after each
reset). Here: clipping is applied on a call only once v has received at least
SPIKE_CLIP_DELAY = 20 updates since the start or the last reset, i.e. from
call 21 on and from the 21st call after each reset. (The reference starts one
call earlier at the very beginning of training, with 19 updates; this module
uses the same rule before and after resets.) The comparison uses the raw EMA
v (not bias corrected, as in the paper's rule and the reference), strictly
greater than, and with AMSGrad the EMA rather than its running maximum. The
caller's ``p.grad`` is not modified. An element whose v is exactly 0 once
clipping is active has any non-zero gradient clipped to 0: as in the
reference, an element silent for 20+ steps since the last reset stays
frozen until the next one. theta = float("inf") disables clipping.

Re-warm formula. With k = 0, 1, ... counting the calls after a reset (k = 0
is the first call after it), the Adam term of call k is multiplied by

    factor(k) = 0.01 + 0.99 * (1 - cos(pi * k / (warmup + 1))) / 2   for k < warmup
    factor(k) = 1                                                    for k >= warmup

which is the reference code's 1 - CosineAnnealingLR(0.99 -> 0, T_max=warmup+1)
schedule: 0.01 at k = 0, strictly increasing, ~0.9998 at k = warmup - 1 and 1
from k = warmup on. There is no re-warm before the first reset (the training
loop's own LR warmup covers the start). The factor multiplies ``group["lr"]``
as the external LR schedule set it for that call; it never writes the lr. As
in the reference, it scales only the Adam term, not the decoupled weight
decay. ``rewarm_factor(group)`` returns the factor the group's most recent
call used (1.0 before the first call); ``cosine_rewarm(k, warmup)`` is the
formula itself.

AdamW parity. With clipping disabled, no reset within the run and warmup = 0,
the update is torch.optim.AdamW's single-tensor update, operation for
operation: p <- p * (1 - lr * wd), then m, v updated, then
p <- p - lr * factor / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps).
(The reference code applies the decay after the Adam term; the difference is
of order lr^2 * wd.) AMSGrad keeps ``max_exp_avg_sq`` as AdamW does, and a
reset zeroes it too, otherwise the old maximum would outlive the reset.

Pruning. State keys are ``step`` (scalar), ``exp_avg``, ``exp_avg_sq`` and,
with amsgrad, ``max_exp_avg_sq``; every per-element state has the parameter's
shape. eps must be > 0 so that a weight with zero gradient and zero moments
gets 0 / (0 + eps) = 0: never clipped (0 > theta * 0 is false), decayed as
0 * (1 - lr * wd) = 0, so pruned weights stay exactly 0 through resets.

Hyper-parameters live in the param groups (defaults from the constructor), so a
group may override theta, interval or warmup as well as lr and weight_decay.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

SPIKE_CLIP_DELAY = 20  # v must have this many updates since start/reset before clipping applies
REWARM_FLOOR = 0.01  # re-warm factor on the first call after a reset

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def cosine_rewarm(k: int, warmup: int) -> float:
    """Update scale for the k-th call after a momentum reset (k = 0 is the first)."""
    if k >= warmup:
        return 1.0
    return REWARM_FLOOR + (1.0 - REWARM_FLOOR) * 0.5 * (1.0 - math.cos(math.pi * k / (warmup + 1)))


def _factor_for_call(t: int, interval: int, warmup: int) -> float:
    """Re-warm factor of call t (1-based) of a group."""
    if t <= interval:  # no reset has happened yet
        return 1.0
    return cosine_rewarm((t - 1) % interval, warmup)


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(group: dict) -> None:
    """Raise ValueError naming the first invalid hyper-parameter of a (merged) group."""
    lr = group["lr"]
    if not (_is_real(lr) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"AdamWSPAM: invalid lr={lr!r}: must be a finite number >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"AdamWSPAM: invalid betas={betas!r}: must be two numbers in [0, 1)")
    eps = group["eps"]
    if not (_is_real(eps) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"AdamWSPAM: invalid eps={eps!r}: must be a finite number > 0 "
                         "(eps = 0 would turn the update of a pruned weight into 0/0)")
    wd = group["weight_decay"]
    if not (_is_real(wd) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"AdamWSPAM: invalid weight_decay={wd!r}: must be a finite number >= 0")
    if not isinstance(group["amsgrad"], bool):
        raise ValueError(f"AdamWSPAM: invalid amsgrad={group['amsgrad']!r}: must be True or False")
    theta = group["theta"]
    if not (_is_real(theta) and theta > 0):  # NaN fails `> 0`; inf disables clipping
        raise ValueError(f"AdamWSPAM: invalid theta={theta!r}: must be a number > 0 "
                         "(float('inf') disables spike clipping)")
    interval = group["interval"]
    if not (_is_int(interval) and interval >= 1):
        raise ValueError(f"AdamWSPAM: invalid interval={interval!r}: must be an integer >= 1 "
                         "(steps between momentum resets)")
    warmup = group["warmup"]
    if not (_is_int(warmup) and 0 <= warmup < interval):
        raise ValueError(f"AdamWSPAM: invalid warmup={warmup!r}: must be an integer with "
                         f"0 <= warmup < interval (= {interval}), so the re-warm ends before the next reset")


class AdamWSPAM(Optimizer):
    """AdamW with SPAM's spike-aware clipping, periodic momentum reset and cosine re-warm.

    See the module docstring for the update rule, the defaults' source and the
    exact timing of clipping, resets and re-warm.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 theta: float = 5000.0, interval: int = 500, warmup: int = 150):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, theta=theta, interval=interval,
                        warmup=warmup)
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate(merged)
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("spam_step", 0)

    def rewarm_factor(self, group: dict | int = 0) -> float:
        """The re-warm factor the group's most recent step() used (1.0 before any step).

        `group` is a param group dict or its index in `param_groups`.
        """
        g = self.param_groups[group] if isinstance(group, int) else group
        t = g.get("spam_step", 0)
        return 1.0 if t == 0 else _factor_for_call(t, g["interval"], g["warmup"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        t = group.get("spam_step", 0) + 1
        group["spam_step"] = t
        interval, warmup = group["interval"], group["warmup"]
        since_reset = (t - 1) % interval  # updates v has had since the start or the last reset
        factor = _factor_for_call(t, interval, warmup)
        theta = float(group["theta"])
        clip = since_reset >= SPIKE_CLIP_DELAY and math.isfinite(theta)
        beta1, beta2 = group["betas"]
        lr, wd, eps, amsgrad = group["lr"], group["weight_decay"], group["eps"], group["amsgrad"]
        if t > 1 and since_reset == 0:
            # Momentum reset, at the start of call interval + 1 (the reference code: call
            # interval; see the module docstring). Between calls the moments stay informative,
            # where state-based pruning reads them: a mask update right after call 500 still
            # sees Adam's history.
            for p in group["params"]:
                for key in _MOMENT_KEYS:
                    if key in self.state.get(p, {}):
                        self.state[p][key].zero_()

        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("AdamWSPAM does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1

            if clip:
                limit_sq = exp_avg_sq * theta  # v from before this step's update
                # Always applied, never `if spiked.any()`: asking would make the host wait for the GPU
                # once per parameter per step; where nothing spiked, torch.where returns grad itself.
                grad = torch.where(grad * grad > limit_sq, grad.sign() * limit_sq.sqrt(), grad)

            if wd != 0:
                p.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

            step = state["step"].item()
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            if amsgrad:
                max_sq = state["max_exp_avg_sq"]
                torch.maximum(max_sq, exp_avg_sq, out=max_sq)
                denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-(lr * factor / bias_correction1))


