"""`make export RESULTS=<run dir>`: a run's final model where other tools read it.

    python -m scripts.export [--results RUN_DIR]

Writes into <run dir>/export/: model.safetensors (the pruned weights, dense
with zeros, fp32), masks.safetensors (True = pruned), config (the run's
.config) and shape.json (the model's config fields and tensor shapes); for a
GPT-2 run also hf/ (config.json and model.safetensors in the Hugging Face
GPT-2 layout, which transformers' GPT2LMHeadModel.from_pretrained reads).
When pruning removed whole units (channel structure): small/, the physically
smaller model without them (model.safetensors, and the run's config), which
computes what the pruned model computes: GPT-2 without its pruned attention
heads and MLP neurons, LeNet-5 without its pruned conv filters and fc
neurons, ResNet without its pruned block-internal filters.
Prints each path written; bad input is one `error:` line and status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

from torch import nn

from gpt2 import shrink as gpt2_shrink
from gpt2.hf import gpt_from_final, write_hf_dir
from lenet5 import shrink as lenet5_shrink
from lib.cli import make_variable
from lib.errors import KpruneError
from lib.export import MODEL_FILE, FinalModel, export_run, final_model_files
from lib.results import write_bytes_atomic
from resnet import shrink as resnet_shrink


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
        model = model_from_final(final, run_dir)
        if final.metadata["model"].startswith("gpt2"):
            # GPT-2 only: the others have no Hugging Face layout
            hf_dir = run_dir / "export" / "hf"
            hf_dir.mkdir(exist_ok=True)
            written += write_hf_dir(model, hf_dir)
        written += write_smaller_model(model, final, run_dir, run_dir / "export" / "small")
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote: {path}")
    return 0


def model_from_final(final: FinalModel, run_dir: Path) -> nn.Module:
    """The model of a final model file, full or smaller, in eval mode.

    GPT-2 is shaped by the config its file records; LeNet-5 and ResNet by
    their tensors' shapes, which fix every width once the kind is known.
    """
    name = final.metadata["model"]
    if name.startswith("gpt2"):
        return gpt_from_final(final, run_dir)
    if name == "lenet5":
        return lenet5_shrink.lenet_from_state(final.state_dict())
    if name.startswith("resnet"):
        return resnet_shrink.resnet_from_state(final.state_dict())
    raise KpruneError(f"{run_dir} holds a {name!r} model: kprune reads gpt2, lenet5 and resnet models")


def shrink_module(name: str) -> ModuleType:
    """The <model>/shrink.py of a model kind (by its name, e.g. resnet18-cifar10): shrink, describe, UNITS."""
    return gpt2_shrink if name.startswith("gpt2") else lenet5_shrink if name == "lenet5" else resnet_shrink


def write_smaller_model(model: nn.Module, final: FinalModel, run_dir: Path, directory: Path) -> list[Path]:
    """export/small/: the model without the units pruning removed whole, and the run's config.

    Written only when there is such a unit (channel structure removes them by
    construction); `make evaluate RESULTS=<run dir>/export/small` reads it (and
    for GPT-2 `make sample`).
    """
    kind = shrink_module(final.metadata["model"])
    small = kind.shrink(model)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    if after == before:
        print(f"no whole {kind.UNITS} is pruned: no smaller model to write", file=sys.stderr)
        return []
    directory.mkdir(exist_ok=True)
    data = final_model_files(small, final.metadata["model"], final.metadata["step"])
    write_bytes_atomic(directory / MODEL_FILE, data[MODEL_FILE])
    written = [directory / MODEL_FILE]
    if (run_dir / "config").is_file():  # what `make evaluate` needs to find the run's data
        write_bytes_atomic(directory / "config", (run_dir / "config").read_bytes())
        written.append(directory / "config")
    print(f"smaller model: {kind.describe(small)}; parameters {before:,} -> {after:,}", file=sys.stderr)
    return written


if __name__ == "__main__":
    sys.exit(main())
