"""A test-matrix directory as typed records: the plan, its runs and the arms they form.

Layout (written by the matrix runner):

    results/matrix-<name>-<UTC stamp>/
      plan.json
      runs/<run id>/config, command, metrics.jsonl, summary.json, log

An arm is every run with the same axes except the seed. Runs that did not
complete stay in the records (the report lists them); aggregates use
`Arm.complete_runs` only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.errors import KpruneError
from lib.report.inference import ArmInference, Inference, arm_inference, read_inference
from lib.results import read_metrics_lines

AXIS_ORDER = ("model", "optimizer", "method", "target_sparsity", "schedule")
RUN_FIRST = "run `make test-matrix` first"
# The UTC stamp at the end of a matrix directory's name: 20261121-221000, 20261121T221000Z, ...
_STAMP = re.compile(r"(\d{8})[-T_]?(\d{6})Z?$")


def method_of(summary: dict) -> str:
    """The plan's name for a run's method: the variant for state pruning (bitter7), else the method."""
    if summary.get("pruning_method") == "state" and summary.get("variant"):
        return str(summary["variant"])
    return str(summary.get("pruning_method", "?"))


@dataclass
class Run:
    """One planned run and what its directory holds (possibly nothing yet)."""

    id: str
    arm: str
    seed: int | None
    axes: dict[str, Any]
    path: Path
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    problem: str | None = None  # why summary.json could not be used, when it exists but is unreadable
    damaged: str | None = None  # what was wrong in metrics.jsonl: the rows it could not read were left out
    inference: Inference | None = None  # what make bench-inference measured (inference.json), if it ran
    inference_problem: str | None = None  # why inference.json could not be used, when it exists

    @property
    def status(self) -> str:
        if self.summary is not None:
            return str(self.summary.get("status", "unknown"))
        if self.problem:
            return "unreadable"
        return "no summary.json" if self.path.is_dir() else "not started"

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def error(self) -> str | None:
        """What went wrong: the summary's error, else the last line of the run's log."""
        if self.summary is not None and self.summary.get("error"):
            return str(self.summary["error"])
        if self.problem:
            return self.problem
        return self.log_tail()

    def log_tail(self) -> str | None:
        log = self.path / "log"
        if not log.is_file():
            return None
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else None

    @property
    def quality_key(self) -> str | None:
        return None if self.summary is None else self.summary.get("quality_metric")

    @property
    def quality(self) -> float | None:
        """The final quality metric, or None when the run has no finite value."""
        key = self.quality_key
        value = None if key is None or self.summary is None else self.summary.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class Arm:
    """All runs with the same axes except the seed."""

    id: str
    axes: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    source: str | None = None  # the matrix it came from, when a report compares several

    @property
    def complete_runs(self) -> list[Run]:
        return [r for r in self.runs if r.complete]

    def summary_value(self, key: str) -> Any:
        """`key` from the first completed run's summary that has it (any run's if none completed)."""
        for run in self.complete_runs or self.runs:
            if run.summary is not None and run.summary.get(key) is not None:
                return run.summary[key]
        return None

    @property
    def model(self) -> str:
        return str(self.axes.get("model") or self.summary_value("model_family") or "?")

    @property
    def method(self) -> str:
        if "method" in self.axes:
            return str(self.axes["method"])
        summary = next((r.summary for r in self.runs if r.summary is not None), None)
        return method_of(summary) if summary else "?"

    @property
    def optimizer(self) -> str:
        if "optimizer" in self.axes:
            return str(self.axes["optimizer"])
        described = self.summary_value("optimizer")
        return str(described.get("name", "?")) if isinstance(described, dict) else "?"

    @property
    def schedule(self) -> str:
        """The schedule the runs used ("none" for dense runs, which have none), else the plan's."""
        summaries = [r.summary for r in self.complete_runs or self.runs if r.summary is not None]
        if summaries:
            described = summaries[0].get("schedule")
            return str(described.get("kind", "?")) if isinstance(described, dict) else "none"
        return str(self.axes.get("schedule", "?"))

    @property
    def target_sparsity(self) -> float | None:
        """The target the runs really had (0 for dense runs), else the plan's."""
        value = self.summary_value("target_sparsity")
        value = self.axes.get("target_sparsity") if value is None else value
        return None if value is None else float(value)

    @property
    def quality_key(self) -> str | None:
        return self.summary_value("quality_metric")

    @property
    def inference(self) -> ArmInference | None:
        """The mean measured inference speedups of its completed runs that `make bench-inference` measured."""
        return arm_inference([r.inference for r in self.complete_runs])


@dataclass
class Matrix:
    """A loaded matrix directory."""

    path: Path
    plan: dict
    arms: list[Arm]
    unplanned: list[str] = field(default_factory=list)  # run directories the plan does not name
    sources: list[Path] = field(default_factory=list)  # the matrix directories a comparison report reads

    @property
    def name(self) -> str:
        return str(self.plan.get("name", self.path.name))

    @property
    def runs(self) -> list[Run]:
        return [r for arm in self.arms for r in arm.runs]

    @property
    def dropped(self) -> list[dict]:
        return list(self.plan.get("dropped") or [])

    @property
    def axis_names(self) -> list[str]:
        """The plan's axes an arm is defined by (every axis but the seed), in plan order."""
        names = list((self.plan.get("axes") or {}).keys())
        for arm in self.arms:
            names += [k for k in arm.axes if k not in names]
        # plan.json may be written with sorted keys: put the usual axes in reading order, others after.
        names.sort(key=lambda n: AXIS_ORDER.index(n) if n in AXIS_ORDER else len(AXIS_ORDER))
        return [n for n in names if n != "seed"]

    @property
    def baseline(self) -> Arm | None:
        return self.arm(self.plan.get("baseline"))

    def arm(self, arm_id: str | None) -> Arm | None:
        return next((a for a in self.arms if a.id == arm_id), None)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(a.model for a in self.arms))

    @property
    def problems(self) -> list[str]:
        """One line per file that could not be read in full, each naming the file and what to do."""
        return [p for r in self.runs for p in (r.problem, r.damaged, r.inference_problem) if p]


def _read_json(path: Path, what: str, fix: str) -> dict:
    """The JSON object in `path`; anything else is one KpruneError naming the file and `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise KpruneError(f"{path}: {what} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise KpruneError(f"{path}: {what} is not valid JSON ({exc}); {fix}") from None
    except OSError as exc:
        raise KpruneError(f"{path}: cannot read {what} ({exc.strerror}); {fix}") from None
    if not isinstance(data, dict):
        raise KpruneError(f"{path}: {what} should hold a JSON object; {fix}")
    return data


def _redo(run_dir: Path) -> str:
    matrix_dir = run_dir.parent.parent
    return f"to run it again, remove {run_dir} and run `make test-matrix RESULTS={matrix_dir}`"


def read_metrics_rows(path: Path) -> tuple[list[dict], str | None]:
    """metrics.jsonl's rows, and what was wrong with the lines that could not be read (None if nothing was).

    A partial last line is what a killed run leaves: skipped without comment. Any other line that is not
    UTF-8 JSON holding an object is skipped and named, so one damaged file costs its own rows only.
    """
    try:
        rows, bad = read_metrics_lines(path)
    except OSError as exc:
        return [], f"{path}: cannot read it ({exc.strerror}); its curves are left out of the plots"
    if not bad:
        return rows, None
    shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return rows, (f"{path}: line{'s' if len(bad) > 1 else ''} {shown} not readable (not UTF-8 JSON objects); "
                  f"left out of the curves, the run's summary still counts; {_redo(Path(path).parent)}")


def _load_run(entry: dict, runs_dir: Path) -> Run:
    axes = dict(entry.get("axes") or {})
    run = Run(id=str(entry["id"]), arm=str(entry.get("arm") or entry["id"]),
              seed=entry.get("seed", axes.get("seed")), axes=axes, path=runs_dir / str(entry["id"]))
    summary_path = run.path / "summary.json"
    if summary_path.is_file():
        try:
            run.summary = _read_json(summary_path, "summary.json", f"the run is left out; {_redo(run.path)}")
        except KpruneError as exc:
            run.problem = str(exc)  # one bad run is reported, not fatal to the report
    metrics_path = run.path / "metrics.jsonl"
    if metrics_path.is_file():
        run.metrics, run.damaged = read_metrics_rows(metrics_path)
    run.inference, run.inference_problem = read_inference(run.path)
    return run


def load_matrix(path: Path, require_complete: bool = True) -> Matrix:
    """Read `path` (a matrix directory); with `require_complete`, fail unless some run completed."""
    path = Path(path)
    if not path.is_dir():
        raise KpruneError(f"no matrix directory {path}; {RUN_FIRST}, or pass RESULTS=<matrix dir>")
    plan_path = path / "plan.json"
    if not plan_path.is_file():
        raise KpruneError(f"{path} has no plan.json, so it is not a matrix directory; {RUN_FIRST}")
    plan = _read_json(plan_path, "plan.json", "the matrix cannot be read without it: restore it from a copy, "
                      "or run `make test-matrix` for a new matrix")
    entries = plan.get("runs")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
        raise KpruneError(f"{plan_path}: 'runs' should be a list of objects with an 'id'")
    runs_dir = path / "runs"
    arms: dict[str, Arm] = {}
    for entry in entries:
        run = _load_run(entry, runs_dir)
        arm_axes = {k: v for k, v in run.axes.items() if k != "seed"}
        arms.setdefault(run.arm, Arm(id=run.arm, axes=arm_axes)).runs.append(run)
    planned = {str(e["id"]) for e in entries}
    unplanned = sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and p.name not in planned) \
        if runs_dir.is_dir() else []
    matrix = Matrix(path=path, plan=plan, arms=list(arms.values()), unplanned=unplanned)
    if require_complete and not any(r.complete for r in matrix.runs):
        counts = ", ".join(f"{n} {s}" for s, n in _status_counts(matrix.runs).items()) or "no runs planned"
        raise KpruneError(f"{path}: no run has completed ({counts}); {RUN_FIRST} and let it finish")
    return matrix


def _status_counts(runs: list[Run]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    return counts


def status_counts(matrix: Matrix) -> dict[str, int]:
    """How many runs have each status, e.g. {"complete": 6, "diverged": 1, "no summary.json": 1}."""
    return _status_counts(matrix.runs)


def _newest_key(path: Path) -> tuple[str, float]:
    match = _STAMP.search(path.name)
    # The stamp orders directories made on this machine or elsewhere; mtime breaks ties and covers names without one.
    return (match.group(1) + match.group(2) if match else "", path.stat().st_mtime)


def newest_matrix_dir(results_root: Path) -> Path:
    """The newest `matrix-*` directory with a plan.json under `results_root`."""
    root = Path(results_root)
    if not root.is_dir():
        raise KpruneError(f"no results directory {root}; {RUN_FIRST}")
    candidates = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("matrix-")]
    with_plan = [p for p in candidates if (p / "plan.json").is_file()]
    if not with_plan:
        found = f" ({len(candidates)} without a plan.json)" if candidates else ""
        raise KpruneError(f"no matrix directory under {root}{found}; {RUN_FIRST}")
    return max(with_plan, key=_newest_key)
