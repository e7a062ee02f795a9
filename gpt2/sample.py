"""Text from a GPT-2: autoregressive sampling with temperature and top-k.

The logits of the padding rows (ids the tokenizer does not have: kprune pads
50,257 tokens to 50,304) are never sampled.
"""

from __future__ import annotations

import torch

from gpt2.model import GPT


@torch.no_grad()
def generate(model: GPT, ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
             generator: torch.Generator, n_vocab: int) -> list[int]:
    """`ids` followed by `max_new_tokens` sampled tokens.

    temperature 0 picks the most likely token (greedy), as top_k 1 does;
    top_k 0 samples from every token. The context is the last block_size
    tokens, the longest the position embedding covers. The model runs on
    its device; the choice is made on the CPU, with `generator`.
    """
    model.eval()
    device = model.wte.weight.device
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.cfg.block_size:]], dtype=torch.long, device=device)
        logits = model(context)[0][0, -1, :n_vocab].float().cpu()
        if temperature == 0:
            out.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if 0 < top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out.append(int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)))
    return out
