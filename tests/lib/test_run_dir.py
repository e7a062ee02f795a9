"""Run directories: a run never deletes, overwrites or shares a directory it cannot prove is its own."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.cli import build_parser
from lib.errors import KpruneError
from lib.kconfig import REPO_ROOT
from lib.matrix.runner import run_status
from lib.results import write_bytes_atomic
from lib.run_dir import RunLock, claim_run_dir, newest_interrupted, set_aside
from lib.settings import settings_from_namespace, validate
from lib.stop import Diverged
from lib.train_loop import Task, run

BAD_NAMES = [".", "..", "../data", "a/b", "/etc", "x\0y", "n" * 256, "é" * 128]


def _settings(tmp_path: Path, *flags: str):
    parser = build_parser("lenet5", prog="x", description="")
    return settings_from_namespace(parser.parse_args(["--output-dir", str(tmp_path), *flags]))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_validate_refuses_a_run_name_that_is_not_one_directory_name(tmp_path, name):
    problems = validate(dataclasses.replace(_settings(tmp_path), run_name=name))
    assert [symbol for symbol, _ in problems] == ["RUN_NAME"]


def test_validate_accepts_ordinary_run_names(tmp_path):
    for name in ("my-run", "a.b", "..x", "n" * 255, "é" * 127):
        assert validate(dataclasses.replace(_settings(tmp_path), run_name=name)) == []


@pytest.mark.slow  # starts a process or trains: over a second
@pytest.mark.parametrize("name", [".", "../data"])
def test_defconfig_with_a_bad_run_name_is_refused(tmp_path, name):
    result = subprocess.run([sys.executable, "-m", "scripts.kconfig", "defconfig", "lenet5-magnitude", "--set",
                             f"RUN_NAME={name}"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert result.returncode == 2 and "RUN_NAME" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / ".config").exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_claim_refuses_bad_names_and_deletes_nothing(tmp_path, name):
    out = tmp_path / "results"
    (out / "old-run").mkdir(parents=True)
    (out / "old-run" / "summary.json").write_text('{"status": "failed"}')
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("keep me")
    with pytest.raises(KpruneError, match="RUN_NAME"):
        claim_run_dir(out, name)
    assert (out / "old-run" / "summary.json").read_text() == '{"status": "failed"}'
    assert (tmp_path / "data" / "corpus.txt").read_text() == "keep me"


def _fake_run(path: Path, status: str | None, checkpoint: bool = False, summary: str | None = None) -> dict:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if status is not None or summary is not None:
        (path / "summary.json").write_text(summary if summary is not None else json.dumps({"status": status}))
    if checkpoint:
        (path / "checkpoint.json").write_text('{"step": 1}')
        (path / "checkpoint.pt").write_bytes(b"weights")
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("status, checkpoint, summary, says", [
    ("complete", False, None, "already holds a complete run"),
    ("interrupted", True, None, "make resume RESUME="),
    ("failed", False, None, "holds a failed run"),
    ("diverged", True, None, "holds a diverged run"),
    (None, False, None, "is not empty (metrics.jsonl)"),
    (None, False, "{not json", "summary.json is damaged"),
    (None, False, "[1, 2]", "summary.json is damaged"),
])
def test_claim_refuses_a_directory_that_holds_anything_and_keeps_it(tmp_path, status, checkpoint, summary, says):
    before = _fake_run(tmp_path / "run", status, checkpoint, summary)
    with pytest.raises(KpruneError) as info:
        claim_run_dir(tmp_path, "run")
    assert says in str(info.value)
    if status != "complete":
        assert "remove it yourself" in str(info.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != ".lock"} == before


def test_claim_takes_a_new_or_empty_directory_and_locks_it(tmp_path):
    path, lock = claim_run_dir(tmp_path / "out", "run")
    assert path == tmp_path / "out" / "run" and path.is_dir()
    with pytest.raises(KpruneError, match="another process is running in"):
        claim_run_dir(tmp_path / "out", "run")  # still empty, but claimed: the lock says so
    with pytest.raises(KpruneError, match="another process is running in"):
        RunLock(path)  # a resume of a run that is still going
    lock.release()
    path2, lock2 = claim_run_dir(tmp_path / "out", "run")  # empty and free again
    lock2.release()


def test_output_dir_naming_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KpruneError, match="is not a directory"):
        claim_run_dir(tmp_path / "file", "run")
    from lib.results import create_run_dir
    with pytest.raises(KpruneError, match="OUTPUT_DIR .* is not a directory"):
        create_run_dir(tmp_path / "file", "run")
    assert (tmp_path / "file").read_text() == "x"


def test_matrix_status_of_a_damaged_summary_is_failed_not_a_traceback(tmp_path):
    for i, content in enumerate([b"{oops", b"[1]", b"\xff\xfe\x00", b'{"status": 3}']):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "summary.json").write_bytes(content)
        assert run_status(tmp_path / str(i)) == "failed"
    assert run_status(tmp_path / "none") == "pending"


def test_set_aside_keeps_the_old_attempt_and_respects_the_lock(tmp_path):
    before = _fake_run(tmp_path / "runs" / "r1", "failed")
    moved = set_aside(tmp_path / "runs" / "r1", tmp_path / "attempts")
    assert moved == tmp_path / "attempts" / "r1-1" and not (tmp_path / "runs" / "r1").exists()
    assert {p.name: p.read_bytes() for p in moved.iterdir() if p.name != ".lock"} == before
    _fake_run(tmp_path / "runs" / "r1", "running")
    lock = RunLock(tmp_path / "runs" / "r1")
    with pytest.raises(KpruneError, match="another process is running in"):
        set_aside(tmp_path / "runs" / "r1", tmp_path / "attempts")
    lock.release()
    assert (tmp_path / "runs" / "r1" / "metrics.jsonl").exists()


def test_newest_interrupted_picks_the_latest_interrupted_run_with_a_checkpoint(tmp_path):
    _fake_run(tmp_path / "a", "interrupted", checkpoint=True)
    _fake_run(tmp_path / "b", "interrupted", checkpoint=False)
    _fake_run(tmp_path / "c", "complete", checkpoint=True)
    _fake_run(tmp_path / "d", "interrupted", checkpoint=True)
    os.utime(tmp_path / "a" / "summary.json", ns=(10**18, 10**18))
    os.utime(tmp_path / "d" / "summary.json", ns=(10**17, 10**17))
    assert newest_interrupted(tmp_path) == tmp_path / "a"
    assert newest_interrupted(tmp_path / "missing") is None


def _write_under_a_size_limit(tmp_path: Path, limit: int, size: int) -> subprocess.CompletedProcess:
    """write_bytes_atomic in a process whose files may not grow past `limit` bytes (a full disk, in effect)."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    code = ("import sys; from pathlib import Path; from lib.results import write_bytes_atomic, WriteError\n"
            "try:\n"
            f"    write_bytes_atomic(Path(sys.argv[1]), b'n' * {size})\n"
            "except WriteError as exc:\n"
            "    print(exc); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "checkpoint.pt")], cwd=REPO_ROOT,
                          capture_output=True, text=True, preexec_fn=limit_files, timeout=60)


def test_a_write_that_fails_half_way_leaves_the_previous_file_and_says_so(tmp_path):
    write_bytes_atomic(tmp_path / "checkpoint.pt", b"previous checkpoint")
    result = _write_under_a_size_limit(tmp_path, limit=4096, size=100_000)
    assert result.returncode == 2, result.stderr
    assert f"cannot write {tmp_path / 'checkpoint.pt'}: File too large" in result.stdout
    assert "free some space" in result.stdout
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left behind
    assert _write_under_a_size_limit(tmp_path, limit=4096, size=1000).returncode == 0  # the limit is the cause


def test_result_files_are_written_with_the_umask_not_0600(tmp_path):
    from lib.kconfig import load_kconfig, write_config

    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "summary.json", b"{}")
        write_config(load_kconfig(), tmp_path / "config")  # a run's copy of its .config
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "config").stat().st_mode & 0o777 == 0o644


def test_divergence_hint_names_grad_clip_as_it_is():
    assert "enable GRAD_CLIP" in str(Diverged(5, float("nan"), 0.0))
    off = str(Diverged(5, float("nan"), 1.0))
    assert "enable" not in off and "GRAD_CLIP (now 1)" in off


def _linear(s, device):
    model = nn.Linear(8, 1, bias=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    return Task(name="linear", model=model, prunable=[("weight", model.weight)], group_of=lambda n: "all",
                next_batch=lambda: (x, y), loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
                evaluate=lambda m: {"val_loss": 0.0, "val_accuracy": 1.0}, items_per_step=16,
                item_unit="samples", quality_key="val_accuracy")


def test_a_run_that_ends_short_of_its_target_sparsity_is_not_complete(tmp_path, capsys):
    s = _settings(tmp_path, "--optimizer", "sgd", "--pruning-method", "magnitude", "--target-sparsity", "0.5",
                  "--schedule", "linear", "--schedule-start", "1", "--schedule-frequency", "1",
                  "--lr-warmup-iters", "0", "--eval-interval", "100", "--log-interval", "1")
    # The schedule ends at step 8 but the run stops after 4 (the config check would refuse this; run() must
    # not record such a run as complete either).
    short = dataclasses.replace(s, max_iters=4, schedule_end=8, run_name="short")
    assert run(short, _linear, command=["test"]) == 1
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert summary["status"] == "failed" and "final target is 4" in summary["error"]
    whole = dataclasses.replace(s, max_iters=8, schedule_end=8, run_name="whole")
    assert run(whole, _linear, command=["test"]) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["mask_pruned_count"] == 4


def test_the_resume_hint_is_offered_only_for_a_checkpoint_that_is_there_and_quoted(tmp_path):
    from lib import checkpoint
    from lib.run_dir import resume_hint

    run_dir = tmp_path / "my results" / "it's"
    run_dir.mkdir(parents=True)
    assert "make resume" not in resume_hint(run_dir) and "no checkpoint" in resume_hint(run_dir)
    checkpoint.save(run_dir, {"step": 7, "model_name": "linear", "weights": torch.ones(3)})
    hint = resume_hint(run_dir)
    assert hint.endswith(f"make resume RESUME={shlex.quote(str(run_dir))}") and "(step 7)" in hint
    assert shlex.split(hint.rsplit("RESUME=", 1)[1]) == [str(run_dir)]  # a shell reads it back as one path
    data = bytearray((run_dir / "checkpoint.pt").read_bytes())
    data[-1] ^= 0xFF
    (run_dir / "checkpoint.pt").write_bytes(bytes(data))
    assert "make resume" not in resume_hint(run_dir)  # a checkpoint that does not match its hash is not offered
    (run_dir / "checkpoint.json").write_text("{garbage")
    assert "make resume" not in resume_hint(run_dir)


def test_resume_with_a_damaged_checkpoint_json_is_one_clear_line(tmp_path):
    from lib import checkpoint

    (tmp_path / "checkpoint.json").write_bytes(b"\x00\xffnot json")
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(KpruneError, match="checkpoint.json cannot be read .* is damaged and cannot be resumed"):
        checkpoint.load(tmp_path, "linear", {})


def test_resume_keeps_a_damaged_metrics_file_and_goes_on(tmp_path, capsys):
    """Undecodable bytes in metrics.jsonl (a disk fault, a stray editor) do not stop a resume or vanish."""
    s = _settings(tmp_path, "--optimizer", "sgd", "--pruning-method", "none", "--max-iters", "8",
                  "--checkpoint-interval", "4", "--eval-interval", "100", "--log-interval", "1", "--run-name", "r")
    assert run(s, _linear, command=["test"]) == 0
    run_dir = tmp_path / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "running"}))  # killed after a checkpoint
    damaged = (run_dir / "metrics.jsonl").read_bytes().replace(b'{"', b'\xff\xfe{"', 1)
    (run_dir / "metrics.jsonl").write_bytes(damaged)
    capsys.readouterr()
    assert run(dataclasses.replace(s, resume_from=str(run_dir)), _linear, command=["test"]) == 0
    err = capsys.readouterr().err
    assert "1 damaged line(s)" in err and "metrics.jsonl.damaged" in err
    assert (run_dir / "metrics.jsonl.damaged").read_bytes() == damaged
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and 8 in steps  # the readable rows, each once
