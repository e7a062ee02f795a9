"""Fixture matrix directories: plan.json and run directories shaped like the trainers write them.

`MatrixBuilder` writes what lib/train_loop.py writes (summary.json keys from
_base_summary/_final_summary, training and eval rows in metrics.jsonl) with
made-up but plausible numbers. Each run's settings drive its derived facts
(schedule dict, optimizer description, iterations), so overriding a setting
changes both, as in a real run; `summary=` overrides tamper with facts alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lib.results import write_json_atomic, write_text_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

GPT2_SETTINGS: dict[str, Any] = {
    "adam_eps": 1e-08, "adamwprune_base": "adamw", "adaptive_pruning": False, "amsgrad": False, "batch_size": 8,
    "beta1": 0.9, "beta2": 0.999, "block_size": 64, "data_dir": "data", "device": "auto", "dropout": 0.0,
    "eval_interval": 50, "eval_iters": 20, "gpt2_size": "tiny", "grad_clip": 1.0, "initial_sparsity": 0.0,
    "log_interval": 10, "lr": 0.001, "lr_warmup_iters": 20, "max_iters": 200, "min_lr": 0.0001, "model": "gpt2",
    "optimizer": "adamwprune", "output_dir": "results", "prune_embeddings": False, "pruning_method": "magnitude",
    "schedule": "cubic-ramp", "schedule_end": 160, "schedule_frequency": 20,
    "schedule_milestones": "100:0.0,500:0.01,1000:0.08,1500:0.19,2000:0.35,3000:0.5", "schedule_start": 20,
    "schedule_steps": "0.1,0.25,0.4,0.5", "seed": 1337, "sgd_momentum": 0.9, "spam_interval": 500,
    "spam_theta": 5000.0, "spam_warmup": 150, "spt_alpha": 0.9, "spt_epsilon": 0.01, "state_variant": "bitter7",
    "target_sparsity": 0.5, "threads": 0, "variant_budget": False, "weight_decay": 0.0}
LENET5_SETTINGS: dict[str, Any] = {**GPT2_SETTINGS, "model": "lenet5", "batch_size": 128, "block_size": None,
                                   "dropout": None, "eval_iters": None, "gpt2_size": None, "prune_embeddings": None}
MODELS = {  # family: (task name, params, prunable, quality key, unit, items per step, dataset)
    "gpt2": ("gpt2-tiny", 7_240_448, 786_432, "val_ppl", "tokens", 512, "shakespeare"),
    "lenet5": ("lenet5", 61_706, 61_470, "val_accuracy", "samples", 128, "mnist"),
}


def cubic_ramp(step: int, start: int, end: int, final: float) -> float:
    if step < start:
        return 0.0
    return final * min(1.0, (step - start) / (end - start)) ** 3


@dataclass
class PlannedRun:
    id: str
    arm: str
    axes: dict[str, Any]
    quality: float | None
    status: str


@dataclass
class MatrixBuilder:
    """Writes results/matrix-<name>-<stamp>/ with plan.json and runs/<id>/ for every added run."""

    root: Path
    name: str = "ab"
    stamp: str = "20261121-221000"
    baseline: dict[str, Any] = field(default_factory=lambda: {"method": "magnitude"})
    runs: list[PlannedRun] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.root / f"matrix-{self.name}-{self.stamp}"

    def add(self, *, model: str = "gpt2", optimizer: str = "adamwprune", method: str = "magnitude",
            target_sparsity: float = 0.5, schedule: str = "cubic-ramp", seed: int = 1337, quality: float = 50.0,
            status: str = "complete", write_summary: bool = True, settings: dict | None = None,
            summary: dict | None = None, error: str | None = None, axes: dict | None = None) -> PlannedRun:
        """Plan one run and write its directory (a run with `write_summary=False` died before its summary).

        `axes` adds plan axes beyond the five above (e.g. sparsity_structure), named in the arm id.
        """
        extra_axes = axes or {}
        axes = {"model": model, "optimizer": optimizer, "method": method, "target_sparsity": target_sparsity,
                "schedule": schedule, **extra_axes}
        arm = f"{model}-{optimizer}-{method}-sp{target_sparsity:g}-{schedule}" + "".join(f"-{v}" for v in
                                                                                   extra_axes.values())
        run = PlannedRun(id=f"{arm}-seed{seed}", arm=arm, axes={**axes, "seed": seed}, quality=quality,
                         status=status if write_summary else "no summary.json")
        self.runs.append(run)
        run_dir = self.path / "runs" / run.id
        run_dir.mkdir(parents=True)
        s = {**(GPT2_SETTINGS if model == "gpt2" else LENET5_SETTINGS), "optimizer": optimizer, "seed": seed,
             "pruning_method": "state" if method.startswith("bitter") else method,
             "state_variant": method if method.startswith("bitter") else "bitter7",
             "target_sparsity": target_sparsity, "schedule": schedule, "output_dir": str(run_dir),
             **(settings or {})}
        _inactive_optimizer_settings(s)
        write_text_atomic(run_dir / "command", f"python -m {model}.train --seed {seed}\n")
        write_text_atomic(run_dir / "config", f"CONFIG_SEED={seed}\n")
        rows = _metrics(s, MODELS[model], quality, seed)
        if status in ("diverged", "interrupted", "failed") or not write_summary:
            rows = rows[: len(rows) // 2]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        if status != "complete":
            text += '{"step": 999, "loss": 3.1'  # the half-written last line of a killed run
        write_text_atomic(run_dir / "metrics.jsonl", text)
        write_text_atomic(run_dir / "log", f"step 10/{s['max_iters']} loss 9.1\n{error or ''}\n")
        if write_summary:
            out = _summary(s, MODELS[model], method, quality, status, error)
            out.update(summary or {})
            write_json_atomic(run_dir / "summary.json", out)
        return run

    def drop(self, reason: str, **axes: Any) -> None:
        self.dropped.append({"axes": axes, "reason": reason})

    def write(self) -> Path:
        axis_values: dict[str, list] = {}
        for run in self.runs:
            for k, v in run.axes.items():
                if v not in axis_values.setdefault(k, []):
                    axis_values[k].append(v)
        base = next((r.arm for r in self.runs if all(r.axes.get(k) == v for k, v in self.baseline.items())), None)
        plan = {"name": self.name, "created": "2026-11-21T22:10:00Z", "plan_hash": "0f3c9a", "axes": axis_values,
                "baseline": base, "dropped": self.dropped,
                "runs": [{"id": r.id, "arm": r.arm, "seed": r.axes["seed"], "axes": r.axes} for r in self.runs]}
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / "plan.json", plan)
        return self.path

    def complete_qualities(self, arm: str) -> list[float]:
        """The final quality of each completed run of `arm`, as written."""
        return [r.quality for r in self.runs if r.arm == arm and r.status == "complete"]


OPTIMIZER_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adamwspam": "AdamWSPAM"}


def _base(s: dict) -> str:
    return s["adamwprune_base"] if s["optimizer"] == "adamwprune" else s["optimizer"]


def _inactive_optimizer_settings(s: dict) -> None:
    """Options the Kconfig hides for this optimizer are recorded as null, as settings_from_kconfig does."""
    if s["optimizer"] != "adamwprune":
        s["adamwprune_base"] = None
    if _base(s) != "adamwspam":
        s.update(spam_theta=None, spam_interval=None, spam_warmup=None)
    if s["optimizer"] == "sgd":
        s.update(beta1=None, beta2=None, adam_eps=None, amsgrad=None)
    else:
        s["sgd_momentum"] = None


def _optimizer(s: dict) -> dict:
    """What lib.optim.describe records for these settings."""
    base = _base(s)
    out = {"name": s["optimizer"], "class": OPTIMIZER_CLASSES[base], "base": base, "weight_decay": s["weight_decay"]}
    if base == "sgd":
        return {**out, "momentum": s["sgd_momentum"]}
    out.update(betas=[s["beta1"], s["beta2"]], eps=s["adam_eps"], amsgrad=s["amsgrad"])
    if base == "adamwspam":
        out.update(theta=s["spam_theta"], interval=s["spam_interval"], warmup=s["spam_warmup"])
    return out


def _metrics(s: dict, model: tuple, quality: float, seed: int) -> list[dict]:
    _, _, _, key, unit, items, _ = model
    start, end, freq, final = s["schedule_start"], s["schedule_end"], s["schedule_frequency"], s["target_sparsity"]
    pruned = s["pruning_method"] != "none"
    updates = set(range(start, end + 1, freq)) | {end}
    rows, achieved = [], 0.0
    first = 40000.0 if key == "val_ppl" else 0.1
    rows.append({"step": 0, "target_sparsity": 0.0, "achieved_sparsity": 0.0, "val_loss": 10.8,
                 key: first})
    for step in range(1, s["max_iters"] + 1):
        target = cubic_ramp(step, start, end, final) if pruned else 0.0
        if pruned and step in updates:
            achieved = target
        if step % s["log_interval"] == 0 or step == s["max_iters"]:
            # Settles near a level set by the final quality, so arms' curves part as their results do.
            level = _val_loss(quality, key) if math.isfinite(quality) else 4.0
            loss = level + (10.8 - level) * math.exp(-step / 40) + 0.01 * (seed - 1337)
            rows.append({"step": step, "loss": loss, "lr": s["lr"], "target_sparsity": target,
                         "achieved_sparsity": achieved, "step_time_s": 0.3, f"{unit}_per_s": items / 0.3})
        if step % s["eval_interval"] == 0 or step == s["max_iters"]:
            frac = step / s["max_iters"]
            value = first + (quality - first) * frac ** 0.3  # ends exactly at the final quality
            rows.append({"step": step, "target_sparsity": target, "achieved_sparsity": achieved,
                         "val_loss": _val_loss(value, key), key: value})
    return rows


def _val_loss(quality: float, key: str) -> float:
    return math.log(max(quality, 1.0)) if key == "val_ppl" else 1.0 - quality


def _summary(s: dict, model: tuple, method: str, quality: float, status: str, error: str | None) -> dict:
    name, params, prunable, key, unit, items, dataset = model
    pruned = method != "none"
    memory = {"weights": 4 * params, "grads": 4 * params, "optimizer.exp_avg": 4 * params,
              "optimizer.exp_avg_sq": 4 * params, "optimizer.step": 40, "masks": prunable if pruned else 0,
              "scores": 4 * prunable if method == "movement" else 0}
    memory["total"] = sum(memory.values())
    memory["mask_update_peak"] = 4 * prunable if pruned else 0
    final = s["target_sparsity"] if pruned else 0.0
    out = {
        "status": status, "model": name, "model_family": s["model"], "dataset": dataset,
        "optimizer": _optimizer(s),
        "pruning_method": s["pruning_method"],
        "variant": s["state_variant"] if s["pruning_method"] == "state" else None,
        "schedule": {"kind": s["schedule"], "start": s["schedule_start"], "end": s["schedule_end"], "initial": 0.0,
                     "final": s["target_sparsity"], "frequency": s["schedule_frequency"]} if pruned else None,
        "target_sparsity": final, "final_sparsity": final, "sparsity_by_group": {"attn": final, "mlp": final},
        "params": params, "prunable_params": prunable, "seed": s["seed"], "device": "cpu", "torch": "2.13.0+cpu",
        "threads": 2, "settings": s, "iterations": s["max_iters"], "iterations_planned": s["max_iters"],
        "budget_multiplier": 1.0, "adaptive": None, "wall_time_s": 0.3 * s["max_iters"],
        "throughput": items / 0.3 * (1.0 + 0.01 * (s["seed"] - 1337)), "throughput_unit": f"{unit}/s",
        "quality_metric": key, key: quality, "val_loss": _val_loss(quality, key),
        "memory": memory, "final_train_loss": 4.0,
        "mask_updates": [{"step": 20, "target_sparsity": 0.0, "target_count": 0, "pruned_count": 0}] if pruned else [],
    }
    if status != "complete":
        out["error"] = error or f"run {status}"
    if status == "diverged":
        out["diverged_at_step"] = 57
        out["iterations"] = 57
    return out


SEEDS = (1337, 1338, 1339)
QUALITY = {"magnitude": 52.0, "bitter7": 47.0}


@pytest.fixture
def builder(tmp_path: Path) -> MatrixBuilder:
    return MatrixBuilder(root=tmp_path / "results")


@pytest.fixture
def ab_builder(builder: MatrixBuilder) -> MatrixBuilder:
    """A fair A/B matrix: magnitude (baseline) and bitter7 on adamwprune plus magnitude on adamw, 3 seeds each;
    one more seed whose bitter7 run died without a summary and whose magnitude run diverged; one dropped combo."""
    for i, seed in enumerate(SEEDS):
        builder.add(method="magnitude", seed=seed, quality=QUALITY["magnitude"] + [0.0, 0.6, -0.3][i])
        builder.add(method="bitter7", seed=seed, quality=QUALITY["bitter7"] + [0.2, -0.4, 0.5][i])
        builder.add(method="magnitude", optimizer="adamw", seed=seed, quality=53.0 + [0.1, 0.0, -0.1][i])
    builder.add(method="magnitude", seed=1340, quality=float("nan"), status="diverged",
                error="loss became nan at step 57; lower LR or enable GRAD_CLIP")
    builder.add(method="bitter7", seed=1340, quality=0.0, status="failed", write_summary=False,
                error="RuntimeError: CUDA out of memory")
    builder.drop("state pruning needs OPTIMIZER=adamwprune", model="gpt2", optimizer="adamw", method="bitter7",
                 target_sparsity=0.5, schedule="cubic-ramp")
    return builder
