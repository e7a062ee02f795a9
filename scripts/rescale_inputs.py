"""Give a GPT-2 export outlier input features without changing what it computes.

    python -m scripts.rescale_inputs --hf DIR --out DIR [--sigma S] [--seed N]

Large language models carry a few input features (columns of X) far larger
than the rest; Wanda's |W|·‖X‖ was built for them, and magnitude pruning
cannot see them. A small model trained briefly has none, so on it Wanda and
magnitude choose nearly the same weights. This tool makes the difference
visible on any Hugging Face GPT-2 directory: every block's LayerNorm in
front of `c_attn` and `c_fc` scales channel j by s_j = exp(sigma · z_j)
(z_j standard normal, from SEED), and the layer that reads it divides input
column j by s_j. The model's outputs are unchanged (checked: the largest
logit difference is printed and must stay below 1e-3), its inputs now spread
like outlier features (the largest over the median input-column norm of each
pruned layer, before and after, on the run's calibration batches, is
printed), and its weights' magnitudes no longer say what matters. Prune both
directories prune-only (GPT2_PRETRAINED) to compare. Wanda's scores do not
change at all; magnitude's do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lib.errors import KpruneError

TOLERANCE = 1e-3  # largest logit difference allowed: the rescaled model must compute the same function


@torch.no_grad()
def rescale_(model, sigma: float, seed: int) -> None:
    """Scale each LayerNorm channel feeding c_attn and c_fc by s_j and divide that input column by s_j, in place."""
    gen = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for norm, layer in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
            s = torch.exp(sigma * torch.randn(norm.weight.shape, generator=gen))
            norm.weight.mul_(s)
            norm.bias.mul_(s)
            layer.weight.div_(s)


@torch.no_grad()
def input_spread(model, batches: list[tuple], loss) -> dict[str, float]:
    """Per block Linear layer: the largest input-column norm over the median one, on `batches`."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_layer, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
        return add
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    try:
        model.eval()
        for batch in batches:
            loss(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: round(float(s.sqrt().max() / s.sqrt().median()), 2) for n, s in sums.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.rescale_inputs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="a Hugging Face GPT-2 directory (e.g. a run's export/hf)")
    parser.add_argument("--out", required=True, help="where to write the rescaled copy (created)")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-scale spread of the channel factors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-batches", type=int, default=16)
    args = parser.parse_args(argv)
    from gpt2.hf import read_hf_dir, write_hf_dir
    from gpt2.train import build_task
    from lib.cli import build_parser
    from lib.settings import settings_from_namespace
    try:
        source, out = Path(args.hf), Path(args.out)
        if not args.sigma > 0:
            raise KpruneError(f"--sigma {args.sigma} must be above 0")
        if out.exists() and any(out.iterdir()):
            raise KpruneError(f"--out {out} is not empty: give a new directory")
        original = read_hf_dir(source).eval()
        model = read_hf_dir(source).eval()
        rescale_(model, args.sigma, args.seed)
        idx = torch.randint(0, original.cfg.vocab_size, (2, original.cfg.block_size),
                            generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            diff = (original(idx)[0] - model(idx)[0]).abs().max().item()
        if not diff < TOLERANCE:
            raise KpruneError(f"the rescaled model's logits differ by {diff:.3g} (> {TOLERANCE}): not written")
        out.mkdir(parents=True, exist_ok=True)
        write_hf_dir(model, out)
        flags = ["--gpt2-init", "pretrained", "--gpt2-pretrained", str(source), "--device", "cpu"]
        task = build_task(settings_from_namespace(build_parser("gpt2", prog="x", description="").parse_args(flags)),
                          torch.device("cpu"))
        batches = task.calibration_batches(args.calibration_batches)
        print(json.dumps({"max_abs_logit_difference": diff, "sigma": args.sigma, "seed": args.seed,
                          "input_spread_before": input_spread(original, batches, task.loss),
                          "input_spread_after": input_spread(model, batches, task.loss), "written": str(out)}))
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
