"""`make data-cifar10` / `make data-cifar100`: download a CIFAR archive, checked by md5.

    python -m scripts.fetch_data cifar10|cifar100 [--data-dir data]

Fetches the official python archive into <data-dir>/cifar/ (resuming a
partial download), or does nothing when a verified copy is already there.
The last line printed is `data: <path>`; bad input or no network exits with
status 2 and a message saying what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.data.cifar import ARCHIVES, CIFAR_MD5, CIFAR_URLS, archive_path, verify_archive
from lib.data.download import download
from lib.cli import make_variable
from lib.errors import KpruneError


def fetch_cifar(data_dir: Path, dataset: str) -> Path:
    """Return the verified archive path, downloading it first if it is missing."""
    path = archive_path(data_dir, dataset)
    if path.is_file():
        # A corrupt copy raises here, with advice to delete it: never overwrite silently.
        verify_archive(path, dataset)
        print(f"{path.name}: already present and verified", file=sys.stderr)
        return path
    download(CIFAR_URLS[dataset], path, md5=CIFAR_MD5[dataset])
    verify_archive(path, dataset)  # writes the stamp so the first training run skips the md5
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.fetch_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(ARCHIVES), help="which archive to fetch")
    parser.add_argument("--data-dir", default=make_variable("DATA_DIR", "data"),
                        help="the data directory (make's DATA_DIR=; default: data)")
    args = parser.parse_args(argv)
    try:
        path = fetch_cifar(Path(args.data_dir), args.dataset)
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"data: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
