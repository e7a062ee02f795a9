"""GPT-2 corpus caches: local .txt/.jsonl/.parquet sources and a faked hub `datasets`."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lib.data.corpora as corpora
from lib.data.corpora import prepare_corpus
from lib.data.tokenizer import EOT_TOKEN, GPT2_RANKS_SHA256, gpt2_encoding
from lib.errors import DataError

DOCS = [f"Story {i}: the cat sat on mat number {i}.\n\nThe end." for i in range(9)]


def _ids(text: str) -> list[int]:
    return gpt2_encoding().encode_ordinary(text)


def _stream(docs: list[str]) -> list[int]:
    return [t for doc in docs for t in (*_ids(doc), EOT_TOKEN)]


def _read(out_dir: Path) -> tuple[list[int], list[int], dict[str, Any]]:
    train = np.fromfile(out_dir / "train.bin", dtype="<u2").tolist()
    val = np.fromfile(out_dir / "val.bin", dtype="<u2").tolist()
    return train, val, json.loads((out_dir / "manifest.json").read_text())


def _jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def test_jsonl_documents_split_every_nth(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", DOCS, field="body")
    out = prepare_corpus("custom", tmp_path / "data", source, text_field="body", val_fraction=0.25)
    assert out == tmp_path / "data" / "prepared" / "custom-gpt2"
    train, val, manifest = _read(out)
    # every = 4: documents 0, 4 and 8 are validation; each document ends with EOT.
    assert val == _stream([DOCS[0], DOCS[4], DOCS[8]])
    assert train == _stream([d for i, d in enumerate(DOCS) if i % 4])
    assert manifest["documents"] == {"train": 6, "val": 3, "total": 9}
    assert manifest["split"]["every"] == 4 and manifest["source"]["text_field"] == "body"


def test_manifest_hashes_match_the_files(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", DOCS)
    out = prepare_corpus("custom", tmp_path, source, val_fraction=0.25)
    train, val, manifest = _read(out)
    for name in ("train.bin", "val.bin"):
        data = (out / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["tokens"] == {"train": len(train), "val": len(val), "total": len(train) + len(val)}
    assert manifest["source"]["files"] == [{
        "path": str(source.resolve()), "bytes": source.stat().st_size,
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }]
    assert manifest["tokenizer"]["ranks_sha256"] == GPT2_RANKS_SHA256
    assert manifest["format_version"] == corpora.FORMAT_VERSION and manifest["eot_token"] == EOT_TOKEN
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_single_txt_is_split_at_the_tail(tmp_path: Path) -> None:
    text = "\f".join(DOCS)  # a form feed does not make a .txt several documents
    source = tmp_path / "book.txt"
    source.write_text(text, encoding="utf-8")
    train, val, manifest = _read(prepare_corpus("custom", tmp_path, source, val_fraction=0.1))
    tokens = _ids(text)
    n_val = int(len(tokens) * 0.1)
    assert train == tokens[:-n_val] and val == tokens[-n_val:]
    assert manifest["documents"]["total"] == 1
    assert sorted(p.name for p in (tmp_path / "prepared" / "custom-gpt2").iterdir()) == [
        "manifest.json", "train.bin", "val.bin", "verified.json"]  # no temp files left behind


def test_folder_mixes_files_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    _jsonl(folder / "b" / "more.jsonl", DOCS[1:4])
    (folder / "c.txt").write_text(DOCS[4], encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    (folder / ".hidden.txt").write_text("ignored too", encoding="utf-8")
    train, val, manifest = _read(prepare_corpus("custom", tmp_path / "data", folder, val_fraction=0.5))
    assert val == _stream([DOCS[0], DOCS[2], DOCS[4]]) and train == _stream([DOCS[1], DOCS[3]])
    assert [Path(f["path"]).name for f in manifest["source"]["files"]] == ["a.txt", "more.jsonl", "c.txt"]


def test_max_docs_caps_the_documents(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", DOCS)
    train, val, manifest = _read(prepare_corpus("custom", tmp_path, source, val_fraction=0.5, max_docs=3))
    assert val + train == _stream([DOCS[0], DOCS[2]]) + _stream([DOCS[1]])
    assert manifest["max_docs"] == 3


def test_reuse_and_rebuild_on_source_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", DOCS)
    out = prepare_corpus("custom", tmp_path, source)
    before = (out / "manifest.json").stat().st_mtime_ns

    def no_tokenizing(docs: list[str]) -> None:
        raise AssertionError("a matching cache must be reused")

    with monkeypatch.context() as patch:
        patch.setattr(corpora, "_tokenize_documents", no_tokenizing)
        assert prepare_corpus("custom", tmp_path, source) == out
    assert (out / "manifest.json").stat().st_mtime_ns == before

    _jsonl(source, DOCS[:3])
    train, val, manifest = _read(prepare_corpus("custom", tmp_path, source))
    assert val + train == _stream([DOCS[0]]) + _stream(DOCS[1:3])
    assert manifest["source"]["files"][0]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_jsonl_line_without_the_field(tmp_path: Path) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "fine"}\n\n{"title": "x", "body": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare_corpus("custom", tmp_path, source)
    message = str(info.value)
    assert f"{source}:3" in message and "'text'" in message and "['body', 'title']" in message
    assert list((tmp_path / "prepared" / "custom-gpt2").iterdir()) == []  # temp files removed, no manifest


def test_bad_custom_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs DATA_PATH"):
        prepare_corpus("custom", tmp_path)
    with pytest.raises(DataError, match="DATA_PATH not found"):
        prepare_corpus("custom", tmp_path, tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        prepare_corpus("custom", tmp_path, tmp_path / "x.csv")
    with pytest.raises(DataError, match="unknown DATASET 'wiki'"):
        prepare_corpus("wiki", tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_corpus("custom", tmp_path, tmp_path / "bad.jsonl")


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pyarrow is not in requirements.txt (make data-gpt2 installs it): the message is what most users see.
    for name in ("pyarrow", "pyarrow.lib", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import pyarrow...` fail
    source = tmp_path / "docs.parquet"
    source.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"needs pyarrow.*pip install pyarrow"):
        prepare_corpus("custom", tmp_path, source)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, rows: list[dict], fail: Exception | None = None) -> list[dict]:
    calls: list[dict] = []

    def load_dataset(path: str, name: str | None = None, split: str | None = None, streaming: bool = False):
        calls.append({"path": path, "name": name, "split": split, "streaming": streaming})
        if fail is not None:
            raise fail
        return iter(rows)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_corpus_through_a_fake_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, [{"text": d, "url": "u"} for d in DOCS])
    out = prepare_corpus("finewebedu", tmp_path, val_fraction=0.25, max_docs=5)
    assert out == tmp_path / "prepared" / "finewebedu-gpt2"
    assert calls == [{"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train", "streaming": True}]
    train, val, manifest = _read(out)
    assert val == _stream([DOCS[0], DOCS[4]]) and train == _stream(DOCS[1:4])
    assert manifest["source"] == {"kind": "hub", "repo": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT",
                                  "split": "train", "text_field": "text"}
    # The cache is reused without touching the hub again.
    prepare_corpus("finewebedu", tmp_path, val_fraction=0.25, max_docs=5)
    assert len(calls) == 1


def test_hub_unreachable_suggests_custom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, [], fail=ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub"))
    with pytest.raises(DataError, match=r"roneneldan/TinyStories.*unreachable.*DATASET=custom DATA_PATH="):
        prepare_corpus("tinystories", tmp_path)
    assert not (tmp_path / "prepared").exists()  # failed before touching the cache
    with pytest.raises(DataError, match="DATA_PATH is only for DATASET=custom"):
        prepare_corpus("tinystories", tmp_path, tmp_path / "x.txt")


def test_hub_without_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"needs the Hugging Face `datasets` package.*pip install datasets"):
        prepare_corpus("openwebtext", tmp_path)
    assert not (tmp_path / "prepared").exists()


# ------------------------------------------------------------------ what the trainer reads is what was prepared

def _prepared(tmp_path: Path) -> Path:
    docs = [f"Document {i}: some words to tokenize, and a few more." for i in range(12)]
    return prepare_corpus("custom", tmp_path, _jsonl(tmp_path / "docs.jsonl", docs), val_fraction=0.25)


def test_trainer_refuses_a_corpus_file_changed_after_preparing(tmp_path: Path) -> None:
    out_dir = _prepared(tmp_path)
    assert corpora.prepared_token_files(tmp_path, "custom") == (out_dir / "train.bin", out_dir / "val.bin")
    val = out_dir / "val.bin"
    val.write_bytes(b"\xff" * val.stat().st_size)  # same size; ids 65535 would index past the embedding
    with pytest.raises(DataError) as info:
        corpora.prepared_token_files(tmp_path, "custom")
    assert str(info.value) == (f"{val} does not hold the tokens its manifest records (sha256 differs); prepare the "
                               "corpus again with `make data-gpt2 DATASET=custom DATA_PATH=<your file or folder>` "
                               f"(with DATA_DIR={tmp_path})")


def test_make_data_gpt2_rebuilds_a_changed_corpus_file(tmp_path: Path) -> None:
    out_dir = _prepared(tmp_path)
    train = out_dir / "train.bin"
    good = train.read_bytes()
    train.write_bytes(good[::-1])
    _prepared(tmp_path)
    assert train.read_bytes() == good
    corpora.prepared_token_files(tmp_path, "custom")


def test_trainer_names_the_command_for_a_missing_or_foreign_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds no prepared finewebedu tokens: run `make data-gpt2 "
                                        r"DATASET=finewebedu` first"):
        corpora.prepared_token_files(tmp_path, "finewebedu")
    out_dir = _prepared(tmp_path)
    (out_dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json is unreadable or was written for another format"):
        corpora.prepared_token_files(tmp_path, "custom")
