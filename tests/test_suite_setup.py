"""The test suite's own guarantees: a hung test fails, and `make test-fast` never fails for lack of tests.

Each check runs pytest on a small test file under the project's pytest.ini
(and, for test-fast, its selection hooks), without the project's conftest,
so it starts in about a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.kconfig import REPO_ROOT


def _pytest(folder: Path, files: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (folder / name).write_text(text)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(REPO_ROOT / "pytest.ini"),
                           "--rootdir", str(folder), *args, str(folder)], cwd=folder, capture_output=True, text=True,
                          env={**_without_addopts(), "PYTHONPATH": str(REPO_ROOT)}, timeout=120)


def _without_addopts() -> dict:
    # The outer run's PYTEST_ADDOPTS (make test puts PYTEST_ARGS there) must not change these runs' options.
    return {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}


def test_every_test_has_a_default_timeout(pytestconfig):
    assert float(pytestconfig.getini("timeout")) == 300


@pytest.mark.slow  # starts a process or trains: over a second
def test_a_hung_test_fails_instead_of_hanging(tmp_path):
    started = time.monotonic()
    # The project's timeout lowered to 2 s, so the hang is short.
    result = _pytest(tmp_path, {"test_hang.py": "import subprocess\n\n\ndef test_waits_for_ever():\n"
                                                "    subprocess.run(['sleep', '600'])\n"}, "-o", "timeout=2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Timeout (>2.0s)" in result.stdout and "1 failed" in result.stdout
    assert time.monotonic() - started < 60


HOOKS = {"conftest.py": "from tests.fast_selection import pytest_collection_modifyitems, pytest_sessionfinish\n"}


def test_make_test_fast_on_slow_tests_only_is_not_an_error(tmp_path):
    slow = "import pytest\n\n\n@pytest.mark.slow\ndef test_a():\n    pass\n\n\n@pytest.mark.slow\ndef test_b():\n    pass\n"
    result = _pytest(tmp_path, {**HOOKS, "test_slow.py": slow}, "-m", "not slow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 2 selected tests are marked slow: nothing fast to run" in result.stdout


def test_a_selection_that_matches_nothing_is_still_an_error(tmp_path):
    fast = "def test_fast():\n    pass\n"
    result = _pytest(tmp_path, {**HOOKS, "test_fast.py": fast}, "-m", "not slow", "-k", "no_such_test")
    assert result.returncode == 5, result.stdout + result.stderr
    result = _pytest(tmp_path, {**HOOKS, "test_fast.py": fast}, "-m", "not slow")
    assert result.returncode == 0 and "1 passed" in result.stdout


def test_test_files_have_unique_names():
    # tests/ has no __init__.py files: pytest imports each test file by its base name, so two
    # files of one name in different folders stop the whole collection.
    names = [p.name for p in (REPO_ROOT / "tests").rglob("test_*.py")]
    assert sorted(set(names)) == sorted(names)



# The parallel run README's Tests section gives: make test PYTEST_ARGS="-n 2 --dist loadfile -p tests.worker_groups".
PARALLEL = ["-n", "2", "--dist", "loadfile", "-p", "tests.worker_groups"]


# Each test notes the worker it ran on; the sleep lets the other worker ask for work meanwhile.
RECORD = "import os, pathlib, time\n\n\ndef record(name):\n    time.sleep(0.2)\n" \
         "    (pathlib.Path(__file__).parent / name).write_text(os.environ['PYTEST_XDIST_WORKER'])\n"


def _recording_tests(prefix: str, n: int) -> str:
    return "from record import record\n\n\n" + "".join(f"def test_{i}():\n    record('{prefix}-{i}')\n\n\n"
                                                         for i in range(n))


@pytest.mark.slow  # starts a process or trains: over a second
def test_parallel_run_keeps_each_file_and_all_of_slurm_on_one_worker(tmp_path):
    assert f"PARALLEL_TESTS := {' '.join(PARALLEL)}" in (REPO_ROOT / "Makefile").read_text()  # what make test runs
    (tmp_path / "slurm").mkdir()
    files = {"record.py": RECORD, "test_a.py": _recording_tests("a", 8), "test_d.py": _recording_tests("d", 8),
             "slurm/test_b.py": _recording_tests("slurm-b", 4), "slurm/test_c.py": _recording_tests("slurm-c", 4)}
    result = _pytest(tmp_path, files, *PARALLEL)
    assert result.returncode == 0 and "24 passed" in result.stdout, result.stdout + result.stderr
    worker = {p.name: p.read_text() for p in tmp_path.iterdir() if p.name.startswith(("a-", "d-", "slurm-"))}
    assert len(worker) == 24
    for prefix in ("a-", "d-", "slurm-"):  # a file's tests together, and all of slurm/ (one slurmctld)
        assert len({w for name, w in worker.items() if name.startswith(prefix)}) == 1, (prefix, worker)
    assert set(worker.values()) == {"gw0", "gw1"}  # and both workers used


@pytest.mark.slow  # starts a process or trains: over a second
def test_parallel_run_of_a_missing_test_path_is_a_usage_error_naming_it(tmp_path):
    # Only xdist's workers collect; without the plugin's check this ends as "no tests ran" (status 5).
    result = _pytest(tmp_path, {"test_ok.py": "def test_ok():\n    pass\n"}, *PARALLEL, str(tmp_path / "tpyo.py"))
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"file or directory not found: {tmp_path / 'tpyo.py'}" in result.stderr


def test_parallel_run_hands_out_the_longest_unit_first():
    from tests.worker_groups import UNIT_SECONDS, longest_unit
    # xdist's own order (most tests first) would pick the unit tests and leave the end-to-end file for last.
    many_quick = {f"tests/lib/test_x.py::test_{i}": False for i in range(100)}
    units = {"tests/lib/test_x.py": many_quick, "tests/test_suite_setup.py": {"t": False},
             "tests/test_train_e2e.py": {"a": False, "b": False}, "tests/slurm": {"c": False}}
    assert longest_unit(units) == "tests/test_train_e2e.py"
    del units["tests/test_train_e2e.py"]
    assert longest_unit(units) == "tests/slurm"
    del units["tests/slurm"]
    assert longest_unit(units) == "tests/lib/test_x.py"  # units not in the table: most tests first
    # A renamed or split file would lose its place silently: every unit named there exists.
    assert all((REPO_ROOT / unit).exists() for unit in UNIT_SECONDS)


def test_trainers_the_suite_starts_let_idle_threads_sleep():
    # tests/conftest.py sets it before torch loads; the two workers share two cores, and OpenMP threads that
    # spin while they wait take the cores the other worker's trainer needs.
    result = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "PASSIVE"
