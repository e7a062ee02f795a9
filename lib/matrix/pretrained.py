"""What a plan checks before any run starts: the pretrained model its runs start from is there.

A matrix whose runs start from a pretrained GPT-2 (GPT2_INIT=pretrained)
in a local directory that holds no model would otherwise fail in every run
with the same error. This is one error instead, at plan time, before any
directory is made, naming the commands that write the model: `make pretrain`
for the pretraining run it trains, `make export` for a run already trained.
"""

from __future__ import annotations

from pathlib import Path

from lib.errors import KpruneError
from lib.kconfig import REPO_ROOT, read_config, settings_from_kconfig
from lib.results import run_status

# What `make pretrain` trains (and then exports): the defconfig's OUTPUT_DIR/RUN_NAME is the run directory.
PRETRAIN_DEFCONFIG = "gpt2-pretrain-shakespeare"
MODEL_FILES = ("config.json", "model.safetensors")  # the Hugging Face layout gpt2/hf.py reads


def pretrain_run_dir() -> Path:
    """The run directory `make pretrain` writes (its export goes to <it>/export/hf)."""
    kconf, _ = read_config(REPO_ROOT / "defconfigs" / PRETRAIN_DEFCONFIG)
    s = settings_from_kconfig(kconf)
    return Path(s.output_dir) / s.run_name


def check_pretrained(spec: str) -> None:
    """Raise one KpruneError when GPT2_PRETRAINED=`spec` names a local directory without a model in it.

    A hub id is left to the run, which downloads it (or says where to put the files offline).
    """
    from gpt2.hf import names_a_directory  # imports torch: only for plans that start from a pretrained model

    if not spec or not names_a_directory(spec):
        return
    path = Path(spec).expanduser()
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if not missing:
        return
    what = f"GPT2_PRETRAINED={spec} holds no pretrained model ({' and '.join(missing)} missing)"
    if path.name != "hf" or path.parent.name != "export":
        raise KpruneError(f"{what}: put config.json and model.safetensors there (the Hugging Face GPT-2 layout "
                          "`make export` writes into <run dir>/export/hf), or set GPT2_PRETRAINED to such a directory")
    run_dir = path.parent.parent
    status = run_status(run_dir)
    if status == "complete":
        raise KpruneError(f"{what}: the run {run_dir} is trained but not exported; run `make export RESULTS={run_dir}`, "
                          "then `make test-matrix` again")
    if status == "interrupted":
        raise KpruneError(f"{what}: the run {run_dir} was interrupted; finish it with `make resume RESUME={run_dir}`, "
                          f"export it with `make export RESULTS={run_dir}`, then run `make test-matrix` again")
    if run_dir.resolve() == pretrain_run_dir().resolve():
        raise KpruneError(f"{what}: pretrain it first with `make pretrain` (it writes .config from defconfigs/"
                          f"{PRETRAIN_DEFCONFIG}, trains it into {run_dir} and exports it to {path}), then load this "
                          "matrix's configuration again (make defconfig-<name>) and run `make test-matrix`")
    raise KpruneError(f"{what}: no finished run in {run_dir}; train a GPT-2 run there (OUTPUT_DIR={run_dir.parent} "
                      f"RUN_NAME={run_dir.name}), then `make export RESULTS={run_dir}` and `make test-matrix` again")
