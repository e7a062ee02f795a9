"""The test-matrix plan: the product of the selected axes, validated run by run.

Each combination is the base configuration (the minimal form of .config, so
model-dependent defaults follow the model) plus one override per axis, loaded
with the same strict rules as `make train SET=...`. A combination that does
not validate is dropped with a one-line reason; what remains is the plan:
one run per combination and seed, each with the exact trainer flags it runs.

With MATRIX_ONESHOT_PRUNE_ONLY, an arm whose method scores without training
(PRUNE_ONLY_METHODS) runs prune-only: MAX_ITERS=0 and the one-shot schedule
at step 0 are further overrides of that arm, validated like the others. Every
run records its MAX_ITERS as the axis `max_iters`, so the report's fairness
audit calls a prune-only arm against a fine-tuned one confounded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import kconfiglib

from lib.errors import ConfigError
from lib.kconfig import (apply_overrides, load_kconfig, read_config, selected_model,
                         settings_from_kconfig, trainer_argv)
from lib.matrix.pretrained import check_pretrained
from lib.pruning.registry import IMPLIED_SCOPE, MATRIX_METHODS, PRUNE_ONLY_METHODS, SCOPES, STRUCTURES, VARIANT_NAMES

AXES = ("model", "optimizer", "method", "target_sparsity", "schedule", "sparsity_structure", "sparsity_scope", "seed")
# Axes a run may leave to its configuration when nothing is selected (bitter4 means its own scope): the
# value recorded is the one the run really uses.
FOLLOWS_CONFIG = ("sparsity_structure", "sparsity_scope")
# Recorded for every run, not swept: the steps it trains (0: prune-only).
ITERATIONS_AXIS = "max_iters"
# What a prune-only arm runs besides its axes (SCHEDULE=one-shot is its schedule axis): no step, pruned at step 0.
PRUNE_ONLY_OVERRIDES = ("MAX_ITERS=0", "SCHEDULE_START=0")

# Each bool of the matrix menu selects one value of one axis.
SELECTORS: dict[str, tuple[str, object]] = {
    "MATRIX_MODEL_GPT2": ("model", "gpt2"),
    "MATRIX_MODEL_LENET5": ("model", "lenet5"),
    **{f"MATRIX_OPTIMIZER_{o.upper()}": ("optimizer", o) for o in ("sgd", "adam", "adamw", "adamwspam", "adamwprune")},
    **{f"MATRIX_METHOD_{m.upper()}": ("method", m) for m in MATRIX_METHODS if m not in VARIANT_NAMES},
    **{f"MATRIX_VARIANT_{v.upper()}": ("method", v) for v in VARIANT_NAMES},
    "MATRIX_SPARSITY_50": ("target_sparsity", 0.5),
    "MATRIX_SPARSITY_70": ("target_sparsity", 0.7),
    "MATRIX_SPARSITY_90": ("target_sparsity", 0.9),
    **{f"MATRIX_SCHEDULE_{s.upper().replace('-', '_')}": ("schedule", s)
       for s in ("one-shot", "linear", "zhu-gupta", "cubic-ramp", "milestones", "steps")},
    **{f"MATRIX_STRUCTURE_{v.upper()}": ("sparsity_structure", v) for v in STRUCTURES},
    **{f"MATRIX_SCOPE_{v.upper().replace('-', '_')}": ("sparsity_scope", v) for v in SCOPES},
}
# The other matrix symbols, read by `build_plan` directly.
SETTINGS = ("MATRIX_NAME", "MATRIX_SEEDS", "MATRIX_BASELINE", "MATRIX_SPARSITY_LIST", "MATRIX_ONESHOT_PRUNE_ONLY")


@dataclass
class Run:
    id: str
    arm: str
    seed: int
    model: str
    axes: dict
    argv: list[str]            # trainer flags, OUTPUT_DIR and RUN_NAME included


@dataclass
class Plan:
    name: str
    axes: dict
    baseline: str | None
    runs: list[Run]
    dropped: list[dict]
    base_config: str
    plan_hash: str = ""
    created: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        runs = [Run(**r) for r in data["runs"]]
        return cls(**{**data, "runs": runs})


def _method_of(settings) -> str:
    return settings.state_variant if settings.pruning_method == "state" else settings.pruning_method


def _axis_values(kconf: kconfiglib.Kconfig) -> dict[str, list]:
    base = settings_from_kconfig(kconf)
    chosen: dict[str, list] = {axis: [] for axis in AXES}
    for symbol, (axis, value) in SELECTORS.items():
        if kconf.syms[symbol].tri_value == 2:
            chosen[axis].append(value)
    extra = kconf.syms["MATRIX_SPARSITY_LIST"].str_value
    for item in filter(None, (x.strip() for x in extra.split(","))):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"MATRIX_SPARSITY_LIST: '{item}' is not a number") from None
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"MATRIX_SPARSITY_LIST: {value:g} is outside [0, 1)")
        if value not in chosen["target_sparsity"]:
            chosen["target_sparsity"].append(value)
    defaults = {"model": base.model, "optimizer": base.optimizer, "method": _method_of(base),
                "target_sparsity": base.target_sparsity, "schedule": base.schedule}
    for axis, value in defaults.items():
        if not chosen[axis]:
            chosen[axis] = [value]
    for axis in FOLLOWS_CONFIG:
        if not chosen[axis]:
            chosen[axis] = [None]  # as each run's configuration gives it
    seeds = int(kconf.syms["MATRIX_SEEDS"].str_value)
    chosen["seed"] = [base.seed + i for i in range(seeds)]
    return chosen


def _prune_only(combo: dict) -> bool:
    return combo.get(ITERATIONS_AXIS) == 0 and combo["method"] != "none"


def _overrides(combo: dict) -> list[str]:
    out = [f"MODEL={combo['model']}", f"OPTIMIZER={combo['optimizer']}"]
    method = combo["method"]
    if method in VARIANT_NAMES:
        out += ["PRUNING_METHOD=state", f"STATE_VARIANT={method}"]
    else:
        out.append(f"PRUNING_METHOD={method}")
    if method != "none":
        out += [f"TARGET_SPARSITY={combo['target_sparsity']!r}", f"SCHEDULE={combo['schedule']}"]
        out += [f"{axis.upper()}={combo[axis]}" for axis in FOLLOWS_CONFIG if combo[axis] is not None]
    if _prune_only(combo):
        out += PRUNE_ONLY_OVERRIDES
    out.append(f"SEED={combo['seed']}")
    return out


def arm_id(combo: dict) -> str:
    parts = [combo["model"], combo["optimizer"], combo["method"]]
    if combo["method"] != "none":
        parts += [f"sp{combo['target_sparsity']:g}", combo["schedule"]]
        # Structure and scope name the arm only where they differ from what the method means by itself.
        if combo.get("sparsity_structure") not in (None, "unstructured"):
            parts.append(combo["sparsity_structure"])
        if combo.get("sparsity_scope") not in (None, IMPLIED_SCOPE.get(combo["method"], "global")):
            parts.append(combo["sparsity_scope"])
        if _prune_only(combo):
            parts.append("prune-only")
    return "-".join(parts)


def _minimal(kconf: kconfiglib.Kconfig) -> str:
    fd, tmp = tempfile.mkstemp(suffix=".defconfig")
    os.close(fd)
    try:
        kconf.write_min_config(tmp, header="")
        text = Path(tmp).read_text(encoding="utf-8")
    finally:
        os.unlink(tmp)
    # Where the runs go is not what they are: another executor or time limit keeps the plan (and its hash).
    return "".join(l for l in text.splitlines(keepends=True)
                   if not l.startswith(("CONFIG_MATRIX_EXECUTOR", "CONFIG_SLURM_")))


def _reason(combo: dict, exc: ConfigError) -> str:
    if combo["method"] in VARIANT_NAMES and combo["optimizer"] != "adamwprune":
        return f"state pruning ({combo['method']}) reads AdamWPrune's moments: needs OPTIMIZER=adamwprune"
    first = str(exc).splitlines()[0]
    reason = first.split(": ", 1)[1] if first.startswith("SET") and ": " in first else first
    return f"prune-only ({' '.join(PRUNE_ONLY_OVERRIDES)}): {reason}" if _prune_only(combo) else reason


def build_plan(kconf: kconfiglib.Kconfig, runs_dir: Path) -> Plan:
    """Expand the matrix `kconf` describes; runs write into `runs_dir/<run id>`."""
    axes = _axis_values(kconf)
    base_config = _minimal(kconf)
    prune_only = kconf.syms["MATRIX_ONESHOT_PRUNE_ONLY"].tri_value == 2
    runs, dropped, seen_arms, pretrained = [], [], set(), set()
    run_kconf = load_kconfig()  # reused: loading a config replaces every value
    fd, base_path = tempfile.mkstemp(suffix=".defconfig")
    os.close(fd)
    Path(base_path).write_text(base_config, encoding="utf-8")
    try:
        for values in itertools.product(*(axes[a] for a in AXES)):
            combo = dict(zip(AXES, values))
            if combo["method"] == "none":  # dense runs have no sparsity, schedule or structure: one arm, not many
                combo.update(target_sparsity=0.0, schedule="none", sparsity_structure="none", sparsity_scope="none")
            elif prune_only and combo["method"] in PRUNE_ONLY_METHODS:
                combo.update(schedule="one-shot", **{ITERATIONS_AXIS: 0})
            if combo["method"] != "none" and any(combo[axis] is None for axis in FOLLOWS_CONFIG):
                _fill_from_config(combo, Path(base_path), run_kconf)
            arm = arm_id(combo)
            run_id = f"{arm}-seed{combo['seed']}"
            if run_id in seen_arms:
                continue
            seen_arms.add(run_id)
            run_kconf, seen = read_config(Path(base_path), run_kconf)
            try:
                apply_overrides(run_kconf, seen, _overrides(combo) +
                                [f"OUTPUT_DIR={runs_dir}", f"RUN_NAME={run_id}"])
            except ConfigError as exc:
                combo.setdefault(ITERATIONS_AXIS, int(run_kconf.syms["MAX_ITERS"].str_value))
                if combo["seed"] == axes["seed"][0]:  # one line per combination, not per seed
                    dropped.append({"axes": {k: v for k, v in combo.items() if k != "seed"},
                                    "reason": _reason(combo, exc)})
                continue
            settings = settings_from_kconfig(run_kconf)
            combo.setdefault(ITERATIONS_AXIS, settings.max_iters)  # as the run has it (a model's own default)
            if settings.gpt2_init == "pretrained":
                pretrained.add(settings.gpt2_pretrained)
            runs.append(Run(id=run_id, arm=arm, seed=combo["seed"], model=selected_model(run_kconf),
                            axes=combo, argv=trainer_argv(run_kconf)))
    finally:
        os.unlink(base_path)
    for spec in sorted(pretrained):  # one error before anything runs, not the same one in every run
        check_pretrained(spec)
    axes[ITERATIONS_AXIS] = sorted({r.axes[ITERATIONS_AXIS] for r in runs})
    baseline_method = kconf.syms["MATRIX_BASELINE"].str_value
    baseline = next((r.arm for r in runs if r.axes["method"] == baseline_method), None)
    plan = Plan(name=kconf.syms["MATRIX_NAME"].str_value or "matrix", axes=axes, baseline=baseline, runs=runs,
                dropped=dropped, base_config=base_config)
    plan.plan_hash = plan_hash(plan)
    return plan


def _fill_from_config(combo: dict, base_path: Path, kconf: kconfiglib.Kconfig) -> None:
    """Record, for the axes left to the configuration, the value this combination's run would use."""
    follow = [axis for axis in FOLLOWS_CONFIG if combo[axis] is None]
    kconf, seen = read_config(base_path, kconf)
    try:
        apply_overrides(kconf, seen, _overrides(combo))
    except ConfigError:
        pass  # the values are set all the same; the real overrides report the error and drop the combination
    try:
        settings = settings_from_kconfig(kconf)
    except ValueError:
        settings = None
    fallback = {"sparsity_structure": "unstructured", "sparsity_scope": IMPLIED_SCOPE.get(combo["method"], "global")}
    for axis in follow:
        combo[axis] = getattr(settings, axis, None) or fallback[axis]


def plan_hash(plan: Plan) -> str:
    """Identifies what a plan runs, independent of where: same hash, same runs."""
    what = {"base": plan.base_config, "runs": [(r.id, r.axes) for r in plan.runs]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def plan_table(plan: Plan) -> str:
    """A readable table of the plan, for plan.md and the terminal."""
    lines = [f"# Test matrix `{plan.name}` ({len(plan.runs)} runs, {len(plan.dropped)} combinations dropped)", "",
             "| run | model | optimizer | method | sparsity | schedule | structure | scope | iterations | seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in plan.runs:
        a = r.axes
        iterations = a.get(ITERATIONS_AXIS, "—")
        lines.append(f"| {r.id} | {a['model']} | {a['optimizer']} | {a['method']} | {a['target_sparsity']:g} | "
                     f"{a['schedule']} | {a.get('sparsity_structure', '—')} | {a.get('sparsity_scope', '—')} | "
                     f"{'0 (prune-only)' if _prune_only(a) else iterations} | {a['seed']} |")
    if plan.dropped:
        lines += ["", "## Dropped combinations", ""]
        for d in plan.dropped:
            a = d["axes"]
            lines.append(f"- {a['model']} / {a['optimizer']} / {a['method']} / {a['target_sparsity']:g} / "
                         f"{a['schedule']} / {a.get('sparsity_structure', '—')} / {a.get('sparsity_scope', '—')}: "
                         f"{d['reason']}")
    lines += ["", f"Baseline arm: {plan.baseline or '(none: MATRIX_BASELINE matches no arm)'}"]
    return "\n".join(lines) + "\n"
