"""A new matrix directory is the one its runs write below, even when the clock ticks in between."""

from __future__ import annotations

import itertools

from lib.kconfig import REPO_ROOT
from scripts import kconfig as kconfig_cli
from scripts import matrix


def test_runs_write_below_the_matrix_directory_made_for_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert kconfig_cli.main(["defconfig", str(REPO_ROOT / "defconfigs" / "slurm-matrix-lenet5")]) == 0
    seconds = itertools.count(0)  # every reading of the clock is a second later
    monkeypatch.setattr(matrix.time, "strftime", lambda fmt, t=None: f"20260101-0000{next(seconds):02d}")
    matrix_dir, plan, _, new = matrix.prepare(None, None)
    assert new
    for run in plan.runs:
        assert run.argv[run.argv.index("--output-dir") + 1] == str(matrix_dir / "runs")
    matrix._new_matrix_dir(matrix_dir, plan)
    assert (matrix_dir / "plan.json").is_file() and len(list(tmp_path.glob("results/matrix-*"))) == 1
