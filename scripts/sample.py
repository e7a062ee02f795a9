"""`make sample RESULTS=<run dir> PROMPT="..."`: text from a GPT-2 run's final (pruned) model.

    python -m scripts.sample [--results RUN_DIR] [--prompt TEXT] [--max-new-tokens N]
                             [--temperature T] [--top-k K] [--seed S]

Reads the model the run wrote at its end (model.safetensors: the pruned
weights) and the bundled offline GPT-2 tokenizer, and prints the prompt
followed by the sampled continuation. The model runs on a CUDA GPU when
torch sees one (under bf16 autocast where the GPU has real bf16; an nm run's
2:4 layers on the 2:4 kernels, scripts/evaluate.py `load_model`), else on
the CPU. The make variables PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_K and
SAMPLE_SEED give the defaults; the same seed gives the same text on the same
device. An empty prompt starts from <|endoftext|>.
Bad input is one `error:` line and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from lib.cli import make_variable
from lib.data.tokenizer import EOT_TOKEN, gpt2_encoding
from lib.device import bf16_supported, pick_device
from lib.errors import KpruneError


def _number(kind, name: str, low: float, default: str):
    text = make_variable(name, default)
    try:
        value = kind(text)
    except ValueError:
        raise KpruneError(f"{name}={text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if value < low:
        raise KpruneError(f"{name}={text!r} must be at least {low}")
    return value


def main(argv: list[str] | None = None) -> int:
    try:
        defaults = {"max_new_tokens": _number(int, "MAX_NEW_TOKENS", 1, "100"),
                    "temperature": _number(float, "TEMPERATURE", 0.0, "0.8"),
                    "top_k": _number(int, "TOP_K", 0, "200"), "seed": _number(int, "SAMPLE_SEED", 0, "1337")}
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m scripts.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=make_variable("RESULTS"), help="the GPT-2 run directory")
    parser.add_argument("--prompt", default=make_variable("PROMPT", ""), help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"], help="tokens to add")
    parser.add_argument("--temperature", type=float, default=defaults["temperature"],
                        help="softmax temperature; 0 picks the most likely token")
    parser.add_argument("--top-k", type=int, default=defaults["top_k"],
                        help="sample among the k most likely tokens; 0: all")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="the sampling seed")
    args = parser.parse_args(argv)
    try:
        if not args.results:
            raise KpruneError('no run given: make sample RESULTS=<run dir> PROMPT="..." (a GPT-2 run)')
        if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
            raise KpruneError("MAX_NEW_TOKENS must be at least 1, TEMPERATURE and TOP_K at least 0")
        from gpt2.model import GPT
        from gpt2.sample import generate
        from scripts.evaluate import load_model
        device = pick_device("auto")
        half = torch.bfloat16 if bf16_supported(device) else None  # what PRECISION=auto trains in
        precision = (lambda: torch.autocast(device.type, half)) if half else contextlib.nullcontext
        model, final = load_model(Path(args.results), device, half)
        if not isinstance(model, GPT):
            raise KpruneError(f"{args.results} holds a {final.metadata['model']!r} model, not a GPT-2: "
                              "make sample continues text with a GPT-2 run's model")
        enc = gpt2_encoding()
        ids = enc.encode_ordinary(args.prompt) or [EOT_TOKEN]
        generator = torch.Generator().manual_seed(args.seed)
        with precision():
            out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, generator, enc.n_vocab)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = 0 if args.prompt else 1  # the <|endoftext|> an empty prompt starts from is not text
    print(enc.decode(out[start:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
