"""The data programs behind `make data-gpt2` and `make data-cifar10/100`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lib.data.cifar as cifar
from scripts import fetch_data
# The archive builder lives with the CIFAR reader tests.
from tests.lib.data.test_cifar import build_cifar10

REPO = Path(__file__).resolve().parents[1]


def _prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.prepare_gpt2_data", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # starts a process or trains: over a second
def test_prepare_prints_the_cache_dir_last(tmp_path: Path) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"body": f"Document {i}."}) + "\n" for i in range(5)))
    result = _prepare("--dataset", "custom", "--data-path", str(source), "--data-dir", str(tmp_path / "data"),
                      "--text-field", "body", "--max-docs", "4", "--val-fraction", "0.5")
    assert result.returncode == 0, result.stderr
    out_dir = tmp_path / "data" / "prepared" / "custom-gpt2"
    assert result.stdout.strip().splitlines()[-1] == f"data: {out_dir}"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["documents"] == {"train": 2, "val": 2, "total": 4}


@pytest.mark.slow  # starts a process or trains: over a second
def test_prepare_bad_input_exits_2(tmp_path: Path) -> None:
    result = _prepare("--dataset", "custom", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: DATASET=custom needs DATA_PATH")
    assert "Traceback" not in result.stderr
    result = _prepare("--dataset", "custom", "--data-path", str(tmp_path / "missing.txt"), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "DATA_PATH not found" in result.stderr


@pytest.fixture
def served_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CIFAR-10 archive served from a file:// URL in place of the Toronto one."""
    archive = build_cifar10(tmp_path / "served" / "cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar.CIFAR_MD5, "cifar10", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(cifar.CIFAR_URLS, "cifar10", archive.as_uri())
    return archive


def test_fetch_downloads_then_skips(served_archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = tmp_path / "data"
    dest = data_dir / "cifar" / "cifar-10-python.tar.gz"
    assert fetch_data.main(["cifar10", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"data: {dest}"
    assert dest.read_bytes() == served_archive.read_bytes()
    assert (dest.parent / "cifar-10-python.tar.gz.verified").is_file()

    served_archive.unlink()  # a second run must not download again
    assert fetch_data.main(["cifar10", "--data-dir", str(data_dir)]) == 0
    captured = capsys.readouterr()
    assert "already present and verified" in captured.err and captured.out.strip() == f"data: {dest}"


def test_fetch_failure_exits_2(served_archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    served_archive.unlink()  # as unreachable as the real site is here
    assert fetch_data.main(["cifar10", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download file://")
    assert f"put it at {tmp_path / 'data' / 'cifar' / 'cifar-10-python.tar.gz'}" in err
