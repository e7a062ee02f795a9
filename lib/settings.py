"""The one settings object of a run, and the one table behind it.

Each field of `Settings` is one Kconfig symbol (or named choice) and one
trainer flag: the field name gives the flag (`block_size` -> `--block-size`),
its metadata gives the symbol. `OPTIONS` is that table; `lib/kconfig.py`
turns a `.config` into flags with it, and `lib/cli.py`'s `build_parser` turns
flags back into `Settings` with it. Defaults are not repeated here: they are read from
the Kconfig tree, so `--help` always shows what `make defconfig` would give.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from lib.results import check_run_name

ALL_MODELS = ("gpt2", "lenet5", "resnet")


def _opt(symbol: str, *, models: tuple[str, ...] = ALL_MODELS, low: float | None = None,
         high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    """Declare a field read from Kconfig `symbol` (without CONFIG_).

    `low`/`high` bound numbers kept in Kconfig strings (Kconfig has no float
    type); `*_open` makes the bound exclusive. Int bounds live in Kconfig's
    own `range`.
    """
    meta = {"symbol": symbol, "models": models, "low": low, "high": high,
            "low_open": low_open, "high_open": high_open}
    return field(default=None, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything one training run reads, typed. Built by `parse_settings`."""

    # Run
    model: str = _opt("MODEL")
    device: str = _opt("DEVICE")
    seed: int = _opt("SEED")
    threads: int = _opt("THREADS")
    output_dir: str = _opt("OUTPUT_DIR")
    run_name: str = _opt("RUN_NAME")
    checkpoint_interval: int = _opt("CHECKPOINT_INTERVAL")
    resume_from: str = _opt("RESUME_FROM")
    data_dir: str = _opt("DATA_DIR")
    # Training
    max_iters: int = _opt("MAX_ITERS")
    batch_size: int = _opt("BATCH_SIZE")
    lr: float = _opt("LR", low=0.0, low_open=True)
    min_lr: float = _opt("MIN_LR", low=0.0)
    lr_warmup_iters: int = _opt("LR_WARMUP_ITERS")
    grad_clip: float = _opt("GRAD_CLIP", low=0.0)
    eval_interval: int = _opt("EVAL_INTERVAL")
    log_interval: int = _opt("LOG_INTERVAL")
    grad_accum_steps: int = _opt("GRAD_ACCUM_STEPS")
    # Performance
    precision: str = _opt("PRECISION")
    compile: bool = _opt("COMPILE")
    tf32: bool = _opt("TF32")
    deterministic: bool = _opt("DETERMINISTIC")
    data_workers: int = _opt("DATA_WORKERS")
    # Distributed
    ddp_nproc_per_node: int = _opt("DDP_NPROC_PER_NODE")
    ddp_nnodes: int = _opt("DDP_NNODES")
    ddp_node_rank: int = _opt("DDP_NODE_RANK")
    ddp_master_addr: str = _opt("DDP_MASTER_ADDR")
    ddp_master_port: int = _opt("DDP_MASTER_PORT")
    ddp_backend: str = _opt("DDP_BACKEND")
    # Optimizer
    optimizer: str = _opt("OPTIMIZER")
    adamwprune_base: str = _opt("ADAMWPRUNE_BASE")
    sgd_momentum: float = _opt("SGD_MOMENTUM", low=0.0, high=1.0, high_open=True)
    weight_decay: float = _opt("WEIGHT_DECAY", low=0.0)
    beta1: float = _opt("BETA1", low=0.0, high=1.0, high_open=True)
    beta2: float = _opt("BETA2", low=0.0, high=1.0, high_open=True)
    adam_eps: float = _opt("ADAM_EPS", low=0.0, low_open=True)
    amsgrad: bool = _opt("AMSGRAD")
    spam_theta: float = _opt("SPAM_THETA", low=0.0, low_open=True)
    spam_interval: int = _opt("SPAM_INTERVAL")
    spam_warmup: int = _opt("SPAM_WARMUP")
    # Pruning
    pruning_method: str = _opt("PRUNING_METHOD")
    state_variant: str = _opt("STATE_VARIANT")
    variant_budget: bool = _opt("VARIANT_BUDGET")
    spt_epsilon: float = _opt("SPT_EPSILON", low=0.0, high=1.0, low_open=True, high_open=True)
    spt_alpha: float = _opt("SPT_ALPHA", low=0.0, high=1.0, high_open=True)
    calibration_batches: int = _opt("CALIBRATION_BATCHES")
    sparsegpt_block_size: int = _opt("SPARSEGPT_BLOCK_SIZE")
    sparsegpt_dampening: float = _opt("SPARSEGPT_DAMPENING", low=0.0, high=1.0, low_open=True)
    adaptive_pruning: bool = _opt("ADAPTIVE_PRUNING")
    target_sparsity: float = _opt("TARGET_SPARSITY", low=0.0, high=1.0, high_open=True)
    prune_embeddings: bool = _opt("PRUNE_EMBEDDINGS", models=("gpt2",))
    schedule: str = _opt("SCHEDULE")
    schedule_milestones: str = _opt("SCHEDULE_MILESTONE_TABLE")
    schedule_steps: str = _opt("SCHEDULE_STEP_LEVELS")
    schedule_start: int = _opt("SCHEDULE_START")
    schedule_end: int = _opt("SCHEDULE_END")
    initial_sparsity: float = _opt("INITIAL_SPARSITY", low=0.0, high=1.0, high_open=True)
    schedule_frequency: int = _opt("SCHEDULE_FREQUENCY")
    # Sparsity structure
    sparsity_structure: str = _opt("SPARSITY_STRUCTURE")
    nm_n: int = _opt("NM_N")
    nm_m: int = _opt("NM_M")
    block_rows: int = _opt("BLOCK_ROWS")
    block_cols: int = _opt("BLOCK_COLS")
    sparsity_scope: str = _opt("SPARSITY_SCOPE")
    # GPT-2
    gpt2_size: str = _opt("GPT2_SIZE", models=("gpt2",))
    gpt2_dataset: str = _opt("GPT2_DATASET", models=("gpt2",))
    block_size: int = _opt("GPT2_BLOCK_SIZE", models=("gpt2",))
    dropout: float = _opt("GPT2_DROPOUT", models=("gpt2",), low=0.0, high=1.0, high_open=True)
    eval_iters: int = _opt("GPT2_EVAL_ITERS", models=("gpt2",))
    gpt2_init: str = _opt("GPT2_INIT", models=("gpt2",))
    gpt2_pretrained: str = _opt("GPT2_PRETRAINED", models=("gpt2",))
    # ResNet
    resnet_depth: str = _opt("RESNET_DEPTH", models=("resnet",))
    resnet_dataset: str = _opt("RESNET_DATASET", models=("resnet",))
    resnet_width: int = _opt("RESNET_WIDTH", models=("resnet",))
    resnet_augment: bool = _opt("RESNET_AUGMENT", models=("resnet",))
    # Tracking
    track_wandb: bool = _opt("TRACK_WANDB")
    track_trackio: bool = _opt("TRACK_TRACKIO")
    track_tensorboard: bool = _opt("TRACK_TENSORBOARD")
    track_project: str = _opt("TRACK_PROJECT")
    track_group: str = _opt("TRACK_GROUP")
    track_wandb_entity: str = _opt("TRACK_WANDB_ENTITY")
    track_wandb_mode: str = _opt("TRACK_WANDB_MODE")
    track_trackio_space: str = _opt("TRACK_TRACKIO_SPACE")
    track_tensorboard_dir: str = _opt("TRACK_TENSORBOARD_DIR")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def variant(self) -> str | None:
        """The state-based variant, or None for the other methods."""
        return self.state_variant if self.pruning_method == "state" else None


@dataclass(frozen=True)
class Option:
    """One row of the table: a Settings field, its flag and its symbol."""

    name: str
    symbol: str
    kind: type
    models: tuple[str, ...]
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> str | None:
        """Return why `value` is out of bounds, or None when it is fine."""
        if self.kind is not float:
            return None
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"{value:g} is out of range {self.range_text()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"{value:g} is out of range {self.range_text()}"
        return None

    def range_text(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{lo}{low}, {high}{hi}"

    def parse(self, text: str) -> Any:
        """Convert a flag or Kconfig value to this option's type, checked."""
        if self.kind is float:
            # float() also reads other scripts' digits ("٠.٥"); Kconfig would keep them verbatim.
            if not text.isascii():
                raise ValueError(f"'{text}' is not a number (write it with the digits 0-9)")
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"'{text}' is not a number") from None
            problem = self.check(value)
            if problem:
                raise ValueError(problem)
            return value
        if self.kind is int:
            return parse_decimal(text)
        return text


_DECIMAL = re.compile(r"-?[0-9]+")


def parse_decimal(text: str) -> int:
    """An int written in ASCII decimal digits, as Kconfig `int` symbols take them.

    Python's int() would also take "0x20", "+5", " 5" and other scripts' digits
    ("٣٠", "３０"); Kconfig would keep such text in .config verbatim, so it is refused.
    """
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"'{text}' is not a decimal integer (digits 0-9 only)")
    return int(text)


def _table() -> tuple[Option, ...]:
    hints = get_type_hints(Settings)
    rows = []
    for f in fields(Settings):
        m = f.metadata
        rows.append(Option(f.name, m["symbol"], hints[f.name], m["models"], m["low"], m["high"],
                           m["low_open"], m["high_open"]))
    return tuple(rows)


OPTIONS: tuple[Option, ...] = _table()
BY_SYMBOL: dict[str, Option] = {o.symbol: o for o in OPTIONS}


def options_for(model: str) -> tuple[Option, ...]:
    """The options the trainer of `model` accepts."""
    return tuple(o for o in OPTIONS if model in o.models)


def settings_from_namespace(ns: argparse.Namespace) -> Settings:
    values = {name: getattr(ns, name, None) for name in (f.name for f in fields(Settings))}
    return Settings(**values)


def validate(settings: Settings) -> list[tuple[str, str]]:
    """Cross-option checks. Returns (symbol, problem) pairs; empty when valid."""
    from lib.pruning.registry import LAYER_ADAPTIVE_VARIANTS, LAYER_CAP
    from lib.pruning.schedules import schedule_from_settings, ScheduleError

    problems: list[tuple[str, str]] = []
    s = settings
    if s.run_name:
        problem = check_run_name(s.run_name)
        if problem:
            problems.append(("RUN_NAME", problem))
    if s.min_lr is not None and s.lr is not None and s.min_lr > s.lr:
        problems.append(("MIN_LR", f"{s.min_lr:g} is above LR ({s.lr:g}); the cosine decays from LR down to MIN_LR"))
    if s.pruning_method == "state" and s.optimizer != "adamwprune":
        problems.append(("PRUNING_METHOD", "state-based pruning reads AdamWPrune's moments: set OPTIMIZER=adamwprune"))
    if s.ddp_node_rank is not None and s.ddp_nnodes is not None and s.ddp_node_rank >= s.ddp_nnodes:
        problems.append(("DDP_NODE_RANK", f"{s.ddp_node_rank} must be below DDP_NNODES ({s.ddp_nnodes})"))
    if s.spam_warmup is not None and s.spam_interval is not None and s.spam_warmup >= s.spam_interval:
        problems.append(("SPAM_WARMUP", f"{s.spam_warmup} must be less than SPAM_INTERVAL ({s.spam_interval}): "
                         "the re-warm must end before the next reset"))
    if s.variant in LAYER_ADAPTIVE_VARIANTS and s.target_sparsity is not None and s.target_sparsity > LAYER_CAP:
        problems.append(("TARGET_SPARSITY", f"{s.target_sparsity:g} is above {LAYER_CAP:g}, the per-layer cap of "
                         f"{s.variant}'s layer-adaptive sparsity"))
    from lib.tracking import tracker_problems
    problems += tracker_problems(s)
    from lib.pruning.oneshot import oneshot_problems
    problems += oneshot_problems(s)
    if s.pruning_method not in (None, "none"):
        from lib.pruning.structure import structure_problems
        problems += structure_problems(s)
        try:
            sched = schedule_from_settings(s)
        except ScheduleError as exc:
            problems.append((exc.symbol, str(exc)))
        else:
            if sched.last_update > s.max_iters and s.max_iters != 0:  # 0: prune-only, checked above
                symbol = {"one-shot": "SCHEDULE_START", "milestones": "SCHEDULE_MILESTONE_TABLE",
                          "steps": "SCHEDULE_STEP_LEVELS"}.get(sched.kind, "SCHEDULE_END")
                problems.append((symbol, f"step {sched.last_update} is after the last step (MAX_ITERS="
                                 f"{s.max_iters}): the run would stop before reaching the target sparsity"))
    return problems
