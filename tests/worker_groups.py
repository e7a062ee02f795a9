"""A pytest plugin to run the suite on pytest-xdist workers: `make test PYTEST_ARGS="-n 2 --dist loadfile -p tests.worker_groups"`.

xdist's `loadfile` hands out whole test files: a file's module-scoped
fixtures (a trained run, a copied project) are built once, not once per
worker, and tests that go on from the state an earlier one left (a
project's .config) keep their order. One change here: every file under a
`slurm/` folder counts as one, so all tests of the real Slurm run on one
worker: tests/slurm/conftest.py starts the machine's one slurmctld once per
worker that asks for it. (xdist's `loadgroup` with `xdist_group` marks would
say the same, but pytest-xdist 3.8.0 cannot rename pytest 9's test ids and
silently runs the marked tests anywhere.)

Other `--dist` modes, and runs without `-n`, are left as they are.
"""

from __future__ import annotations

import pytest

SLURM_FOLDER = "slurm"


def work_unit(nodeid: str) -> str:
    """The unit a test is handed out in: its file, or the whole slurm/ folder for the tests there."""
    path = nodeid.split("::", 1)[0]
    folders = path.split("/")[:-1]
    if SLURM_FOLDER in folders:
        return "/".join(folders[:folders.index(SLURM_FOLDER) + 1])
    return path


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist installed, pytest runs as ever
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndSlurmFolder(LoadScopeScheduling):
        """loadfile's scheduler (also built on LoadScopeScheduling), with slurm/ as one unit."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

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
