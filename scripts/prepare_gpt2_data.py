"""`make data-gpt2`: tokenize a corpus into the uint16 cache the GPT-2 trainer reads.

    python -m scripts.prepare_gpt2_data --dataset custom --data-path FILE_OR_DIR
        [--data-dir data] [--text-field text] [--max-docs N] [--val-fraction F]
    python -m scripts.prepare_gpt2_data --dataset finewebedu|tinystories|openwebtext [--max-docs N]

Writes <data-dir>/prepared/<dataset>-gpt2/{train.bin,val.bin,manifest.json},
or reuses them when the source has not changed. The hub corpora need the
`datasets` package and network. The last line printed is `data: <dir>`; bad
input exits with status 2 and a message saying what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.data.corpora import DATASETS, prepare_corpus
from lib.cli import make_variable
from lib.errors import KpruneError


def _positive_int(text: str) -> int | None:
    if not text:
        return None  # an empty value means unset
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.prepare_gpt2_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Each flag defaults to its make variable (make data-gpt2 DATASET=... passes them that way).
    parser.add_argument("--dataset", default=make_variable("DATASET"), choices=DATASETS, help=f"which corpus: {', '.join(DATASETS)}")
    parser.add_argument("--data-path", default=make_variable("DATA_PATH", ""),
                        help="custom only: a .txt/.jsonl/.parquet file or a folder")
    parser.add_argument("--data-dir", default=make_variable("DATA_DIR", "data"),
                        help="the data directory (default: data)")
    parser.add_argument("--text-field", default=make_variable("TEXT_FIELD", "text"),
                        help="jsonl field / parquet column holding the text")
    parser.add_argument("--max-docs", type=_positive_int, default=make_variable("MAX_DOCS"),
                        help="read at most this many documents")
    parser.add_argument("--val-fraction", type=_fraction, default=0.005,
                        help="share of documents held out for validation (default: 0.005)")
    args = parser.parse_args(argv)
    if not args.dataset:
        print(f"usage: make data-gpt2 DATASET={'|'.join(DATASETS[1:] + DATASETS[:1])} [DATA_PATH=...]",
              file=sys.stderr)
        return 2
    try:
        out_dir = prepare_corpus(
            args.dataset,
            Path(args.data_dir),
            data_path=Path(args.data_path) if args.data_path else None,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            max_docs=args.max_docs,
        )
    except KpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"data: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
