"""The one mask machinery every pruning method shares.

Which weights are pruned is kept as one bit per weight (packed, 8 weights to
a byte): the exact record the pruned counts and "pruned stays pruned" rest
on, at 1/32 of the weights' own memory.

Between mask updates the only per-step work is zeroing the gradients of
pruned weights (done here, or inside kprune's Adam step: lib/fused_adam.py),
and that alone keeps them at exactly zero: with zero
gradient and zero moments Adam's update is 0 / (0 + eps) = 0, decoupled
weight decay scales 0 to 0, L2 decay adds wd * 0 = 0 to the gradient,
AMSGrad's maximum stays 0, momentum buffers stay 0. Since a pruned weight is
exactly 0, the per-step pass reads that from the weight itself (w == 0), in
cache-sized chunks, instead of unpacking the bits: one pass over the weights
and gradients. (A weight that is not pruned but happens to be exactly 0.0
also gets a zero gradient for that step; its momentum still moves it. The
bits, not the zeros, decide what is pruned.)

At a mask update the newly pruned weights and every optimizer state of the
same shape (moments, AMSGrad maximum, momentum buffers) are zeroed once.

A structure may attach parameters outside the pool whose entries go with
pruned groups (a pruned neuron's bias, a pruned filter's BatchNorm scale and
shift). They are not counted as weights and are small, so each keeps a
plain bool "kept" mask and is masked by it, not by `w == 0`: a bias that is
legitimately 0 (GPT-2 starts its biases at 0) must still train.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

CHUNK = 1 << 20  # elements per pass chunk: the chunk's temporaries stay in cache; a multiple of 8
# On a GPU cache blocking buys nothing and every chunk costs kernel launches: whole tensors, up to
# this many elements (more than any GPT-2 124M weight; caps the temporaries). A multiple of 8.
GPU_CHUNK = 1 << 27
_BIT_WEIGHTS = None
_UNPACK_TABLE = None
_POPCOUNT = None


def _tables(device: torch.device):
    global _BIT_WEIGHTS, _UNPACK_TABLE, _POPCOUNT
    if _UNPACK_TABLE is None or _UNPACK_TABLE.device != device:
        byte = torch.arange(256, device=device)
        _UNPACK_TABLE = ((byte[:, None] >> torch.arange(8, device=device)) & 1).bool()  # 256 x 8
        _POPCOUNT = _UNPACK_TABLE.sum(1, dtype=torch.int64)
        _BIT_WEIGHTS = (1 << torch.arange(8, device=device)).to(torch.uint8)
    return _BIT_WEIGHTS, _UNPACK_TABLE, _POPCOUNT


# Multiplying by a bool mask is branch-free and several times faster than
# masked_fill_ or torch.where with an irregular mask, which is what pruning
# masks are: every "zero where pruned" below is a multiply by "kept".


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 bytes, 8 flags per byte, least significant bit first."""
    weights, _, _ = _tables(mask.device)
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).view(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes -> the first `n` flags as a flat bool tensor."""
    _, table, _ = _tables(bits.device)
    return table.index_select(0, bits.int()).view(-1)[:n]


def chunk_size(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else GPU_CHUNK


def chunks(n: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """(start, length) pieces of `size` elements covering 0..n."""
    for start in range(0, n, size):
        yield start, min(size, n - start)


class PrunedView:
    """Read-only, list-like access to the masks as bool tensors (unpacked on demand)."""

    def __init__(self, masks: "MaskSet"):
        self._masks = masks

    def __len__(self) -> int:
        return len(self._masks.params)

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return [self._masks.pruned_mask(j) for j in range(len(self))[i]]
        return self._masks.pruned_mask(i)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


class MaskSet:
    """Pruned-weight masks for a fixed list of parameters, one bit per weight."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]):
        seen: set[int] = set()
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, p in named_params:
            if id(p) in seen:  # a tied parameter is one parameter, pruned and counted once
                continue
            seen.add(id(p))
            self.names.append(name)
            self.params.append(p)
        self.bits: list[torch.Tensor] = [torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8, device=p.device)
                                         for p in self.params]
        self.numel = sum(p.numel() for p in self.params)
        self.pruned_count = 0
        # (parameter outside the pool, bool "kept" mask of its shape), set by a structure
        self.attached: list[tuple[nn.Parameter, torch.Tensor]] = []
        # A structure's own record of its pruned groups (one flag per tile or unit), counted as mask memory.
        self.group_state: list[torch.Tensor] = []
        # Set by the pruner when the optimizer's step takes a pruned (exactly-zero) pooled weight's states as 0
        # itself (kprune's Adam/AdamW masking in their step): pruning then zeroes only the weight.
        self.states_zeroed_by_step = False
        self._param_ids = frozenset(id(p) for p in self.params)

    # ------------------------------------------------------------ reading

    @property
    def pruned(self) -> PrunedView:
        return PrunedView(self)

    def pruned_mask(self, i: int) -> torch.Tensor:
        """Parameter i's mask as a bool tensor of its shape (True = pruned)."""
        p = self.params[i]
        return unpack_bits(self.bits[i], p.numel()).view(p.shape)

    def pruned_chunk(self, i: int, start: int, length: int) -> torch.Tensor:
        """Flags of elements start..start+length of parameter i (start a multiple of 8)."""
        return unpack_bits(self.bits[i][start // 8:(start + length + 7) // 8], length)

    def pruned_flags(self) -> list[bool]:
        """Whether each parameter has a pruned weight: one read from the device for all of them."""
        if not self.bits:
            return []
        return torch.stack([b.any() for b in self.bits]).tolist()

    def count(self) -> int:
        """Pruned weights according to the bits (recounted, not cached)."""
        return sum(self.counts())

    def counts(self) -> list[int]:
        """Pruned weights per parameter, read from the device once for all of them."""
        out = []
        for b in self.bits:
            _, _, popcount = _tables(b.device)
            # in chunks: the int64 popcounts of every byte would be a weight-sized temporary
            out.append(sum((popcount.index_select(0, part.int()).sum() for part in b.split(CHUNK)),
                           torch.zeros((), dtype=torch.int64, device=b.device)))
        return torch.stack(out).tolist() if out else []

    @torch.no_grad()
    def zeros_in_weights(self) -> list[int]:
        """Exact zeros in each parameter, counted from the weights themselves."""
        return [int((p == 0).sum()) for p in self.params]

    def state_bytes(self) -> int:
        tensors = [*self.bits, *(kept for _, kept in self.attached), *self.group_state]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------ writing

    def clear(self) -> None:
        for b in self.bits:
            b.zero_()
        self.pruned_count = 0

    @torch.no_grad()
    def zero_pruned_grads(self) -> None:
        """grad = 0 wherever the weight is exactly 0 (every pruned weight is)."""
        scratch = None  # one chunk-sized workspace per call: no allocation per chunk
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            w, g = p.detach().view(-1), g.view(-1)
            if scratch is None or scratch.device != g.device:
                scratch = torch.empty(chunk_size(g.device), dtype=torch.bool, device=g.device)
            for start, n in chunks(w.numel(), scratch.numel()):
                g[start:start + n].mul_(torch.ne(w[start:start + n], 0, out=scratch[:n]))
        self.zero_attached_grads()

    @torch.no_grad()
    def zero_attached_grads(self) -> None:
        """grad = 0 where an attached parameter's entry belongs to a pruned group (by its kept mask)."""
        for p, kept in self.attached:
            if p.grad is not None:
                p.grad.mul_(kept)

    @staticmethod
    def _states(p: nn.Parameter, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        """The optimizer's states of p's shape (moments; not the step count)."""
        if optimizer is None:
            return []
        return [v for k, v in optimizer.state.get(p, {}).items() if k != "step" and torch.is_tensor(v)
                and v.shape == p.shape]

    def zero_targets(self, p: nn.Parameter, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        """What pruning p zeroes: the weight and every optimizer state of its shape (only the weight, for a
        pooled weight, where the step takes its states as 0: states_zeroed_by_step)."""
        if self.states_zeroed_by_step and id(p) in self._param_ids:
            return [p.detach()]
        return [p.detach(), *self._states(p, optimizer)]

    def _zero_pruned(self, targets_of, done: frozenset[int] = frozenset()) -> None:
        """Zero the pruned entries of each pooled parameter's tensors `targets_of(p)`, chunk by chunk."""
        any_pruned = self.pruned_flags()
        for i, p in enumerate(self.params):
            if i in done or not any_pruned[i]:
                continue
            flats = [t.view(-1) for t in targets_of(p)]
            for start, n in chunks(p.numel(), chunk_size(p.device)):
                kept = self.pruned_chunk(i, start, n).logical_not_()
                for t in flats:
                    t[start:start + n].mul_(kept)

    @torch.no_grad()
    def zero_pruned_states(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero the pruned weights' entries in every optimizer state of their shape. Where the step takes them
        as 0 (states_zeroed_by_step) an update leaves them to the next step: a checkpoint saved before it
        holds them as 0 all the same."""
        self._zero_pruned(lambda p: self._states(p, optimizer))

    @torch.no_grad()
    def zero_pruned_weights_and_states(self, optimizer: torch.optim.Optimizer | None,
                                       done: frozenset[int] = frozenset()) -> None:
        """Zero every pruned weight and its entries in every optimizer state of its shape
        (except parameters `done`: the selection's own pass has zeroed them)."""
        self._zero_pruned(lambda p: self.zero_targets(p, optimizer), done)
        for p, kept in self.attached:
            for t in self.zero_targets(p, optimizer):
                t.mul_(kept)
