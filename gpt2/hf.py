"""The Hugging Face GPT-2 layout, in (a pretrained start) and out (`make export`).

The layout is a directory with `config.json` (GPT2Config's fields) and
`model.safetensors`. It differs from gpt2/model.py in three ways, mapped here:
- names: `transformer.h.{i}.ln_1.weight` for `blocks.{i}.ln_1.weight`, and so
  on (files saved from the bare GPT2Model have no `transformer.` prefix; both
  are read);
- the four projections (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are
  Conv1D layers, whose weight is [in, out]: the transpose of nn.Linear's;
- the output layer is tied to the token embedding, so `lm_head.weight` is
  not stored (a file that stores it must store the embedding itself).
The vocabulary is the embedding's row count both ways: kprune's own models
pad 50,257 tokens to 50,304 rows (faster matmuls) and export all 50,304 with
`vocab_size` 50304, so logits match exactly; ids past 50,256 are never in
the data. A pretrained model keeps its file's vocabulary (GPT-2's is 50,257).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from gpt2.model import GPT, SIZES, GPTConfig
from lib.errors import KpruneError
from lib.export import FinalModel, read_final_model
from lib.results import write_bytes_atomic, write_json_atomic

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The GPT-2 variant gpt2/model.py computes; a config.json asking for another is refused, not silently misread.
SUPPORTED = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True, "add_cross_attention": False}
HUB_FILES = ["config.json", "model.safetensors"]
# Buffers some files carry (the causal mask of older transformers versions); gpt2/model.py computes them.
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def hf_config(cfg: GPTConfig) -> dict:
    """config.json for `cfg`: GPT2Config's fields, read by transformers' GPT2LMHeadModel."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256, "use_cache": True,
            "reorder_and_upcast_attn": False, **SUPPORTED}


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kprune GPT state_dict -> HF GPT2LMHeadModel tensors (lm_head left out: it is the tied wte)."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        hf_name = "transformer." + (name.replace("blocks.", "h.", 1) if name.startswith("blocks.") else name)
        t = t.detach().to("cpu", torch.float32)
        out[hf_name] = (t.t() if name.endswith(CONV1D) else t).contiguous()
    return out


def from_hf(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors (with or without the `transformer.` prefix) -> a kprune GPT state_dict."""
    out = {}
    lm_head = tensors.get("lm_head.weight")
    for hf_name, t in tensors.items():
        name = hf_name.removeprefix("transformer.")
        if name == "lm_head.weight" or _BUFFERS.fullmatch(name):
            continue
        name = name.replace("h.", "blocks.", 1) if name.startswith("h.") else name
        out[name] = (t.t() if name.endswith(CONV1D) else t).contiguous().float()
    if "wte.weight" not in out:
        raise KpruneError(f"{source} holds no token embedding (transformer.wte.weight): not a GPT-2 model file")
    if lm_head is not None and not torch.equal(lm_head.float(), out["wte.weight"]):
        raise KpruneError(f"{source} has an output layer (lm_head.weight) that differs from its token embedding: "
                          "kprune's GPT-2 ties the two, so this model cannot be read exactly")
    out["lm_head.weight"] = out["wte.weight"]
    return out


def read_hf_dir(directory: Path, dropout: float = 0.0) -> GPT:
    """The GPT-2 in a Hugging Face layout directory (config.json + model.safetensors), shaped by its config."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise KpruneError(f"{directory} lacks {' and '.join(missing)}: a Hugging Face GPT-2 directory holds "
                          "config.json and model.safetensors (transformers' save_pretrained writes both)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        tensors = load_file(weights_path)
    except (ValueError, SafetensorError) as exc:
        raise KpruneError(f"{directory}: config.json or model.safetensors is unreadable ({exc})") from None
    shape = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), int) for k in shape):
        raise KpruneError(f"{config_path} lacks GPT2Config's {', '.join(shape)} (integers): not a GPT-2 config")
    if config.get("model_type", "gpt2") != "gpt2":
        raise KpruneError(f"{config_path} describes a {config['model_type']!r} model, not GPT-2")
    unsupported = [f"{k}={config[k]!r} (kprune computes {v!r})" for k, v in SUPPORTED.items()
                   if k in config and config[k] != v]
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        unsupported.append(f"n_inner={config['n_inner']} (kprune's MLP is 4 x n_embd = {4 * config['n_embd']})")
    if unsupported:
        raise KpruneError(f"{config_path} asks for a GPT-2 variant kprune does not compute: {', '.join(unsupported)}")
    cfg = GPTConfig(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                    block_size=config["n_positions"], vocab_size=config["vocab_size"], dropout=dropout)
    model = GPT(cfg)
    try:
        model.load_state_dict(from_hf(tensors, str(weights_path)), strict=True)
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors
        raise KpruneError(f"{weights_path} does not match its config.json: {exc}".replace("\n", " ")) from None
    return model


def names_a_directory(spec: str) -> bool:
    """GPT2_PRETRAINED names a local directory (an existing one, or a path like ./x or a/b/c), not a hub id."""
    return Path(spec).expanduser().is_dir() or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def resolve_pretrained(spec: str) -> Path:
    """GPT2_PRETRAINED -> a local directory: the directory itself, or a hub id's cached download."""
    where = ("put config.json and model.safetensors (the Hugging Face GPT-2 layout, as transformers' "
             "save_pretrained writes it) in a directory and set GPT2_PRETRAINED to that directory")
    if not spec:
        raise KpruneError(f"GPT2_INIT=pretrained needs GPT2_PRETRAINED: {where}, or to a hub id")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if names_a_directory(spec):
        raise KpruneError(f"GPT2_PRETRAINED={spec!r} is no directory: {where}")
    from huggingface_hub import snapshot_download  # here: only a hub id pays for importing it

    try:  # the cache first: a model fetched once is used offline ever after
        return Path(snapshot_download(spec, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fetch it below
        pass
    try:
        return Path(snapshot_download(spec, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no access: one line saying what to do
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KpruneError(f"GPT2_PRETRAINED={spec!r} is no local directory and could not be fetched from the "
                          f"Hugging Face hub ({reason}); offline, {where}") from None


def pretrained_gpt(spec: str, size: str, block_size: int, dropout: float) -> GPT:
    """The pretrained GPT-2 GPT2_PRETRAINED names, checked against the Kconfig size and context length.

    The model keeps every position its file has: a shorter GPT2_BLOCK_SIZE
    trains on shorter windows of it; a longer one is refused.
    """
    model = read_hf_dir(resolve_pretrained(spec), dropout)
    cfg = model.cfg
    if (cfg.n_layer, cfg.n_head, cfg.n_embd) != SIZES[size]:
        layers, heads, width = SIZES[size]
        raise KpruneError(f"GPT2_PRETRAINED={spec!r} is a GPT-2 of {cfg.n_layer} layers, {cfg.n_head} heads, "
                          f"width {cfg.n_embd}, but GPT2_SIZE={size} is {layers} layers, {heads} heads, width "
                          f"{width}: choose the GPT2_SIZE that matches the pretrained model")
    if block_size > cfg.block_size:
        raise KpruneError(f"GPT2_BLOCK_SIZE={block_size} is longer than the {cfg.block_size} positions of "
                          f"GPT2_PRETRAINED={spec!r} (n_positions): set GPT2_BLOCK_SIZE to {cfg.block_size} or less")
    return model


def write_hf_dir(model: GPT, directory: Path) -> list[Path]:
    """Write `model` in the Hugging Face GPT-2 layout into `directory` (atomically, file by file)."""
    if model.cfg.heads is not None or model.cfg.hidden is not None:
        raise KpruneError("the Hugging Face GPT-2 layout has the same heads and MLP width in every block: "
                          "export the full-width model (dense with zeros) to it, not the smaller one")
    directory = Path(directory)
    tensors = to_hf(model.state_dict())
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    write_bytes_atomic(weights_path, save(tensors, metadata={"format": "pt"}))
    write_json_atomic(config_path, hf_config(model.cfg))
    return [config_path, weights_path]


def gpt_from_run(run_dir: Path) -> GPT:
    """The GPT-2 a run wrote at its end (lib/export.py), in eval mode."""
    return gpt_from_final(read_final_model(run_dir), run_dir)


def gpt_from_final(final: FinalModel, run_dir: Path) -> GPT:
    """The GPT-2 of a final model read from `run_dir`, in eval mode."""
    config = final.metadata["shape"]["config"]
    if not final.metadata["model"].startswith("gpt2") or not config:
        raise KpruneError(f"{run_dir} holds a {final.metadata['model']!r} model, not a GPT-2")
    per_block = {k: tuple(config[k]) for k in ("heads", "hidden") if config.get(k) is not None}
    model = GPT(GPTConfig(**{**config, **per_block}))  # JSON gave lists; the config keeps tuples
    model.load_state_dict(final.state_dict())
    return model.eval()
