"""`make export RESULTS=<run dir>`: a run's final model where other tools read it.

    python -m scripts.export [--results RUN_DIR]

Writes into <run dir>/export/: model.safetensors (the pruned weights, dense
with zeros, fp32), masks.safetensors (True = pruned), config (the run's
.config) and shape.json (the model's config fields and tensor shapes); for a
GPT-2 run also hf/ (config.json and model.safetensors in the Hugging Face
GPT-2 layout, which transformers' GPT2LMHeadModel.from_pretrained reads).
Prints each path written; bad input is one `error:` line and status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.cli import make_variable
from lib.errors import KpruneError
from lib.export import export_run


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
        if str(final.metadata.get("model", "")).startswith("gpt2"):
            from gpt2.hf import gpt_from_final, write_hf_dir  # GPT-2 only: the others have no HF layout
            hf_dir = run_dir / "export" / "hf"
            hf_dir.mkdir(exist_ok=True)
            written += write_hf_dir(gpt_from_final(final, run_dir), hf_dir)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
