"""A physically smaller GPT-2: the attention heads and MLP neurons pruning removed whole, taken out.

A unit whose output weights are all zero adds nothing to the residual stream,
whatever its inputs: an MLP neuron whose column of mlp.c_proj is zero, a head
whose head_dim columns of attn.c_proj are zero. Such units are cut out of
every matrix they appear in (a neuron: its c_fc row and bias and c_proj
column; a head: its q, k and v rows and biases of c_attn and its c_proj
columns), so the smaller model computes what the masked one does, up to the
order of floating-point sums. The units are the ones channel pruning uses
(gpt2/train.py `channel_units`), cut by lib/shrink.py. Channel pruning
removes whole units by construction; any other structure yields a smaller
model only where it happened to zero a unit's whole output.
"""

from __future__ import annotations

import dataclasses

import torch

from gpt2.model import GPT
from gpt2.train import channel_units
from lib.shrink import kept_units, shrunk_state

UNITS = "attention head or MLP neuron"  # what a unit is, for messages


@torch.no_grad()
def shrink(model: GPT) -> GPT:
    """The smaller GPT-2 computing what `model` computes, without its removable heads and neurons.

    A block may keep no head or no neuron at all: its attention or MLP then adds only its output bias.
    """
    if model.cfg.heads is not None or model.cfg.hidden is not None:
        raise ValueError("shrink takes a full-width GPT-2, not one already made smaller")
    units = channel_units(model)
    kept = kept_units(units)  # per block: its heads, then its neurons
    cfg = dataclasses.replace(model.cfg, heads=tuple(len(k) for k in kept[0::2]),
                              hidden=tuple(len(k) for k in kept[1::2]))
    small = GPT(cfg)
    small.load_state_dict(shrunk_state(model, units, kept))
    return small.eval()


def describe(small: GPT) -> str:
    """What the smaller model keeps, block by block."""
    return f"heads per block {list(small.cfg.heads)}, MLP neurons per block {list(small.cfg.hidden)}"
