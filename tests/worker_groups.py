"""A pytest plugin to run the suite on pytest-xdist workers: `make test PYTEST_ARGS="-n 2 --dist loadfile -p tests.worker_groups"`.

xdist's `loadfile` hands out whole test files: a file's module-scoped
fixtures (a trained run, a copied project) are built once, not once per
worker, and tests that go on from the state an earlier one left (a
project's .config) keep their order. Two changes here. Every file under a
`slurm/` folder counts as one unit, so all tests of the real Slurm run on one
worker: tests/slurm/conftest.py starts the machine's one slurmctld once per
worker that asks for it. (xdist's `loadgroup` with `xdist_group` marks would
say the same, but pytest-xdist 3.8.0 cannot rename pytest 9's test ids and
silently runs the marked tests anywhere.) And the units are handed out
longest first (UNIT_SECONDS), so the two workers finish at about the same time.

Other `--dist` modes, and runs without `-n`, are left as they are.
"""

from __future__ import annotations

import pytest

SLURM_FOLDER = "slurm"

# The longest units, with the seconds their tests took in one full run (`--durations=0` summed by unit; two
# workers, a loaded machine: only their order matters). They are handed out longest first, so the run does
# not end with one worker on a long file while the other has nothing left; xdist's own order (most tests
# first) left the end-to-end files, few tests each, for last. A unit not named here comes after them.
UNIT_SECONDS = {
    "tests/test_train_e2e.py": 1270,
    "tests/test_defconfigs.py": 1029,
    "tests/slurm": 375,
    "tests/test_matrix_e2e.py": 320,
    "tests/test_bench_e2e.py": 280,
    "tests/lib/test_gpu_checks.py": 230,
    "tests/test_distributed.py": 190,
    "tests/test_pretrained_workflow_e2e.py": 169,
    "tests/test_resume.py": 145,
    "tests/test_makefile_quoting.py": 135,
    "tests/test_plots_cli.py": 134,
    "tests/test_trainers_learn.py": 123,
    "tests/lib/test_gpu_readiness.py": 107,
    "tests/test_shrink_convnets_e2e.py": 80,
    "tests/test_export_e2e.py": 64,
    "tests/test_make_schedule_e2e.py": 57,
    "tests/lib/tracking/test_trackers_e2e.py": 46,
    "tests/lib/test_loop_features.py": 35,
    "tests/test_hf_gpt2.py": 31,
    "tests/test_report_real_runs.py": 30,
    "tests/bench/test_bench_inference.py": 30,
}


def work_unit(nodeid: str) -> str:
    """The unit a test is handed out in: its file, or the whole slurm/ folder for the tests there."""
    path = nodeid.split("::", 1)[0]
    folders = path.split("/")[:-1]
    if SLURM_FOLDER in folders:
        return "/".join(folders[:folders.index(SLURM_FOLDER) + 1])
    return path


def longest_unit(units: dict[str, dict]) -> str:
    """The unit (name -> its tests) expected to take longest: by UNIT_SECONDS, then by number of tests."""
    return max(units, key=lambda unit: (UNIT_SECONDS.get(unit, 0), len(units[unit])))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist installed, pytest runs as ever
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndSlurmFolder(LoadScopeScheduling):
        """loadfile's scheduler (also built on LoadScopeScheduling), with slurm/ as one unit, longest first."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node) -> None:
            # xdist hands out the queue's first unit: put the longest left there.
            self.workqueue.move_to_end(longest_unit(self.workqueue), last=False)
            super()._assign_work_unit(node)

    return FilesAndSlurmFolder(config, log)


def pytest_sessionstart(session) -> None:
    """Under xdist, a test path that does not exist is pytest's usage error (status 4), as it is without.

    Only the workers collect, and their "file or directory not found" ends the run as "no tests ran"
    (status 5): `make test PYTEST_ARGS=tests/tpyo.py` must say what is wrong, not that nothing ran.
    """
    config = session.config
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None) or config.option.pyargs:
        return
    for arg in config.args:
        path = arg.partition("[")[0].split("::", 1)[0]
        if not (config.invocation_params.dir / path).exists():
            raise pytest.UsageError(f"file or directory not found: {arg}")
