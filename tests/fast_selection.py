"""pytest hooks behind `make test-fast` (`-m "not slow"`), loaded by tests/conftest.py.

pytest ends a run whose every test was deselected with status 5 ("no tests
ran"), which make reports as an error. Under `make test-fast` that only
means the files asked for hold slow tests alone: say so and succeed. A
selection that matches nothing for another reason (a typo in -k) still ends
with status 5.
"""

from __future__ import annotations

import pytest

_collected = {"total": 0, "slow": 0}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Count what was collected before `-m` deselects anything."""
    _collected["total"] = len(items)
    _collected["slow"] = sum(1 for item in items if item.get_closest_marker("slow"))


def pytest_sessionfinish(session, exitstatus) -> None:
    """`make test-fast` pointed at slow tests only has nothing to run: say so, and do not fail."""
    only_slow = _collected["total"] > 0 and _collected["slow"] == _collected["total"]
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.config.option.markexpr == "not slow" \
            and only_slow:
        print(f"\nall {_collected['total']} selected tests are marked slow: nothing fast to run "
              "(make test runs them)")
        session.exitstatus = pytest.ExitCode.OK

