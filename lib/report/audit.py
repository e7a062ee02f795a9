"""The fairness audit: compared arms must differ only in the axis the comparison is about.

Compared pairs are every arm with its baseline (lib.report.baseline) and
every two arms that differ in exactly one plan axis other than the model
(different models are never compared with each other). For each pair, the
completed runs' effective settings and what the runs really did (schedule
with its update frequency, adaptive warp, iterations, optimizer as built —
class, base and every hyper-parameter, SPAM's included —, dataset, model
size, seeds) are compared; every difference the intended axes do not
explain is reported.

A pair whose arms differ in more than one plan axis (an arm and a baseline
that also has another optimizer, say) is confounded: its difference in
quality cannot be put down to any one axis, so it is never called fair, and
what each axis really changed (AdamWSPAM vs plain AdamW, not only the
optimizer's name) is listed with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from lib.pruning.registry import IMPLIED_SCOPE
from lib.report.baseline import baseline_for
from lib.report.runs import Arm, Matrix

ABSENT = "(absent)"
# Settings that differ per run by design, not per arm.
PER_RUN_SETTINGS = ("output_dir", "run_name", "seed", "threads")
# Settings that say where a run reports, not what it ran (the trackers): never a difference.
REPORTING_PREFIXES = ("track_",)
# Summary keys that say what a run really did, compared next to the settings.
DERIVED_KEYS = ("model", "params", "prunable_params", "dataset", "train_tokens", "val_tokens", "train_samples",
                "test_samples", "iterations", "budget_multiplier", "target_sparsity", "device", "torch")
DERIVED_DICTS = ("optimizer", "schedule", "adaptive", "sparsity_structure")
# A setting and the fact it produces: when both differ, one line names the fact and notes the setting.
MIRRORS = {"schedule": "schedule.kind", "schedule_start": "schedule.start", "schedule_end": "schedule.end",
           "initial_sparsity": "schedule.initial", "schedule_frequency": "schedule.frequency",
           "target_sparsity": "target_sparsity", "max_iters": "iterations", "optimizer": "optimizer.name",
           "adamwprune_base": "optimizer.base", "weight_decay": "optimizer.weight_decay",
           "beta1": "optimizer.betas", "beta2": "optimizer.betas", "adam_eps": "optimizer.eps",
           "amsgrad": "optimizer.amsgrad", "sgd_momentum": "optimizer.momentum",
           "spam_theta": "optimizer.theta", "spam_interval": "optimizer.interval",
           "spam_warmup": "optimizer.warmup"}
# Settings that only one optimizer reads: another optimizer leaves them unset (null), by design.
OPTIMIZER_SETTINGS = tuple(f"settings.{k}" for k, v in MIRRORS.items() if v.startswith("optimizer."))
# What each known axis legitimately changes; any other axis changes settings.<axis> and <axis>.*.
AXIS_KEYS = {
    "method": ("settings.pruning_method", "settings.state_variant", "pruning_method", "variant"),
    "optimizer": ("settings.optimizer", "settings.adamwprune_base", "optimizer.name", "optimizer.class",
                  "optimizer.base"),
    "target_sparsity": ("settings.target_sparsity", "target_sparsity", "schedule.final"),
    # The adaptive warp is fitted to the schedule's curve, so another curve gets another warp.
    "schedule": ("settings.schedule", "schedule.kind", "adaptive.warp", "adaptive.warp_used"),
    # Another structure has other group settings, another group count, and may leave other layers out of the pool.
    # (A key ending in "." stands for every key below it.)
    "sparsity_structure": ("settings.sparsity_structure", "settings.nm_n", "settings.nm_m", "settings.block_rows",
                           "settings.block_cols", "prunable_params", "sparsity_structure.kind",
                           "sparsity_structure.group", "sparsity_structure.groups", "sparsity_structure.n",
                           "sparsity_structure.m", "sparsity_structure.rows", "sparsity_structure.cols",
                           "sparsity_structure.units.", "sparsity_structure.attached"),
    "sparsity_scope": ("settings.sparsity_scope", "sparsity_structure.scope"),
    # The matrix records every run's MAX_ITERS (0: prune-only, lib/matrix/plan.py): the steps it trained.
    "max_iters": ("settings.max_iters", "iterations"),
}
# A method may imply its selection scope (bitter4: layer-adaptive, lib/pruning/registry.py): on the method axis
# the scope follows such a method; between two methods that imply none it must agree.
METHOD_SCOPE_KEYS = ("settings.sparsity_scope", "sparsity_structure.scope")
# With a dense arm (method none) on one side there is no schedule to compare.
DENSE_KEYS = ("schedule", "adaptive", "target_sparsity")


@dataclass(frozen=True)
class Difference:
    """One fact on which two arms disagree, e.g. `optimizer.weight_decay: 0.1 vs 0.0`."""

    key: str
    a: str
    b: str
    note: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.a} vs {self.b}" + (f" ({self.note})" if self.note else "")


@dataclass
class Comparison:
    """Two compared arms, the axes the comparison is about, and what else differs."""

    a: str
    b: str
    axes: tuple[str, ...]
    reason: str  # "baseline" or "one axis"
    differences: list[Difference] = field(default_factory=list)
    skipped: str | None = None  # why the pair could not be audited
    # What the intended axes really changed in the runs (e.g. optimizer.class: AdamWSPAM vs AdamW).
    intended: list[Difference] = field(default_factory=list)

    @property
    def confounded(self) -> bool:
        """More than one axis differs: no difference in quality can be put down to one of them."""
        return len(self.axes) > 1

    @property
    def fair(self) -> bool:
        return self.skipped is None and not self.differences and not self.confounded

    @property
    def verdict(self) -> str:
        if self.skipped:
            return f"not audited: {self.skipped}"
        n = len(self.differences)
        found = f"{n} difference{'s' if n > 1 else ''}" if n else ""
        if self.confounded:
            return f"confounded: differs in {len(self.axes)} axes ({', '.join(self.axes)})" + \
                (f" and {found} besides" if found else "")
        return found or "fair"


@dataclass(frozen=True)
class Inconsistency:
    """A fact that differs between the seeds of one arm."""

    arm: str
    key: str
    values: dict[str, list[Any]]  # shown value -> seeds

    def __str__(self) -> str:
        parts = [f"{v} (seeds {', '.join(str(s) for s in seeds)})" for v, seeds in self.values.items()]
        return f"{self.key}: " + " vs ".join(parts)


@dataclass
class Audit:
    comparisons: list[Comparison]
    inconsistencies: list[Inconsistency]

    @property
    def unfair(self) -> list[Comparison]:
        """Pairs with a difference besides their intended axis, or with more than one intended axis."""
        return [c for c in self.comparisons if c.differences or (c.confounded and not c.skipped)]


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _show(canon: str) -> str:
    if canon == ABSENT:
        return canon
    value = json.loads(canon)
    return value if isinstance(value, str) else canon


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = _canon(value)


def run_facts(summary: dict) -> dict[str, str]:
    """What a run ran with, as flat `key -> canonical JSON`: settings.*, optimizer.*, schedule.*, ...."""
    facts: dict[str, str] = {}
    for k, v in (summary.get("settings") or {}).items():
        if k not in PER_RUN_SETTINGS and not k.startswith(REPORTING_PREFIXES):
            facts[f"settings.{k}"] = _canon(v)
    for k in DERIVED_DICTS:
        if k in summary:
            _flatten(k, summary[k], facts)
    for k in DERIVED_KEYS:
        if k in summary:
            value = summary[k]
            if k == "device" and isinstance(value, str):
                value = value.split(":")[0]  # cuda:0 and cuda:1 are the same kind of device
            facts[k] = _canon(value)
    return facts


def arm_facts(arm: Arm) -> dict[str, dict[str, list[Any]]]:
    """Each fact of the arm's completed runs: canonical value -> seeds with it (absent counts as a value)."""
    runs = [(r.seed, run_facts(r.summary or {})) for r in arm.complete_runs]
    keys = sorted(set().union(*(f for _, f in runs))) if runs else []
    out: dict[str, dict[str, list[Any]]] = {}
    for key in keys:
        for seed, facts in runs:
            out.setdefault(key, {}).setdefault(facts.get(key, ABSENT), []).append(seed)
    return out


def _shown_set(values: list[str]) -> str:
    shown = [_show(v) for v in values]
    return shown[0] if len(shown) == 1 else "{" + ", ".join(shown) + "}"


def _seeds(arm: Arm) -> list[Any]:
    return sorted({r.seed for r in arm.complete_runs}, key=lambda s: (str(type(s)), s))


def _legitimate(key: str, axes: tuple[str, ...], dense: bool, only_one_side: bool, implied_scope: bool) -> bool:
    for axis in axes:
        if axis in AXIS_KEYS:
            if key in AXIS_KEYS[axis] or any(k.endswith(".") and key.startswith(k) for k in AXIS_KEYS[axis]):
                return True
            if axis == "method" and implied_scope and key in METHOD_SCOPE_KEYS:
                return True
        elif key in (f"settings.{axis}", axis) or key.startswith(f"{axis}."):  # an axis this table does not know
            return True
        # Another optimizer has other hyper-parameters (momentum vs betas, SPAM's theta); shared ones must agree.
        if axis == "optimizer" and only_one_side and (key.startswith("optimizer.") or key in OPTIMIZER_SETTINGS):
            return True
    return dense and any(key == k or key.startswith(f"{k}.") for k in DENSE_KEYS)


def compare_arms(a: Arm, b: Arm, axes: tuple[str, ...], reason: str) -> Comparison:
    """Every fact of `a` and `b` that differs and that `axes` do not account for."""
    comparison = Comparison(a=a.id, b=b.id, axes=axes, reason=reason)
    missing = [arm.id for arm in (a, b) if not arm.complete_runs]
    if missing:
        comparison.skipped = f"no completed run in {', '.join(missing)}"
        return comparison
    fa, fb = arm_facts(a), arm_facts(b)
    dense = "none" in (a.method, b.method)
    implied_scope = any(arm.method in IMPLIED_SCOPE for arm in (a, b))
    found: dict[str, Difference] = {}
    for key in sorted(set(fa) | set(fb)):
        va, vb = sorted(fa.get(key, {ABSENT: []})), sorted(fb.get(key, {ABSENT: []}))
        if va == vb:
            continue
        difference = Difference(key, _shown_set(va), _shown_set(vb))
        one_side = any(v in (ABSENT, "null") for v in va + vb)  # set in one arm, absent or unset in the other
        if _legitimate(key, axes, dense, one_side, implied_scope):
            if not key.startswith("settings."):  # what ran, not what was asked for
                comparison.intended.append(difference)
            continue
        found[key] = difference
    for setting, fact in MIRRORS.items():
        key = f"settings.{setting}"
        if key in found and fact in found:  # the setting explains the fact: one line
            d, s = found[fact], found.pop(key)
            note = f"setting {setting}: {s.a} vs {s.b}"
            found[fact] = Difference(d.key, d.a, d.b, f"{d.note}; {note}" if d.note else note)
    comparison.differences = list(found.values())
    sa, sb = _seeds(a), _seeds(b)
    if sa != sb:
        comparison.differences.append(Difference("seeds", "{" + ", ".join(map(str, sa)) + "}",
                                                 "{" + ", ".join(map(str, sb)) + "}"))
    return comparison


def differing_axes(matrix: Matrix, a: Arm, b: Arm) -> tuple[str, ...]:
    axes = tuple(x for x in matrix.axis_names if a.axes.get(x) != b.axes.get(x))
    # The plan records each run's scope; where each arm has the one its method means (bitter4: layer-adaptive,
    # others: global), the scope came with the method and is no axis of its own.
    if "method" in axes and all(arm.axes.get("sparsity_scope") == IMPLIED_SCOPE.get(arm.method, "global")
                                for arm in (a, b)):
        axes = tuple(x for x in axes if x != "sparsity_scope")
    return axes


def compared_pairs(matrix: Matrix) -> list[tuple[Arm, Arm, str]]:
    """(a, b, reason): each arm with its baseline first, then arms one axis apart, then (in a report over
    several matrices) the same arm in two matrices; each pair once."""
    pairs: list[tuple[Arm, Arm, str]] = []
    seen: set[frozenset[str]] = set()
    for arm in matrix.arms:
        base = baseline_for(matrix, arm)
        if base is not None and base is not arm and frozenset((base.id, arm.id)) not in seen:
            seen.add(frozenset((base.id, arm.id)))
            pairs.append((base, arm, "baseline"))
    for a, b in combinations(matrix.arms, 2):
        axes = differing_axes(matrix, a, b)
        if frozenset((a.id, b.id)) in seen:
            continue
        if len(axes) == 1 and axes[0] != "model":
            pairs.append((a, b, "one axis"))
        elif not axes:  # only arms of two matrices have the same axes
            pairs.append((a, b, "same arm"))
        seen.add(frozenset((a.id, b.id)))
    return pairs


def audit_matrix(matrix: Matrix) -> Audit:
    """Compare every compared pair, and check that the seeds of each arm ran the same way."""
    comparisons = [compare_arms(a, b, differing_axes(matrix, a, b), reason) for a, b, reason in compared_pairs(matrix)]
    inconsistencies = []
    for arm in matrix.arms:
        facts = {k: v for k, v in arm_facts(arm).items() if len(v) > 1}
        for key, values in facts.items():
            setting = key.removeprefix("settings.")
            if key.startswith("settings.") and MIRRORS.get(setting) in facts:
                continue  # the fact it produces is listed
            inconsistencies.append(Inconsistency(arm.id, key, {_show(v): s for v, s in values.items()}))
    return Audit(comparisons, inconsistencies)
