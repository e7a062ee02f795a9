"""The uint16 token cache and the batch sampler."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lib.data.tokens as tokens_module
from lib.data.tokenizer import gpt2_encoding
from lib.data.tokens import TokenBatches, prepare_tokens, split_into_chunks
from lib.errors import DataError

# Blank lines with trailing spaces, runs of newlines, CRLF and indentation:
# the places where chunked tokenization could disagree with whole-text.
PARAGRAPH = (
    "KING.\nWhat say you, lords?  \n\n  \n\nFirst Lord.\n\n\nMy liege, we are\tready.\r\n\r\n"
    "'Tis so; we'll go.\n \n123 soldiers -- and 4,000 more!\n\n"
)
TEXT = "".join(f"Scene {i}.\n{PARAGRAPH}" for i in range(60))
CPU = torch.device("cpu")


def test_chunks_tokenize_like_the_whole_text() -> None:
    chunks = split_into_chunks(TEXT, chunk_chars=50)
    assert len(chunks) > 20 and "".join(chunks) == TEXT
    encoding = gpt2_encoding()
    from_chunks = [t for chunk in chunks for t in encoding.encode_ordinary(chunk)]
    assert from_chunks == encoding.encode_ordinary(TEXT)


def test_prepare_writes_uint16_split(tmp_path: Path) -> None:
    source = tmp_path / "play.txt"
    source.write_text(TEXT, encoding="utf-8")
    prepared = prepare_tokens(source, tmp_path / "cache", val_fraction=0.25)

    train = np.fromfile(prepared.train_path, dtype="<u2")
    val = np.fromfile(prepared.val_path, dtype="<u2")
    expected = gpt2_encoding().encode_ordinary(TEXT)
    counts = prepared.meta["tokens"]
    assert counts == {"train": len(train), "val": len(val), "total": len(expected)}
    assert len(train) + len(val) == len(expected)
    assert len(val) == int(len(expected) * 0.25)
    # The validation split is the tail of the stream, train the head.
    assert train.tolist() + val.tolist() == expected
    assert gpt2_encoding().decode(train.tolist() + val.tolist()) == TEXT

    on_disk = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert on_disk == prepared.meta
    assert on_disk["val_fraction"] == 0.25 and on_disk["source_bytes"] == source.stat().st_size


def test_second_call_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "play.txt"
    source.write_text(TEXT, encoding="utf-8")
    first = prepare_tokens(source, tmp_path / "cache")
    mtime = first.train_path.stat().st_mtime_ns

    def fail(text: str) -> np.ndarray:
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(tokens_module, "_tokenize", fail)
    second = prepare_tokens(source, tmp_path / "cache")
    assert second == first
    assert second.train_path.stat().st_mtime_ns == mtime


def test_changed_parameters_or_source_rebuild(tmp_path: Path) -> None:
    source = tmp_path / "play.txt"
    source.write_text(TEXT, encoding="utf-8")
    first = prepare_tokens(source, tmp_path / "cache")

    other_split = prepare_tokens(source, tmp_path / "cache", val_fraction=0.5)
    assert other_split.meta["tokens"]["val"] == first.meta["tokens"]["total"] // 2

    source.write_text(TEXT + "Exeunt.\n", encoding="utf-8")
    rebuilt = prepare_tokens(source, tmp_path / "cache", val_fraction=0.5)
    assert rebuilt.meta["source_sha256"] != first.meta["source_sha256"]
    val = np.fromfile(rebuilt.val_path, dtype="<u2").tolist()
    assert gpt2_encoding().decode(val).endswith("Exeunt.\n")


def test_half_written_cache_is_rebuilt(tmp_path: Path) -> None:
    source = tmp_path / "play.txt"
    source.write_text(TEXT, encoding="utf-8")
    first = prepare_tokens(source, tmp_path / "cache")
    first.train_path.write_bytes(first.train_path.read_bytes()[:-8])  # lost the tail
    again = prepare_tokens(source, tmp_path / "cache")
    assert again.train_path.stat().st_size == 2 * first.meta["tokens"]["train"]


def test_prints_one_line_when_building(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "play.txt"
    source.write_text(TEXT, encoding="utf-8")
    prepared = prepare_tokens(source, tmp_path / "cache")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "preparing tokens from" in err
    assert f"{prepared.meta['tokens']['train']:,}" in err
    prepare_tokens(source, tmp_path / "cache")
    assert capsys.readouterr().err == ""


def test_gzip_source(tmp_path: Path) -> None:
    plain, packed = tmp_path / "play.txt", tmp_path / "play.txt.gz"
    plain.write_text(TEXT, encoding="utf-8")
    packed.write_bytes(gzip.compress(TEXT.encode("utf-8")))
    a = prepare_tokens(plain, tmp_path / "a")
    b = prepare_tokens(packed, tmp_path / "b")
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.val_path.read_bytes() == b.val_path.read_bytes()


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.txt"):
        prepare_tokens(tmp_path / "absent.txt", tmp_path / "cache")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match=r"latin1\.txt.*UTF-8"):
        prepare_tokens(latin1, tmp_path / "cache")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi", encoding="utf-8")
    with pytest.raises(DataError, match=r"tiny\.txt.*too few"):
        prepare_tokens(tiny, tmp_path / "cache")
    assert not (tmp_path / "cache" / "meta.json").exists()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype="<u2").tofile(path)
    return path


def test_batches_shapes_and_shift(token_file: Path) -> None:
    batches = TokenBatches(token_file, block_size=16)
    assert len(batches) == 1000
    x, y = batches.sample(8, torch.Generator().manual_seed(0), CPU)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64 and x.device == CPU
    # Tokens are 0..999 in order, so each row must be consecutive ids.
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))
    assert torch.equal(y, x + 1)
    assert int(y.max()) <= 999


def test_batches_are_reproducible(token_file: Path) -> None:
    batches = TokenBatches(token_file, block_size=16)
    x1, y1 = batches.sample(4, torch.Generator().manual_seed(123), CPU)
    x2, y2 = batches.sample(4, torch.Generator().manual_seed(123), CPU)
    x3, _ = batches.sample(4, torch.Generator().manual_seed(124), CPU)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_batches_reach_the_last_token(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    np.arange(6, dtype="<u2").tofile(path)
    batches = TokenBatches(path, block_size=4)
    _, y = batches.sample(200, torch.Generator().manual_seed(0), CPU)
    assert {int(row[0]) for row in y} == {1, 2}  # both possible offsets drawn
    assert int(y.max()) == 5


def test_block_size_too_large(token_file: Path) -> None:
    with pytest.raises(DataError, match=r"block_size 999 .*1000 tokens"):
        TokenBatches(token_file, block_size=999)
    TokenBatches(token_file, block_size=998)


def test_missing_or_odd_token_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.bin"):
        TokenBatches(tmp_path / "gone.bin", block_size=4)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 101)
    with pytest.raises(DataError, match=r"odd\.bin.*uint16"):
        TokenBatches(odd, block_size=4)


# ------------------------------------------------------------------ the cache is checked, not trusted by size

def _shakespeare_like(tmp_path: Path) -> Path:
    source = tmp_path / "play.txt"
    source.write_text(TEXT, encoding="utf-8")
    return source


def test_same_size_other_contents_is_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _shakespeare_like(tmp_path)
    first = prepare_tokens(source, tmp_path / "cache")
    good = first.train_path.read_bytes()
    first.train_path.write_bytes(good[::-1])  # same size, other tokens
    capsys.readouterr()
    again = prepare_tokens(source, tmp_path / "cache")
    assert again.train_path.read_bytes() == good
    assert f"{first.train_path} does not hold the tokens its manifest records" in capsys.readouterr().err


def _token_dir(directory: Path, train: list[int]) -> dict:
    """train.bin and val.bin in `directory`, and a manifest entry that vouches for them."""
    recorded = {}
    for name, ids in (("train.bin", train), ("val.bin", [5, 6])):
        data = np.array(ids, dtype="<u2").tobytes()
        (directory / name).write_bytes(data)
        recorded[name] = tokens_module.describe_tokens(data)
    return recorded


def test_out_of_range_ids_are_named(tmp_path: Path) -> None:
    problem = tokens_module.check_token_files(tmp_path, _token_dir(tmp_path, [1, 50256, 60000, 7]))
    assert problem == f"{tmp_path / 'train.bin'} holds token id 60000, outside the GPT-2 vocabulary (ids 0-50256)"
    assert tokens_module.check_token_files(tmp_path, _token_dir(tmp_path, [1, 50256, 50256, 7])) is None


def test_a_manifest_must_vouch_for_both_files(tmp_path: Path) -> None:
    recorded = _token_dir(tmp_path, [1, 2, 3])
    del recorded["val.bin"]
    assert "does not record the token files' sizes and hashes" in tokens_module.check_token_files(tmp_path, recorded)


def test_a_verified_file_is_hashed_again_only_when_it_changes(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    source = _shakespeare_like(tmp_path)
    first = prepare_tokens(source, tmp_path / "cache")
    scanned = []
    real_scan = tokens_module._scan
    monkeypatch.setattr(tokens_module, "_scan", lambda path: scanned.append(path.name) or real_scan(path))
    prepare_tokens(source, tmp_path / "cache")
    assert scanned == []  # the stamp written when the cache was built still matches
    stat = first.val_path.stat()
    os.utime(first.val_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched, not changed
    assert prepare_tokens(source, tmp_path / "cache") == first
    assert scanned == ["val.bin"]
