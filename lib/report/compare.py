"""Several matrix directories as one matrix, so one report compares their arms (`make compare`).

Each arm keeps its axes and takes the name of its matrix: its id becomes
`<matrix>/<arm id>` and `Arm.source` names the matrix. The first matrix's
baseline is the baseline. Nothing in the source directories is written.
"""

from __future__ import annotations

import time
from pathlib import Path

from lib.errors import KpruneError
from lib.report.runs import Matrix, load_matrix


def _names(matrices: list[Matrix]) -> list[str]:
    """Each matrix's name, or its directory's name where two matrices share one."""
    names = [m.name for m in matrices]
    out = [m.name if names.count(m.name) == 1 else m.path.name for m in matrices]
    if len(set(out)) < len(out):
        raise KpruneError(f"the same matrix directory is given twice: {', '.join(str(m.path) for m in matrices)}")
    return out


def combine_matrices(paths: list[Path], out_dir: Path) -> Matrix:
    """The arms of every matrix in `paths` as one Matrix whose report and plots go to `out_dir`."""
    if len(paths) < 2:
        raise KpruneError("compare needs two or more matrix directories: make compare RESULTS=\"<dir> <dir>\"")
    matrices = [load_matrix(Path(p)) for p in paths]
    names = _names(matrices)
    baseline = f"{names[0]}/{matrices[0].baseline.id}" if matrices[0].baseline else None  # before the renaming
    arms, axes, dropped, unplanned = [], {}, [], []
    for name, matrix in zip(names, matrices):
        for arm in matrix.arms:
            arm.id, arm.source = f"{name}/{arm.id}", name
            for run in arm.runs:
                run.id, run.arm = f"{name}/{run.id}", arm.id
            arms.append(arm)
        for axis, values in (matrix.plan.get("axes") or {}).items():
            axes.setdefault(axis, [])
            axes[axis] += [v for v in values if v not in axes[axis]]
        dropped += [{**d, "reason": f"{name}: {d.get('reason', '—')}"} for d in matrix.dropped]
        unplanned += [f"{name}/{u}" for u in matrix.unplanned]
    plan = {"name": " vs ".join(names), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "axes": axes, "baseline": baseline, "dropped": dropped}
    out_dir.mkdir(parents=True, exist_ok=False)
    return Matrix(path=out_dir, plan=plan, arms=arms, unplanned=unplanned, sources=[m.path for m in matrices])
