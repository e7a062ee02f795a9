"""GPT-2 token caches for the larger corpora: local files or a Hugging Face hub data set.

`prepare_corpus` writes <data_dir>/prepared/<dataset>-gpt2/ holding train.bin
and val.bin (little-endian uint16 GPT-2 ids, every document followed by the
end-of-text token) and manifest.json, which is written last and is what
marks the cache complete. A cache whose manifest matches the source (file
hashes, or hub name and document cap) and whose .bin files still match the
sizes and hashes the manifest records is reused; anything else is rebuilt.
The trainer checks the same (`prepared_token_files`) and, since it cannot
rebuild a corpus, names the command that does. verified.json spares the hash
of files already checked (lib/data/tokens.py `check_token_files`).

Documents are split, not tokens: document i goes to validation when
i % every == 0 (every = round(1 / val_fraction), at least 2), so there is
always a validation document and no document straddles the two files. A
source with a single document is split at the last val_fraction of its tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lib.data.tokenizer import EOT_TOKEN, GPT2_RANKS_SHA256, gpt2_encoding
from lib.data.tokens import TOKEN_DTYPE, check_token_files, read_matching_manifest, split_into_chunks
from lib.results import fsync_dir, write_bytes_atomic
from lib.errors import DataError

FORMAT_VERSION = 1  # the manifest has recorded each .bin file's size and sha256 since version 1
CUSTOM = "custom"


@dataclass(frozen=True)
class HubSource:
    """A data set on the Hugging Face hub, read with `datasets.load_dataset`."""

    repo: str
    config: str | None
    split: str


HUB_DATASETS: dict[str, HubSource] = {
    "finewebedu": HubSource("HuggingFaceFW/fineweb-edu", "sample-10BT", "train"),
    "tinystories": HubSource("roneneldan/TinyStories", None, "train"),
    "openwebtext": HubSource("Skylion007/openwebtext", None, "train"),
}
DATASETS: tuple[str, ...] = (CUSTOM, *HUB_DATASETS)
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")

# Documents tokenized per encode_ordinary_batch call: enough to keep
# tiktoken's threads busy, small enough that a batch never holds much text.
_BATCH_DOCS = 512
_BATCH_CHARS = 16 * 1024 * 1024
_PROGRESS_EVERY_S = 10.0
_CUSTOM_HINT = "DATASET=custom DATA_PATH=<a local .txt, .jsonl or .parquet file, or a folder of them>"


# ---------------------------------------------------------------- sources

def _unreadable(path: Path, exc: OSError) -> DataError:
    return DataError(f"{path}: cannot read the file ({exc.strerror or exc}); check it exists and is readable")


def _describe_file(path: Path) -> dict[str, Any]:
    """Path, size and sha256 of a source file: what decides whether a cache is reusable."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def local_files(data_path: Path) -> list[Path]:
    """The supported files of `data_path`: the file itself, or a folder's, recursively, sorted."""
    if not data_path.exists():
        raise DataError(f"DATA_PATH not found: {data_path}; point it at a text, jsonl or parquet file or a folder")
    if data_path.is_file():
        if data_path.suffix not in SUPPORTED_SUFFIXES:
            raise DataError(
                f"{data_path}: unsupported file type {data_path.suffix or '(none)'!r}; "
                f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [data_path]
    # Hidden files and folders (.git, .ipynb_checkpoints, editor temp files) are not data.
    files = sorted(
        (p for p in data_path.rglob("*")
         if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
         and not any(part.startswith(".") for part in p.relative_to(data_path).parts)),
        key=lambda p: p.relative_to(data_path).as_posix(),
    )
    if not files:
        raise DataError(f"{data_path}: no {', '.join(SUPPORTED_SUFFIXES)} files in this folder")
    return files


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    """A .txt file is one document, whatever separators it contains."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """One document per non-blank line, taken from the `text_field` of its JSON object."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                # Many tools start a file with a byte-order mark; json.loads rejects it.
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 (bad byte at column {exc.start + 1}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}: not valid JSON ({exc}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: a JSON {type(record).__name__}, expected an object with a {text_field!r} field")
            if text_field not in record:
                raise DataError(
                    f"{where}: no {text_field!r} field (the line has {sorted(record)}); "
                    "fix the line or choose the field with TEXT_FIELD / --text-field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_field!r} is a {type(text).__name__}, expected a string")
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """One document per row, from the string column `text_field`."""
    try:
        import pyarrow.lib
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet files needs pyarrow, which is not installed; run "
            "`.venv/bin/python -m pip install pyarrow` (kprune leaves it out of requirements.txt "
            "on purpose), or convert the file to .jsonl"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise DataError(
                f"{path}: no column {text_field!r} (columns: {names}); "
                "choose the column with TEXT_FIELD / --text-field"
            )
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise DataError(f"{path}: row {row} of column {text_field!r} is {text!r}, expected a string")
                row += 1
                yield text
    except (OSError, ValueError, pyarrow.lib.ArrowException) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc}); check or re-export it") from None


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _local_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        yield from _READERS[path.suffix](path, text_field)


def _hub_unreachable(spec: HubSource, exc: Exception) -> DataError:
    return DataError(
        f"could not stream {spec.repo} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
        f"the network or the hub is probably unreachable. Without network, use {_CUSTOM_HINT}"
    )


def _hub_documents(name: str, spec: HubSource, text_field: str) -> Iterator[str]:
    """Open the hub data set now (so failures come before any file is touched), stream it later."""
    try:
        import datasets  # optional and heavy: only the hub corpora need it
    except ImportError:
        raise DataError(
            f"DATASET={name} needs the Hugging Face `datasets` package, which kprune does not "
            "install (it is left out of requirements.txt on purpose): run "
            f"`.venv/bin/python -m pip install datasets`, or use {_CUSTOM_HINT}"
        ) from None
    # datasets and huggingface_hub raise many unrelated types (requests and
    # fsspec errors, their own HTTP errors...), hence the broad excepts.
    try:
        rows = iter(datasets.load_dataset(spec.repo, name=spec.config, split=spec.split, streaming=True))
    except Exception as exc:
        raise _hub_unreachable(spec, exc) from None
    return _hub_texts(rows, spec, text_field)


def _hub_texts(rows: Iterator[Any], spec: HubSource, text_field: str) -> Iterator[str]:
    for index in itertools.count():
        try:
            row = next(rows)  # streaming fetches lazily: the network can fail here too
        except StopIteration:
            return
        except Exception as exc:
            raise _hub_unreachable(spec, exc) from None
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{spec.repo}: row {index} has no string field {text_field!r} (fields: {fields}); "
                "choose the field with TEXT_FIELD / --text-field"
            )
        yield text


# ---------------------------------------------------------------- tokenizing and writing

class _SplitWriter:
    """Appends uint16 tokens to a temp file next to the cache, hashing as it goes."""

    def __init__(self, out_dir: Path, name: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a cache is ordinary shared data
        self.tmp = Path(tmp)
        self.handle = os.fdopen(fd, "wb")
        self.sha256 = hashlib.sha256()
        self.tokens = 0
        self.documents = 0

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
        self.handle.write(data)
        self.sha256.update(data)
        self.tokens += len(tokens)

    def commit(self, path: Path) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, path)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_documents(documents: list[str]) -> list[np.ndarray]:
    """Each document's GPT-2 ids followed by EOT; long documents are cut for parallelism."""
    pieces = [split_into_chunks(text) for text in documents]
    encoded = gpt2_encoding().encode_ordinary_batch([p for doc in pieces for p in doc])
    out: list[np.ndarray] = []
    start = 0
    for doc in pieces:
        parts = encoded[start:start + len(doc)]
        start += len(doc)
        count = sum(len(p) for p in parts)
        ids = np.fromiter(itertools.chain(*parts, (EOT_TOKEN,)), dtype=TOKEN_DTYPE, count=count + 1)
        out.append(ids)
    return out


def _write_splits(documents: Iterable[str], out_dir: Path, every: int, val_fraction: float,
                  label: str) -> dict[str, Any]:
    """Tokenize into out_dir/{train,val}.bin; return counts and hashes for the manifest."""
    train, val = _SplitWriter(out_dir, "train"), _SplitWriter(out_dir, "val")
    writers = [train, val]
    try:
        index = 0
        last_report = time.monotonic()
        for batch in _batches(documents):
            for tokens in _tokenize_documents(batch):
                writer = val if index % every == 0 else train
                writer.write(tokens)
                writer.documents += 1
                index += 1
            if time.monotonic() - last_report > _PROGRESS_EVERY_S:
                last_report = time.monotonic()
                print(f"  {index:,} documents, {train.tokens + val.tokens:,} tokens", file=sys.stderr, flush=True)
        if index == 0:
            raise DataError(f"{label}: no documents (every source is empty); use a source with text")
        if index == 1:
            train.discard()  # empty: the lone document went to val
            train, val = _split_single_document(val, out_dir, val_fraction, label)
            writers = [train, val]
        (out_dir / "manifest.json").unlink(missing_ok=True)  # never vouch for a half-replaced pair
        train.commit(out_dir / "train.bin")
        val.commit(out_dir / "val.bin")
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    fsync_dir(out_dir)
    return {
        "documents": {"train": train.documents, "val": val.documents, "total": index},
        "tokens": {"train": train.tokens, "val": val.tokens, "total": train.tokens + val.tokens},
        "files": {
            "train.bin": {"bytes": train.tokens * TOKEN_DTYPE.itemsize, "sha256": train.sha256.hexdigest()},
            "val.bin": {"bytes": val.tokens * TOKEN_DTYPE.itemsize, "sha256": val.sha256.hexdigest()},
        },
    }


def _split_single_document(holder: _SplitWriter, out_dir: Path, val_fraction: float,
                           label: str) -> tuple[_SplitWriter, _SplitWriter]:
    """Re-split the one document (held in `holder`) at the tail of its tokens."""
    holder.handle.flush()
    tokens = np.fromfile(holder.tmp, dtype=TOKEN_DTYPE)[:-1]  # no EOT: nothing follows it
    holder.discard()
    n_val = int(len(tokens) * val_fraction)
    if n_val == 0 or n_val == len(tokens):
        raise DataError(
            f"{label}: a single document of {len(tokens)} tokens is too short to split with "
            f"val_fraction={val_fraction}; use more text or more documents"
        )
    train, val = _SplitWriter(out_dir, "train"), _SplitWriter(out_dir, "val")
    train.write(tokens[:-n_val])
    val.write(tokens[-n_val:])
    train.documents = val.documents = 1
    return train, val


# ---------------------------------------------------------------- the cache

def _reusable(out_dir: Path, expected: dict[str, Any]) -> bool:
    manifest = read_matching_manifest(out_dir / "manifest.json", expected)
    if manifest is None:
        return False
    problem = check_token_files(out_dir, manifest.get("files"))
    if problem:
        print(f"{problem}: preparing it again", file=sys.stderr)
        return False
    return True


def prepared_token_files(data_dir: Path, dataset: str) -> tuple[Path, Path]:
    """train.bin and val.bin of a corpus `make data-gpt2` prepared, checked against its manifest.

    The trainer cannot rebuild a corpus (it may live on the hub), so a cache
    that is missing, or whose files no longer match their manifest, is an
    error that says which command prepares it again.
    """
    out_dir = Path(data_dir) / "prepared" / f"{dataset}-gpt2"
    hint = " DATA_PATH=<your file or folder>" if dataset == CUSTOM else ""
    command = f"make data-gpt2 DATASET={dataset}{hint}"
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"{out_dir} holds no prepared {dataset} tokens: run `{command}` first (with DATA_DIR={data_dir})")
    manifest = read_matching_manifest(manifest_path, {"format_version": FORMAT_VERSION,
                                                      "tokenizer": {"encoding": "gpt2", "ranks_sha256": GPT2_RANKS_SHA256}})
    problem = (f"{manifest_path} is unreadable or was written for another format or tokenizer"
               if manifest is None else check_token_files(out_dir, manifest.get("files")))
    if problem:
        raise DataError(f"{problem}; prepare the corpus again with `{command}` (with DATA_DIR={data_dir})")
    return out_dir / "train.bin", out_dir / "val.bin"


def prepare_corpus(
    dataset: str,
    data_dir: Path,
    data_path: Path | None = None,
    text_field: str = "text",
    val_fraction: float = 0.005,
    max_docs: int | None = None,
) -> Path:
    """Build (or reuse) <data_dir>/prepared/<dataset>-gpt2/ and return that directory.

    `dataset` is "custom" (with `data_path`, a file or folder of .txt, .jsonl
    or .parquet) or a hub corpus in HUB_DATASETS; `max_docs` caps the documents read.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be positive, got {max_docs}")
    if dataset not in DATASETS:
        raise DataError(f"unknown DATASET {dataset!r}; choose one of {', '.join(DATASETS)}")
    every = max(2, round(1 / val_fraction))
    if dataset == CUSTOM:
        if data_path is None:
            raise DataError(
                "DATASET=custom needs DATA_PATH=<a local .txt, .jsonl or .parquet file, or a folder of them>"
            )
        files = local_files(Path(data_path))
        label = str(data_path)
        source: dict[str, Any] = {
            "kind": "local",
            "files": [_describe_file(p) for p in files],
        }
    else:
        if data_path is not None:
            raise DataError(f"DATA_PATH is only for DATASET=custom; DATASET={dataset} reads from the hub")
        spec = HUB_DATASETS[dataset]
        label = spec.repo
        source = {"kind": "hub", "repo": spec.repo, "config": spec.config, "split": spec.split}
    source["text_field"] = text_field
    expected = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "source": source,
        "max_docs": max_docs,
        "split": {
            "val_fraction": val_fraction,
            "every": every,
            "rule": "document i goes to val when i % every == 0; a lone document is split at "
                    "its last val_fraction of tokens",
        },
        "tokenizer": {"encoding": "gpt2", "ranks_sha256": GPT2_RANKS_SHA256},
        "eot_token": EOT_TOKEN,
        "dtype": "uint16 little-endian",
    }
    out_dir = Path(data_dir) / "prepared" / f"{dataset}-gpt2"
    if _reusable(out_dir, expected):
        return out_dir

    documents = (_local_documents(files, text_field) if dataset == CUSTOM
                 else _hub_documents(dataset, HUB_DATASETS[dataset], text_field))
    # Empty documents would only add a lone end-of-text token; they do not count towards max_docs.
    documents = (text for text in documents if text)
    if max_docs is not None:
        documents = itertools.islice(documents, max_docs)
    print(f"preparing {dataset} from {label} ...", file=sys.stderr, flush=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stats = _write_splits(documents, out_dir, every, val_fraction, label)
        manifest = {**expected, **stats}
        write_bytes_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        check_token_files(out_dir, manifest["files"])  # stamps the new files as verified
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot write the token cache ({exc}); check the directory is writable") from None
    tokens = stats["tokens"]
    print(f"{stats['documents']['total']:,} documents: {tokens['train']:,} train + {tokens['val']:,} val tokens",
          file=sys.stderr)
    return out_dir
