"""GPT-2 trainer: the model, the bundled Shakespeare tokens and perplexity.

Run by `make train` with flags derived from .config, or on its own:
`python -m gpt2.train --help` lists every flag and its Kconfig default.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from gpt2.hf import pretrained_gpt
from gpt2.model import GPT, config_for
from lib import distributed
from lib.cli import trainer_main
from lib.data.corpora import prepared_token_files
from lib.data.tokens import TokenBatches, prepare_tokens
from lib.pruning.calibration import calibration_generator
from lib.pruning.units import UnitFamily, Units, attention_heads, consecutive
from lib.settings import Settings
from lib.train_loop import Task

SHAKESPEARE = Path("shakespeare") / "shakespeare-plays.txt.gz"


def prunable_parameters(model: GPT, prune_embeddings: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """The weight matrices of the transformer blocks, plus the embeddings if asked.

    The output layer is the token embedding (tied), so it is in the pool
    exactly when the embeddings are, as one parameter.
    """
    pool = [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith(".weight")
            and p.dim() == 2]
    if prune_embeddings:
        pool += [("wte.weight", model.wte.weight), ("wpe.weight", model.wpe.weight)]
    return pool


def channel_units(model: GPT) -> Units:
    """Every attention head and MLP hidden neuron, one family per block and kind, in depth order.

    A head is its q, k and v rows of c_attn with their biases and its input
    columns of attn.c_proj; a neuron is its c_fc row and bias and its input
    column of mlp.c_proj. The embeddings are never units: the token
    embedding's rows are also the logits (tied), and the position
    embedding's columns are the residual stream, which every block adds to.
    """
    width, n_head = model.cfg.n_embd, model.cfg.n_head
    families = []
    for i, block in enumerate(model.blocks):
        attn, mlp, prefix = block.attn, block.mlp, f"blocks.{i}"
        families.append(UnitFamily(f"{prefix}.attn.heads", (
            attention_heads(f"{prefix}.attn.c_attn.weight", attn.c_attn.weight, n_head, width),
            attention_heads(f"{prefix}.attn.c_attn.bias", attn.c_attn.bias, n_head, width),
            consecutive(f"{prefix}.attn.c_proj.weight", attn.c_proj.weight, 1, n_head, width // n_head))))
        hidden = mlp.c_fc.out_features
        families.append(UnitFamily(f"{prefix}.mlp.neurons", (
            consecutive(f"{prefix}.mlp.c_fc.weight", mlp.c_fc.weight, 0, hidden),
            consecutive(f"{prefix}.mlp.c_fc.bias", mlp.c_fc.bias, 0, hidden),
            consecutive(f"{prefix}.mlp.c_proj.weight", mlp.c_proj.weight, 1, hidden))))
    return Units(families, left_out={
        "wte.weight": "the token embedding is tied to the output layer: its rows are the logits",
        "wpe.weight": "the position embedding's columns are the residual stream, which no unit owns"})


def layer_group(name: str) -> str:
    """Sparsity-report group of a parameter: blocks.<i>, or the embedding."""
    if name.startswith("blocks."):
        return "blocks." + name.split(".")[1]
    return name.split(".")[0]


def token_files(data_dir: Path, dataset: str) -> tuple[Path, Path]:
    """train.bin and val.bin of `dataset`: the bundled one is prepared here, others by make data-gpt2."""
    if dataset == "shakespeare":
        prepared = prepare_tokens(data_dir / SHAKESPEARE, data_dir / "prepared" / "shakespeare-gpt2")
        return prepared.train_path, prepared.val_path
    return prepared_token_files(data_dir, dataset)


def build_model(s: Settings) -> GPT:
    """A fresh GPT-2 (GPT2_INIT=scratch) or the pretrained one GPT2_PRETRAINED names, to fine-tune and prune."""
    if s.gpt2_init == "pretrained":
        return pretrained_gpt(s.gpt2_pretrained, s.gpt2_size, s.block_size, s.dropout)
    return GPT(config_for(s.gpt2_size, s.block_size, s.dropout))


def build_task(s: Settings, device: torch.device) -> Task:
    train_path, val_path = token_files(Path(s.data_dir), s.gpt2_dataset)
    train = TokenBatches(train_path, s.block_size)
    val = TokenBatches(val_path, s.block_size)
    model = build_model(s)
    rank, _ = distributed.world()
    # Each rank draws its own windows (its shard of the random stream); rank 0 draws what a single process does.
    train_gen = torch.Generator().manual_seed(s.seed + 7919 * rank)

    def next_batch():
        return train.sample(s.batch_size, train_gen, device)

    def calibration_batches(n: int) -> list[tuple]:
        gen = calibration_generator(s.seed)  # the training split, not its stream: train_gen does not move
        return [train.sample(s.batch_size, gen, device) for _ in range(n)]

    def loss(m, batch):
        return m(*batch)[1]

    def evaluate(m) -> dict:
        # The same validation batches at every evaluation: curves compare like with like.
        gen = torch.Generator().manual_seed(s.seed + 1)
        batches = (val.sample(s.batch_size, gen, device) for _ in range(s.eval_iters))
        # Under DDP each rank evaluates its share of them; one sum over the ranks at the end.
        [total] = distributed.shard_sum(((lambda b=b: m(*b)[1]) for b in batches), device)
        val_loss = total / s.eval_iters
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}

    return Task(name=f"gpt2-{s.gpt2_size}", model=model, data_state=lambda: {"generator": train_gen.get_state()},
                load_data_state=lambda state: train_gen.set_state(state["generator"]), prunable=prunable_parameters(model, s.prune_embeddings),
                group_of=layer_group, units=channel_units(model), next_batch=next_batch, loss=loss, evaluate=evaluate,
                calibration_batches=calibration_batches,
                items_per_step=s.batch_size * s.block_size, item_unit="tokens", quality_key="val_ppl",
                extra_summary={"dataset": s.gpt2_dataset, "train_tokens": len(train), "val_tokens": len(val)})


def main(argv: list[str] | None = None) -> int:
    return trainer_main("gpt2", build_task, argv, prog="python -m gpt2.train",
                        description="Train GPT-2 with kprune's shared loop, optimizers and pruning.")


if __name__ == "__main__":
    sys.exit(main())
