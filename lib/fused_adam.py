"""kprune's Adam and AdamW: one pass per weight, with the pruning mask applied inside it.

Between mask updates a pruned weight must get no update. A separate pass that
zeroes the gradients of pruned weights reads the weights and reads and writes
the gradients (12 bytes a weight) beside an Adam step that moves 28: it cost
more than torch's fused step itself. Here the step does it: a weight the
pruner marked as masked (`masked_params`) that is exactly 0 (every pruned
weight is) takes its gradient and its moments as 0 in the same pass that
updates it (lib/adam_step.c), so a mask update zeroes only the weights it
prunes: their moments are zero after the next step, and nothing reads them
before it. Dense runs use the same kernel with no parameter masked,
so a pruned arm and its dense baseline share the update arithmetic.

On CPU the kernel is plain C, compiled once per machine with the system's C
compiler into kprune's cache directory and loaded with ctypes (lib/native.py):
about a second the first time, nothing afterwards. `reference_update` is the
same arithmetic as torch operations, one rounding per operation in the C
order, so the two agree bit for bit (tests/lib/test_fused_adam.py checks
it); it serves tensors the C kernel cannot take (not float32, not contiguous,
not on the CPU) and machines without a C compiler (with one warning), and on
CUDA it runs compiled by torch.compile into one fused kernel per parameter.

Gradient clipping happens inside the step too: `step(grad_scale=c)`
multiplies every gradient by the clipping coefficient c in the same pass
(lib/grad_clip.py computes c from the gradients as the step will use them,
with `grad_sumsq` below), so neither the masking nor the clipping rewrites
the gradients.
"""

from __future__ import annotations

import ctypes
import math
import struct
import sys
from pathlib import Path

import torch

from lib import native

SOURCE = Path(__file__).with_name("adam_step.c")


class _Tensor(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("vmax", ctypes.c_void_p), ("n", ctypes.c_int64), ("step_size", ctypes.c_float),
                ("bc2_sqrt", ctypes.c_float), ("mask", ctypes.c_int)]


class _Scalars(ctypes.Structure):
    _fields_ = [("one_minus_beta1", ctypes.c_float), ("beta2", ctypes.c_float), ("one_minus_beta2", ctypes.c_float),
                ("eps", ctypes.c_float), ("decay", ctypes.c_float), ("l2", ctypes.c_float),
                ("grad_scale", ctypes.c_float)]


class _NormTensor(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("g", ctypes.c_void_p), ("n", ctypes.c_int64), ("mask", ctypes.c_int),
                ("pruned", ctypes.c_void_p)]


_LIBRARY: ctypes.CDLL | None = None
_UNAVAILABLE: str | None = None  # why the C kernel could not be built (warned once)


def library() -> ctypes.CDLL | None:
    """The compiled CPU kernel, or None (with one warning) where it cannot be built."""
    global _LIBRARY, _UNAVAILABLE
    if _LIBRARY is None and _UNAVAILABLE is None:
        try:
            _LIBRARY = native.build(SOURCE)
            _LIBRARY.kprune_adam_step.argtypes = [ctypes.POINTER(_Tensor), ctypes.c_int, ctypes.POINTER(_Scalars),
                                                  ctypes.c_int]
            _LIBRARY.kprune_adam_step.restype = ctypes.c_int
            _LIBRARY.kprune_grad_sumsq.argtypes = [ctypes.POINTER(_NormTensor), ctypes.c_int, ctypes.c_int]
            _LIBRARY.kprune_grad_sumsq.restype = ctypes.c_double
        except native.BuildError as exc:
            _UNAVAILABLE = str(exc)
            print(f"warning: kprune's C Adam kernel could not be built ({_UNAVAILABLE}); Adam/AdamW run the same "
                  "arithmetic as separate torch operations (slower). Install a C compiler (e.g. apt-get install "
                  "gcc) or set CC.", file=sys.stderr)
    return _LIBRARY


def _f32(x: float) -> float:
    """x rounded to float32, as the C kernel receives it (struct: no tensor per scalar on the step's path)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _scalars(group: dict, decoupled: bool) -> dict:
    beta1, beta2 = group["betas"]
    wd, lr = group["weight_decay"], group["lr"]
    return {"one_minus_beta1": _f32(1 - beta1), "beta2": _f32(beta2), "one_minus_beta2": _f32(1 - beta2),
            "eps": _f32(group["eps"]), "decay": _f32(1 - lr * wd) if decoupled else 1.0,
            "l2": 0.0 if decoupled else _f32(wd)}


def reference_update(w, g, m, v, vmax, step_size: float, bc2_sqrt: float, s: dict, mask: bool,
                     grad_scale: float | torch.Tensor = 1.0) -> None:
    """The kernel's arithmetic on whole tensors, in its order (each operation rounds to w's dtype).

    `grad_scale` (a float32 value, or a 0-d tensor on w's device) multiplies the gradient first.
    """
    if torch.is_tensor(grad_scale) or grad_scale != 1.0:  # times 1 is exact: skipped
        g = g * grad_scale
    if mask:  # a pruned (exactly-zero) weight takes its gradient and its moments as 0
        pruned, zero = w == 0, torch.zeros((), dtype=g.dtype, device=g.device)
        g, m_in, v_in = torch.where(pruned, zero, g), torch.where(pruned, zero, m), torch.where(pruned, zero, v)
        vmax_in = None if vmax is None else torch.where(pruned, zero, vmax)
    else:
        m_in, v_in, vmax_in = m, v, vmax
    if s["l2"] != 0.0:
        g = g + s["l2"] * w
    wn = w * s["decay"]  # exact when it is 1 (Adam, or no weight decay)
    mi = m_in + s["one_minus_beta1"] * (g - m_in)
    vi = s["beta2"] * v_in + s["one_minus_beta2"] * (g * g)
    vv = vi
    if vmax is not None:
        vv = torch.maximum(vmax_in, vi)
        vmax.copy_(vv)
    # torch.sqrt on the CPU may be off by one unit in the last place; the square root taken in
    # float64 and rounded once is the correctly rounded float32 one, as C's sqrtf.
    denom = torch.sqrt(vv.double()).to(vv.dtype) / bc2_sqrt + s["eps"]
    w.copy_(wn + (-step_size) * (mi / denom))
    m.copy_(mi)
    v.copy_(vi)


_COMPILED_REFERENCE = None


def _device_update(*args) -> None:
    """reference_update for CUDA tensors, compiled into one kernel per parameter (dynamic shapes)."""
    global _COMPILED_REFERENCE
    if _COMPILED_REFERENCE is None:
        _COMPILED_REFERENCE = torch.compile(reference_update, dynamic=True)
    _COMPILED_REFERENCE(*args)


def grad_sumsq(tensors: list[tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]]) -> float | None:
    """The sum of the squares of the gradients g of (w, g, mask, pruned) in one threaded C pass, leaving out,
    where `mask`, the g whose bit is set in `pruned` (the pruner's packed mask bits: uint8, CPU, contiguous)
    or, without bits, whose w == 0; in float64, the same for any thread count. None without the C kernel
    (the tensors must pass `c_ready`)."""
    lib = library()
    if lib is None:
        return None
    items = [_NormTensor(w.data_ptr(), g.data_ptr(), w.numel(), int(mask),
                         pruned.data_ptr() if mask and pruned is not None else None) for w, g, mask, pruned in tensors]
    total = lib.kprune_grad_sumsq((_NormTensor * len(items))(*items), len(items), torch.get_num_threads())
    if total == -1.0:
        raise MemoryError("kprune_grad_sumsq could not allocate its block sums")
    return total


def c_ready(*tensors) -> bool:
    """Whether the C kernels take these tensors: float32, contiguous, on the CPU (None: absent)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                             and t.layout == torch.strided) for t in tensors)


class _KpruneAdamMixin:
    """The step shared by KpruneAdam and KpruneAdamW (state layout as torch's Adam: step, exp_avg, exp_avg_sq)."""

    decoupled = False

    def _init_masking(self) -> None:
        for group in self.param_groups:
            if group.get("maximize") or group.get("capturable") or group.get("differentiable"):
                raise ValueError("kprune's Adam/AdamW support neither maximize, capturable nor differentiable")
        # ids of the parameters whose exactly-zero weights take no gradient (set by the pruner)
        self.masked_params: frozenset[int] = frozenset()
        # their packed mask bits, by id (set by the pruner): clipping's norm leaves out the pruned weights by them
        self.pruned_bits: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float | torch.Tensor = 1.0):
        """One step; every gradient is taken multiplied by `grad_scale` (gradient clipping's coefficient:
        a float, or a 0-d float32 tensor on the parameters' device, read there without a wait)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lib = library()
        c_scale = None  # the scale as the C kernel takes it, read once
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            s = _scalars(group, self.decoupled)
            batch: list[_Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("kprune's Adam/AdamW do not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                step_size = _f32(group["lr"] / (1 - beta1 ** t))
                bc2_sqrt = _f32(math.sqrt(1 - beta2 ** t))
                w, g, m, v = p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"]
                vmax = state.get("max_exp_avg_sq") if group["amsgrad"] else None
                mask = id(p) in self.masked_params
                if lib is not None and c_ready(w, g, m, v, vmax):
                    batch.append(_Tensor(w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                                         vmax.data_ptr() if vmax is not None else None, w.numel(),
                                         step_size, bc2_sqrt, int(mask)))
                elif w.device.type == "cuda":
                    _device_update(w, g, m, v, vmax, step_size, bc2_sqrt, s, mask, grad_scale)
                else:
                    reference_update(w, g, m, v, vmax, step_size, bc2_sqrt, s, mask, grad_scale)
            if batch:
                if c_scale is None:
                    c_scale = _f32(float(grad_scale))
                lib.kprune_adam_step((_Tensor * len(batch))(*batch), len(batch), _Scalars(**s, grad_scale=c_scale),
                                     torch.get_num_threads())
        return loss


class KpruneAdam(_KpruneAdamMixin, torch.optim.Adam):
    """torch.optim.Adam's interface and state, kprune's step (L2 weight decay)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, foreach=False, fused=False, **kwargs)
        self._init_masking()


class KpruneAdamW(_KpruneAdamMixin, torch.optim.AdamW):
    """torch.optim.AdamW's interface and state, kprune's step (decoupled weight decay)."""

    decoupled = True

    def __init__(self, params, **kwargs):
        super().__init__(params, foreach=False, fused=False, **kwargs)
        self._init_masking()
