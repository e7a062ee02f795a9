"""make ... VENV= runs an existing Python: what it lacks is named with the pip command, nothing installed."""

from __future__ import annotations

import subprocess
from importlib import metadata

from lib.kconfig import REPO_ROOT
from scripts import check_env


def test_missing_packages_are_named_and_other_versions_noted(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# a comment\ntorch==2.13.0\nnumpy==2.4.6\ntiktoken==0.14.0\n")
    have = {"torch": "2.5.1+cu124", "numpy": "2.4.6"}

    def installed(name):
        if name not in have:
            raise metadata.PackageNotFoundError(name)
        return have[name]
    missing, notes = check_env.check(check_env.pins(req), installed)
    assert missing == ["tiktoken==0.14.0"]
    assert notes == ["torch 2.5.1+cu124 (requirements pin 2.13.0)"]


def test_main_exits_2_with_the_pip_command(tmp_path, capsys):
    req = tmp_path / "req.txt"
    req.write_text("no-such-package-kprune==1.0\npytest==9.2.0\n")
    assert check_env.main([str(req)]) == 2
    err = capsys.readouterr().err
    assert "lacks no-such-package-kprune" in err and "-m pip install no-such-package-kprune==1.0" in err
    assert check_env.main([str(REPO_ROOT / "requirements.txt")]) == 0  # this environment has all of them


def test_pytest_is_required_only_for_the_tests(tmp_path, monkeypatch):
    req = tmp_path / "req.txt"
    req.write_text("pytest-not-here==1.0\n")
    assert check_env.main([str(req)]) == 0
    assert check_env.main(["--tests", str(req)]) == 2


def test_make_with_empty_venv_uses_python_as_is():
    python = "/opt/node/bin/python3"  # make -n only prints: it need not exist
    out = subprocess.run(["make", "-n", "check-gpu", "bench-gpu", "install", f"PYTHON={python}", "VENV="],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert f"{python} -m scripts.check_env" in out
    assert f"{python} -m scripts.check_gpu" in out and f"{python} -m bench.gpu" in out
    assert "venv" not in out and "pip install" not in out
    default = subprocess.run(["make", "-n", "check-gpu"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert ".venv/bin/python -m scripts.check_gpu" in default
