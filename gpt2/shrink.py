"""A physically smaller GPT-2: the attention heads and MLP neurons pruning removed whole, taken out.

A unit whose output weights are all zero adds nothing to the residual stream,
whatever its inputs: an MLP neuron whose column of mlp.c_proj is zero, a head
whose head_dim columns of attn.c_proj are zero. Such units are cut out of
every matrix they appear in (a neuron: its c_fc row and bias and c_proj
column; a head: its q, k and v rows and biases of c_attn and its c_proj
columns), so the smaller model computes what the masked one does, up to the
order of floating-point sums. Channel pruning removes whole units by
construction; any other structure yields a smaller model only where it
happened to zero a unit's whole output.
"""

from __future__ import annotations

import dataclasses

import torch

from gpt2.model import GPT


def removable_units(model: GPT) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block: the heads and the MLP neurons to keep (index tensors), the rest having zero output weights."""
    heads, neurons = [], []
    head_dim = model.cfg.n_embd // model.cfg.n_head
    for block in model.blocks:
        proj = block.attn.c_proj.weight  # [n_embd, heads * head_dim]: a head's columns are consecutive
        alive = proj.detach().ne(0).view(proj.shape[0], -1, head_dim).any(dim=2).any(dim=0)
        heads.append(alive.nonzero().flatten())
        neurons.append(block.mlp.c_proj.weight.detach().ne(0).any(dim=0).nonzero().flatten())
    return heads, neurons


@torch.no_grad()
def shrink(model: GPT) -> GPT:
    """The smaller GPT-2 computing what `model` computes, without its removable heads and neurons."""
    if model.cfg.heads is not None or model.cfg.hidden is not None:
        raise ValueError("shrink takes a full-width GPT-2, not one already made smaller")
    keep_heads, keep_neurons = removable_units(model)
    cfg = dataclasses.replace(model.cfg, heads=tuple(len(h) for h in keep_heads),
                              hidden=tuple(len(n) for n in keep_neurons))
    small = GPT(cfg)
    state = model.state_dict()
    out = {}
    head_dim, width = model.cfg.n_embd // model.cfg.n_head, model.cfg.n_embd
    for i, (heads, neurons) in enumerate(zip(keep_heads, keep_neurons)):
        cols = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # the kept heads' channels
        qkv = torch.cat([cols + part * width for part in range(3)])  # their q, k and v rows of c_attn
        p = f"blocks.{i}."
        out[p + "attn.c_attn.weight"] = state[p + "attn.c_attn.weight"][qkv]
        out[p + "attn.c_attn.bias"] = state[p + "attn.c_attn.bias"][qkv]
        out[p + "attn.c_proj.weight"] = state[p + "attn.c_proj.weight"][:, cols]
        out[p + "mlp.c_fc.weight"] = state[p + "mlp.c_fc.weight"][neurons]
        out[p + "mlp.c_fc.bias"] = state[p + "mlp.c_fc.bias"][neurons]
        out[p + "mlp.c_proj.weight"] = state[p + "mlp.c_proj.weight"][:, neurons]
    small.load_state_dict({**state, **out})
    return small.eval()
