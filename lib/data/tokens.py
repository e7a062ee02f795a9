"""The uint16 token cache and the random batch sampler used by the GPT-2 trainer.

A prepared cache is a directory holding train.bin and val.bin (raw
little-endian uint16 token ids) and meta.json, which is written last and
is what marks the cache as complete and valid for a given source. The
manifest records each file's size and sha256; a cache is used only when its
files still hold exactly that (and only GPT-2 ids), checked by
`check_token_files` (the same check serves the corpora of lib/data/corpora.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.data.tokenizer import EOT_TOKEN, GPT2_RANKS_SHA256, gpt2_encoding
from lib.errors import DataError
from lib.results import write_bytes_atomic

FORMAT_VERSION = 2  # 2: the manifest records each .bin file's sha256
TOKEN_DTYPE = np.dtype("<u2")
GPT2_VOCAB_SIZE = EOT_TOKEN + 1  # end-of-text is the last GPT-2 id
VERIFIED_STAMP = "verified.json"
TOKEN_FILES = ("train.bin", "val.bin")  # the files of every token cache

# Aim for chunks of about this many characters when tokenizing in parallel.
_CHUNK_CHARS = 64 * 1024

# A safe split point: the final "\n" of a blank line, followed directly by a
# printable ASCII character. The GPT-2 pre-tokenizer regex only looks ahead
# (never behind), and at such a point it always starts a new piece with that
# lone "\n" while the whitespace before it forms a piece that ends exactly
# there, with or without the text that follows. So tokenizing the chunks
# separately gives exactly the tokens of the whole text.
_SPLIT_POINT = re.compile(r"\n[ \t\r]*(\n)(?=[!-~])")


@dataclass(frozen=True)
class PreparedTokens:
    """Where a prepared token cache lives, and its metadata."""

    train_path: Path
    val_path: Path
    meta: dict[str, Any]


def split_into_chunks(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut `text` at blank-line boundaries into pieces of about `chunk_chars`.

    Encoding the pieces one by one gives the same tokens as encoding `text`.
    """
    chunks: list[str] = []
    start = 0
    while len(text) - start > chunk_chars:
        match = _SPLIT_POINT.search(text, start + chunk_chars)
        if match is None:
            break
        cut = match.start(1)
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def _tokenize(text: str) -> np.ndarray:
    """Encode `text` (no special tokens) into a uint16 array."""
    encoding = gpt2_encoding()
    pieces = encoding.encode_ordinary_batch(split_into_chunks(text))
    tokens = np.fromiter(
        (t for piece in pieces for t in piece),
        dtype=TOKEN_DTYPE,
        count=sum(len(piece) for piece in pieces),
    )
    # GPT-2 ids go up to 50256, which fits uint16; this keeps it that way.
    assert encoding.n_vocab <= np.iinfo(TOKEN_DTYPE).max + 1
    return tokens


def _read_source(source: Path) -> tuple[bytes, str]:
    """Return the file's raw bytes and its decoded UTF-8 text (.txt or .txt.gz)."""
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"text source not found: {source}; check the path in the configuration"
        ) from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read text source ({exc.strerror})") from None
    data = raw
    if source.suffix == ".gz":
        try:
            data = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(
                f"{source}: corrupt or truncated gzip data ({exc}); restore the file or "
                "point at an uncompressed .txt"
            ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{source}: not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8"
        ) from None
    return raw, text


def read_matching_manifest(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON object in `path` if it has every key/value of `expected`; None if not, or unreadable."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in expected.items()):
        return None
    return manifest


def describe_tokens(data: bytes) -> dict[str, Any]:
    """What a manifest records about one token file: its size and sha256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _scan(path: Path) -> tuple[str, int]:
    """The sha256 of a token file and its largest id (-1 when empty), in one read."""
    digest, top = hashlib.sha256(), -1
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):  # an even size: blocks hold whole tokens
            digest.update(block)
            if len(block) >= TOKEN_DTYPE.itemsize:
                top = max(top, int(np.frombuffer(block, TOKEN_DTYPE, len(block) // TOKEN_DTYPE.itemsize).max()))
    return digest.hexdigest(), top


def check_token_files(directory: Path, recorded: Any) -> str | None:
    """Why the token files in `directory` are not what the manifest's `recorded` says; None if they are.

    `recorded` maps train.bin and val.bin to {"bytes": n, "sha256": hex}. Each
    file must have that size and hash and hold GPT-2 ids only. Hashing a large corpus
    takes a while, so a file that passed is stamped in verified.json with its
    size, mtime and inode, and not hashed again until one of them changes.
    """
    directory = Path(directory)
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(TOKEN_FILES) or not all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for r in recorded.values()):
        return f"{directory}: the manifest does not record the token files' sizes and hashes"
    stamp_path = directory / VERIFIED_STAMP
    stamp = read_matching_manifest(stamp_path, {}) or {}
    passed = {}
    for name, want in recorded.items():
        path = directory / name
        try:
            stat = path.stat()
        except OSError:
            return f"{path} is missing"
        if stat.st_size != want["bytes"]:
            return f"{path} has {stat.st_size:,} bytes where its manifest records {want['bytes']:,}"
        key = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "sha256": want["sha256"]}
        if stamp.get(name) != key:
            try:
                sha256, top = _scan(path)
            except OSError as exc:
                return f"{path} cannot be read ({exc.strerror or exc})"
            if sha256 != want["sha256"]:
                return f"{path} does not hold the tokens its manifest records (sha256 differs)"
            if top >= GPT2_VOCAB_SIZE:
                return f"{path} holds token id {top}, outside the GPT-2 vocabulary (ids 0-{GPT2_VOCAB_SIZE - 1})"
        passed[name] = key
    if passed != stamp:
        try:
            write_bytes_atomic(stamp_path, (json.dumps(passed, indent=2) + "\n").encode("utf-8"))
        except OSError:
            pass  # a read-only cache only costs a hash next time
    return None


def _cache_is_valid(meta_path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """Return the stored meta if the cache matches `expected` and its files match the meta, else None."""
    meta = read_matching_manifest(meta_path, expected)
    if meta is None:
        return None
    problem = check_token_files(meta_path.parent, meta.get("files"))
    if problem:
        print(f"{problem}: preparing the token cache again", file=sys.stderr)
        return None
    return meta


def prepare_tokens(source: Path, out_dir: Path, val_fraction: float = 0.1) -> PreparedTokens:
    """Tokenize `source` into out_dir/{train,val}.bin, or reuse a matching cache.

    The last `val_fraction` of the token stream is the validation split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    source = Path(source)
    out_dir = Path(out_dir)
    raw, text = _read_source(source)
    expected = {
        "format_version": FORMAT_VERSION,
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "tokenizer_sha256": GPT2_RANKS_SHA256,
        "val_fraction": val_fraction,
    }
    train_path, val_path = out_dir / "train.bin", out_dir / "val.bin"
    meta_path = out_dir / "meta.json"
    meta = _cache_is_valid(meta_path, expected)
    if meta is not None:
        return PreparedTokens(train_path, val_path, meta)

    print(f"preparing tokens from {source} ...", end=" ", file=sys.stderr, flush=True)
    tokens = _tokenize(text)
    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    if n_val == 0 or n_train == 0:
        print("failed", file=sys.stderr)
        raise DataError(
            f"{source}: only {len(tokens)} tokens, too few to split with val_fraction="
            f"{val_fraction}; use a longer text"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Drop the old meta first: if we die between writing the two .bin
        # files, no meta.json may vouch for a mix of old and new data.
        meta_path.unlink(missing_ok=True)
        train_bytes, val_bytes = tokens[:n_train].tobytes(), tokens[n_train:].tobytes()
        write_bytes_atomic(train_path, train_bytes)
        write_bytes_atomic(val_path, val_bytes)
        meta = {
            **expected,
            "source": str(source.resolve()),
            "source_bytes": len(raw),
            "tokens": {"train": n_train, "val": n_val, "total": len(tokens)},
            "files": {"train.bin": describe_tokens(train_bytes), "val.bin": describe_tokens(val_bytes)},
        }
        write_bytes_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        check_token_files(out_dir, meta["files"])  # stamps the new files as verified
    except OSError as exc:
        print("failed", file=sys.stderr)
        raise DataError(
            f"{out_dir}: cannot write the token cache ({exc}); check the directory is writable"
        ) from None
    print(f"{n_train:,} train + {n_val:,} val tokens", file=sys.stderr)
    return PreparedTokens(train_path, val_path, meta)


class TokenBatches:
    """Random (input, target) blocks drawn from a memory-mapped token file."""

    def __init__(self, path: Path, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.path = Path(path)
        self.block_size = block_size
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise DataError(
                f"token file not found: {self.path}; run the data preparation again"
            ) from None
        if size % TOKEN_DTYPE.itemsize:
            raise DataError(
                f"{self.path}: {size} bytes is not a whole number of uint16 tokens; "
                "delete the cache directory so it is prepared again"
            )
        n_tokens = size // TOKEN_DTYPE.itemsize
        if n_tokens <= block_size + 1:
            raise DataError(
                f"{self.path}: block_size {block_size} is too large for the data, which has "
                f"only {n_tokens} tokens (need more than block_size + 1 = {block_size + 1}); "
                "lower block_size or use more data"
            )
        # Memory-mapped so large corpora cost no RAM up front.
        self._tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")

    def __len__(self) -> int:
        return len(self._tokens)

    def sample(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `batch_size` random blocks: x = tokens[i:i+T], y = tokens[i+1:i+1+T]."""
        block = self.block_size
        starts = torch.randint(0, len(self._tokens) - block, (batch_size,), generator=generator)
        # One gather of T+1 tokens per row; x and y are its two overlapping views.
        index = starts.numpy()[:, None] + np.arange(block + 1)
        rows = torch.from_numpy(self._tokens[index].astype(np.int64))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if device.type == "cuda":
            # Pinned host memory lets the copy overlap with GPU work.
            x = x.pin_memory().to(device, non_blocking=True)
            y = y.pin_memory().to(device, non_blocking=True)
            return x, y
        return x.to(device), y.to(device)
