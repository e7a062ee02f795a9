"""`make export RESULTS=<run dir>`: a run's final model where other tools read it.

    python -m scripts.export [--results RUN_DIR]

Writes into <run dir>/export/: model.safetensors (the pruned weights, dense
with zeros, fp32), masks.safetensors (True = pruned), config (the run's
.config) and shape.json (the model's config fields and tensor shapes); for a
GPT-2 run also hf/ (config.json and model.safetensors in the Hugging Face
GPT-2 layout, which transformers' GPT2LMHeadModel.from_pretrained reads)
and, when pruning removed whole attention heads or MLP neurons (channel
structure), small/model.safetensors: the physically smaller GPT-2 without
them, computing what the pruned model computes.
Prints each path written; bad input is one `error:` line and status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2.hf import gpt_from_final, write_hf_dir
from gpt2.shrink import shrink
from lib.cli import make_variable
from lib.errors import KpruneError
from lib.export import MODEL_FILE, export_run, final_model_files
from lib.results import write_bytes_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=make_variable("RESULTS"),
                        help="the run directory (what `make train` printed as `results: <dir>`)")
    args = parser.parse_args(argv)
    try:
        if not args.results:
            raise KpruneError("no run given: make export RESULTS=<run dir> (the `results:` line of make train)")
        run_dir = Path(args.results)
        if not run_dir.is_dir():
            raise KpruneError(f"RESULTS={args.results!r} is no directory: give a run directory "
                              "(the `results:` line of make train)")
        written, final = export_run(run_dir)
        if final.metadata["model"].startswith("gpt2"):
            # GPT-2 only: the others have no Hugging Face layout
            hf_dir = run_dir / "export" / "hf"
            hf_dir.mkdir(exist_ok=True)
            model = gpt_from_final(final, run_dir)
            written += write_hf_dir(model, hf_dir)
            written += write_smaller_gpt(model, final, run_dir / "export" / "small")
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote: {path}")
    return 0


def write_smaller_gpt(model, final, directory: Path) -> list[Path]:
    """export/small/model.safetensors: the GPT-2 without the heads and neurons pruning removed whole.

    Written only when there is such a unit (channel structure removes them by
    construction); `make sample RESULTS=<run dir>/export/small` reads it.
    """
    small = shrink(model)
    cfg = small.cfg
    if sum(cfg.heads) == cfg.n_layer * cfg.n_head and sum(cfg.hidden) == cfg.n_layer * 4 * cfg.n_embd:
        print("no whole head or MLP neuron is pruned: no smaller model to write", file=sys.stderr)
        return []
    directory.mkdir(exist_ok=True)
    data = final_model_files(small, final.metadata["model"], final.metadata["step"])
    write_bytes_atomic(directory / MODEL_FILE, data[MODEL_FILE])
    print(f"smaller model: heads per block {list(cfg.heads)}, MLP neurons per block {list(cfg.hidden)}",
          file=sys.stderr)
    return [directory / MODEL_FILE]


if __name__ == "__main__":
    sys.exit(main())
