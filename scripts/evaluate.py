"""`make evaluate RESULTS=<dir>`: a run's final model, or the smaller one make export wrote, on its held-out data.

    python -m scripts.evaluate [--results DIR] [--set "SYM=value ..."]

DIR is a run directory (its final model: the pruned weights as zeros) or the
<run dir>/export/small directory of a channel-pruned run (the physically
smaller model). Both hold the run's `config`; the model is evaluated as the
trainer evaluates it at the end of the run: the trainer's own evaluation,
data, batches, device and precision, so a run directory gives the val_loss
and val_accuracy (GPT-2: val_ppl) its summary.json ends with, and its
export/small the same up to float rounding. SET="..." overrides the config
(e.g. SET="DEVICE=cpu", or DATA_DIR=... when the data moved). An nm run's
model on a CUDA GPU runs its 2:4 Linear layers on the 2:4 kernels
(`load_model`, which make sample uses too), so its figures there may differ
from the summary's by the kernels' rounding.
Prints one JSON line: results, model, step, params, and the evaluation.
Bad input is one `error:` line and status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from lib.cli import make_variable
from lib.device import autocast_for, prepare_process
from lib.errors import KpruneError
from lib.export import FinalModel, read_final_model
from lib.kconfig import apply_overrides, read_config, settings_from_kconfig
from lib.semi_structured import convert_at_load
from scripts.export import model_from_final
from scripts.kconfig import _overrides


def evaluate_dir(directory: Path, set_text: str | None = None) -> dict:
    """The evaluation of the final model in `directory`, by the trainer its config names."""
    final = read_final_model(directory)  # refuses a directory without a (readable) final model
    if not (directory / "config").is_file():
        raise KpruneError(f"{directory} has no config: give a run directory (the `results:` line of make train) "
                          "or the export/small directory make export wrote into one")
    kconf, seen = read_config(directory / "config")
    apply_overrides(kconf, seen, _overrides(set_text))
    s = settings_from_kconfig(kconf)
    if not final.metadata["model"].startswith(s.model):
        raise KpruneError(f"{directory}: its config trains {s.model} but its model.safetensors holds "
                          f"{final.metadata['model']!r}; give the directory make train or make export wrote")
    if s.model == "gpt2":  # the task's fresh model is not used: no pretrained weights to fetch for it
        s = dataclasses.replace(s, gpt2_init="scratch")
    device = prepare_process(s)  # the run's threads, seed and backend settings
    task = importlib.import_module(f"{s.model}.train").build_task(s, device)
    precision = autocast_for(s, device)
    model, _ = load_model(directory, device, half=getattr(precision(), "fast_dtype", None), final=final)
    with torch.no_grad(), precision():
        result = task.evaluate(model)
    return {"results": str(directory), "model": final.metadata["model"], "step": final.metadata["step"],
            "params": sum(p.numel() for p in model.parameters()), **result}


def load_model(directory: Path, device: torch.device, half: torch.dtype | None = None,
               final: FinalModel | None = None) -> tuple[nn.Module, FinalModel]:
    """The final model in `directory` (`final`, when already read) on `device`, in eval mode, ready for use.

    What make evaluate and make sample run, and make check-gpu checks: an nm
    run's 2:4 Linear layers go onto the 2:4 kernels on CUDA, in `half` when
    the model computes under autocast in it (lib/semi_structured.py
    `convert_at_load`, which says what it converted; on a CPU, that nothing is).
    """
    final = final if final is not None else read_final_model(directory)
    model = model_from_final(final, directory).to(device)
    convert_at_load(model, directory, set(final.masks), half)
    return model, final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=make_variable("RESULTS"),
                        help="a run directory, or its export/small (make's RESULTS=)")
    parser.add_argument("--set", default=make_variable("SET"), help='overrides of its config (make\'s SET=)')
    args = parser.parse_args(argv)
    try:
        if not args.results:
            raise KpruneError("no model given: make evaluate RESULTS=<run dir> or RESULTS=<run dir>/export/small")
        directory = Path(args.results)
        if not directory.is_dir():
            raise KpruneError(f"RESULTS={args.results!r} is no directory: give a run directory "
                              "(the `results:` line of make train) or its export/small")
        result = evaluate_dir(directory, args.set)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
