"""One call from a matrix directory to its plots, report.md and audit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib.report.audit import Audit, audit_matrix
from lib.report.markdown import write_report
from lib.report.plots import write_plots
from lib.report.runs import Matrix, load_matrix


@dataclass
class Report:
    """What `build_report` wrote, and the records it wrote them from."""

    matrix: Matrix
    audit: Audit
    plots: dict[str, Path]
    report: Path


def build_report(matrix_dir: Path) -> Report:
    """Load `matrix_dir`, draw `plots/*.png`, audit fairness and write `report.md` (all atomically).

    Raises KpruneError for a missing directory or plan.json, or when no run has completed.
    """
    return report_for(load_matrix(Path(matrix_dir)))


def report_for(matrix: Matrix) -> Report:
    """Draw `matrix`'s plots into `<matrix.path>/plots/`, audit it and write `<matrix.path>/report.md`."""
    plots = write_plots(matrix)
    audit = audit_matrix(matrix)
    return Report(matrix=matrix, audit=audit, plots=plots, report=write_report(matrix, audit, plots))
