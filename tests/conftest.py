"""Shared fixtures: a data directory with every dataset a defconfig may ask for.

The bundled data (MNIST, Shakespeare, GPT-2 ranks) is linked in; CIFAR-10/100
archives are built small but in the official format (their md5 differs from
the real one, so a verification stamp is written for them, the same stamp
`make data-cifar10` leaves after checking a real download); and prepared GPT-2
token folders stand in for the hub corpora.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Before torch loads (below): its OpenMP threads then sleep when they wait instead of spinning. The suite runs
# on two workers, each often with a 2-thread trainer, on two cores; spinning threads burn the cores the other
# worker's threads need (a tiny GPT-2 run took 3.5 times the CPU time beside another run). Every trainer
# the tests start inherits it; it changes no result, only how idle threads wait. A value set outside wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402 (after the wait policy, like the imports below)

import lib.data.cifar as cifar
from lib.data.corpora import prepare_corpus
from lib.kconfig import REPO_ROOT
from tests.fast_selection import pytest_collection_modifyitems, pytest_sessionfinish  # noqa: F401 (hooks)
from tests.lib.data.test_cifar import build_cifar10, build_cifar100

HUB_CORPORA = ("finewebedu", "tinystories", "openwebtext")


def _stamp_as_verified(archive: Path, dataset: str) -> None:
    stat = archive.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": cifar.CIFAR_MD5[dataset]}
    (archive.parent / (archive.name + ".verified")).write_text(json.dumps(key) + "\n")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name in ("mnist", "shakespeare", "gpt2"):
        os.symlink(REPO_ROOT / "data" / name, root / name)
    for dataset, build in (("cifar10", build_cifar10), ("cifar100", build_cifar100)):
        archive = build(cifar.archive_path(root, dataset))
        _stamp_as_verified(archive, dataset)
    text = root / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20
                                for i in range(40)), encoding="utf-8")
    custom = prepare_corpus("custom", root, data_path=text, val_fraction=0.1)
    for name in HUB_CORPORA:  # stand-ins for what make data-gpt2 DATASET=<name> prepares
        shutil.copytree(custom, root / "prepared" / f"{name}-gpt2")
    return root
