"""GPT-2: a decoder-only transformer, readable top to bottom.

The model knows nothing about pruning. The token embedding and the output
layer share one weight matrix (`wte.weight is lm_head.weight`), as in GPT-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int = 50304  # 50,257 tokens padded to a multiple of 64: faster matmuls
    dropout: float = 0.0
    # Per block, for a model made smaller by removing whole heads and MLP neurons (gpt2/shrink.py):
    # heads kept and MLP width. None: n_head heads and 4 x n_embd neurons in every block.
    heads: tuple[int, ...] | None = None
    hidden: tuple[int, ...] | None = None


SIZES: dict[str, tuple[int, int, int]] = {  # name -> (layers, heads, width)
    "tiny": (4, 4, 128),
    "124m": (12, 12, 768),
    "350m": (24, 16, 1024),
    "774m": (36, 20, 1280),
    "1558m": (48, 25, 1600),
}


def config_for(size: str, block_size: int, dropout: float) -> GPTConfig:
    n_layer, n_head, n_embd = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, dropout=dropout)


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, cfg.n_embd // cfg.n_head
        inner = n_head * self.head_dim  # n_embd, unless heads were removed
        self.c_attn = nn.Linear(cfg.n_embd, 3 * inner)
        self.c_proj = nn.Linear(inner, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        inner = self.n_head * self.head_dim
        if inner == 0:  # every head removed: the block adds c_proj's bias alone
            return self.resid_drop(self.c_proj(x.new_zeros(b, t, 0)))
        q, k, v = self.c_attn(x).split(inner, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, inner)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg, cfg.heads[index] if cfg.heads else cfg.n_head)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg, cfg.hidden[index] if cfg.hidden else 4 * cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one parameter
        self.apply(self._init)
        # GPT-2's scaled init of the projections into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss
