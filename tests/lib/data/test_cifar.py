"""CIFAR readers, against small archives built in the official python-pickle layout."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

import lib.data.cifar as cifar
from lib.data.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar, num_classes
from lib.errors import DataError

PER_BATCH = 4
# Green channel (c=1), row y=5, column x=7 of a channel-major 3×32×32 row.
PROBE = (1, 5, 7)
PROBE_FLAT = 1 * 1024 + 5 * 32 + 7


def _images(marker: int, n: int) -> np.ndarray:
    """n flat images: pixel 0 carries `marker` + index, PROBE carries 200 + index."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, 0] = marker + np.arange(n)
    data[:, PROBE_FLAT] = 200 + np.arange(n)
    return data


def add_pickle(tar: tarfile.TarFile, name: str, obj: object) -> None:
    # Protocol 2, as the official (Python 2 cPickle) batches are.
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def build_cifar10(path: Path, label_offset: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(dir_info("cifar-10-batches-py"))
        add_pickle(tar, "cifar-10-batches-py/batches.meta",
             {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072})
        # Deliberately out of order: the reader must follow the names, not the archive.
        for batch in (3, 1, 5, 2, 4):
            add_pickle(tar, f"cifar-10-batches-py/data_batch_{batch}", {
                b"batch_label": f"training batch {batch} of 5".encode(),
                b"labels": [(batch + i + label_offset) % 10 for i in range(PER_BATCH)],
                b"data": _images(10 * batch, PER_BATCH),
                b"filenames": [f"img_{batch}_{i}.png".encode() for i in range(PER_BATCH)],
            })
        add_pickle(tar, "cifar-10-batches-py/test_batch", {
            b"batch_label": b"testing batch 1 of 1", b"labels": [9, 8, 7],
            b"data": _images(100, 3), b"filenames": [b"t0.png", b"t1.png", b"t2.png"],
        })
    return path


def build_cifar100(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(dir_info("cifar-100-python"))
        add_pickle(tar, "cifar-100-python/meta", {b"fine_label_names": [b"apple"] * 100,
                                            b"coarse_label_names": [b"fruit"] * 20})
        for split, n, fine in (("train", 5, [99, 0, 42, 57, 3]), ("test", 2, [11, 88])):
            add_pickle(tar, f"cifar-100-python/{split}", {
                b"batch_label": split.encode(), b"fine_labels": fine,
                b"coarse_labels": [f % 20 for f in fine], b"data": _images(50, n),
                b"filenames": [f"{split}{i}.png".encode() for i in range(n)],
            })
    return path


def dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar10_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    archive = build_cifar10(tmp_path / "cifar" / "cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar.CIFAR_MD5, "cifar10", _md5(archive))
    return tmp_path


def test_cifar10_train_is_the_five_batches_in_order(cifar10_dir: Path) -> None:
    images, labels = load_cifar(cifar10_dir, "cifar10", "train")
    assert images.shape == (5 * PER_BATCH, 3, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    expected_marker = [10 * b + i for b in range(1, 6) for i in range(PER_BATCH)]
    assert images[:, 0, 0, 0].tolist() == expected_marker
    assert labels.tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(PER_BATCH)]


def test_channel_major_layout(cifar10_dir: Path) -> None:
    images, _ = load_cifar(cifar10_dir, "cifar10", "test")
    c, y, x = PROBE
    assert images[:, c, y, x].tolist() == [200, 201, 202]
    # The transposed spot and other channels stay zero: the layout is [n, c, y, x].
    assert images[:, c, x, y].tolist() == [0, 0, 0]
    assert images[:, 0, y, x].tolist() == [0, 0, 0] and images[:, 2, y, x].tolist() == [0, 0, 0]


def test_cifar10_test_split(cifar10_dir: Path) -> None:
    images, labels = load_cifar(cifar10_dir, "cifar10", "test")
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [9, 8, 7]


def test_cifar100_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = build_cifar100(tmp_path / "cifar" / "cifar-100-python.tar.gz")
    monkeypatch.setitem(cifar.CIFAR_MD5, "cifar100", _md5(archive))
    images, labels = load_cifar(tmp_path, "cifar100", "train")
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [99, 0, 42, 57, 3]
    _, test_labels = load_cifar(tmp_path, "cifar100", "test")
    assert test_labels.tolist() == [11, 88]


def test_constants() -> None:
    assert num_classes("cifar10") == 10 and num_classes("cifar100") == 100
    for table in (CIFAR_MEAN, CIFAR_STD):
        assert set(table) == {"cifar10", "cifar100"} and all(len(v) == 3 for v in table.values())
    with pytest.raises(ValueError, match="unknown CIFAR dataset"):
        num_classes("cifar1000")


def test_missing_archive_names_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar100", "train")
    message = str(info.value)
    assert "make data-cifar100" in message
    assert str(tmp_path / "cifar" / "cifar-100-python.tar.gz") in message


def test_md5_mismatch_says_corrupt(tmp_path: Path) -> None:
    build_cifar10(tmp_path / "cifar" / "cifar-10-python.tar.gz")  # md5 is not the official one
    with pytest.raises(DataError, match=r"corrupt.*delete it and run `make data-cifar10`"):
        load_cifar(tmp_path, "cifar10", "train")
    images, _ = load_cifar(tmp_path, "cifar10", "test", verify=False)
    assert len(images) == 3


def test_unreadable_archive(tmp_path: Path) -> None:
    archive = tmp_path / "cifar" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="not a readable CIFAR python archive"):
        load_cifar(tmp_path, "cifar10", "test", verify=False)


def test_stamp_is_reused_and_invalidated(cifar10_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = cifar10_dir / "cifar" / "cifar-10-python.tar.gz"
    load_cifar(cifar10_dir, "cifar10", "test")
    assert (archive.parent / "cifar-10-python.tar.gz.verified").is_file()

    hashed: list[Path] = []
    real_md5 = cifar._file_md5
    monkeypatch.setattr(cifar, "_file_md5", lambda path: hashed.append(path) or real_md5(path))
    load_cifar(cifar10_dir, "cifar10", "test")
    assert hashed == []  # the stamp vouched for the unchanged file

    build_cifar10(archive, label_offset=1)  # same size class, new content and mtime
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="corrupt"):
        load_cifar(cifar10_dir, "cifar10", "test")
    assert hashed == [archive]
