"""Real runs, as a user makes them: `make defconfig-... && make train SET=...`.

Each test works in a copy of the project (so the developer's own .config
and results/ are never touched) that links to the real .venv and data.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib import checkpoint
from lib.kconfig import REPO_ROOT, read_config, settings_from_kconfig
from lib.pruning.pruner import target_count
from lib.results import read_metrics

pytestmark = pytest.mark.slow

QUICK_GPT2 = ("MAX_ITERS=12 SCHEDULE_START=2 SCHEDULE_END=10 SCHEDULE_FREQUENCY=2 EVAL_INTERVAL=6 "
              "LOG_INTERVAL=3 GPT2_EVAL_ITERS=2 LR_WARMUP_ITERS=2")
QUICK_LENET5 = ("MAX_ITERS=12 BATCH_SIZE=32 SCHEDULE_START=2 SCHEDULE_END=10 SCHEDULE_FREQUENCY=2 "
                "EVAL_INTERVAL=6 LOG_INTERVAL=3 LR_WARMUP_ITERS=2")
SPEC_METRIC_KEYS = {"step", "loss", "lr", "target_sparsity", "achieved_sparsity", "step_time_s"}
SPEC_SUMMARY_KEYS = {"model", "optimizer", "pruning_method", "variant", "schedule", "target_sparsity",
                     "final_sparsity", "iterations", "wall_time_s", "throughput", "memory", "seed", "status"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for name in ["Kconfig", "Makefile", "requirements.txt", "requirements-hub.txt", "requirements-trackers.txt", "defconfigs", "lib", "gpt2",
                 "lenet5", "resnet", "scripts", "tests"]:
        src = REPO_ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / name)
    os.symlink(REPO_ROOT / ".venv", root / ".venv")
    os.symlink(REPO_ROOT / "data", root / "data")
    return root


def make(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=project, capture_output=True,
                            text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_dir_of(result: subprocess.CompletedProcess, project: Path) -> Path:
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("results: "), f"last line was {last!r}"
    return project / last.removeprefix("results: ")


@pytest.mark.parametrize("defconfig, quick", [("gpt2-bitter7", QUICK_GPT2), ("gpt2-magnitude", QUICK_GPT2),
                                              ("lenet5-bitter7", QUICK_LENET5), ("lenet5-magnitude", QUICK_LENET5)])
def test_make_defconfig_and_train(project, defconfig, quick):
    make(project, f"defconfig-{defconfig}")
    result = make(project, "train", f"SET={quick}")
    command_line = result.stdout.splitlines()[0]
    run_dir = run_dir_of(result, project)

    # The run directory holds the contract's files.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SPEC_SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "complete" and summary["iterations"] == 12
    # .config describes what ran: it has the SET values, and so does the run's own copy.
    ran, _ = read_config(run_dir / "config")
    current, _ = read_config(project / ".config")
    assert settings_from_kconfig(ran) == settings_from_kconfig(current)
    assert settings_from_kconfig(ran).max_iters == 12
    assert (run_dir / "command").read_text().split()[1:] == command_line.split()[1:]

    # Exact sparsity, counted from the weights, equal to the target at every update.
    target = summary["target_sparsity"]
    pool = summary["prunable_params"]
    assert summary["final_pruned_count"] == target_count(target, pool)
    assert summary["mask_pruned_count"] == summary["final_pruned_count"]
    assert summary["target_count_exact"] is True
    assert [u["step"] for u in summary["mask_updates"]] == [2, 4, 6, 8, 10]

    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert all(SPEC_METRIC_KEYS <= r.keys() for r in train_rows)
    assert [r["step"] for r in eval_rows] == [0, 6, 12]
    quality = "val_ppl" if defconfig.startswith("gpt2") else "val_accuracy"
    assert all(quality in r for r in eval_rows) and summary[quality] == eval_rows[-1][quality]
    assert pool / 8 <= summary["memory"]["masks"] < pool / 8 + 64  # one bit per prunable weight
    assert summary["memory"]["optimizer.exp_avg_sq"] == summary["memory"]["weights"]


def test_make_train_without_config_says_what_to_do(project):
    (project / ".config").unlink(missing_ok=True)
    result = make(project, "train", check=False)
    assert result.returncode != 0
    assert "make defconfig-<name>" in result.stderr


def test_bad_defconfig_changes_nothing(project):
    make(project, "defconfig-lenet5-magnitude")
    before = (project / ".config").read_bytes()
    (project / "defconfigs" / "typo").write_text("CONFIG_MODEL_LENET5=y\nCONFIG_TARGET_SPARSTY=\"0.7\"\n")
    try:
        result = make(project, "defconfig-typo", check=False)
    finally:
        (project / "defconfigs" / "typo").unlink()
    assert result.returncode != 0
    assert "defconfigs/typo:2: CONFIG_TARGET_SPARSTY is not a Kconfig symbol" in result.stderr
    result = make(project, "train", "SET=TARGET_SPARSITY=150", check=False)
    assert result.returncode != 0 and "150 is out of range [0, 1)" in result.stderr
    assert (project / ".config").read_bytes() == before


def _trainer(project: Path, model: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"{model}.train", "--output-dir", "results", *flags],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_same_seed_same_run(project):
    flags = ["--max-iters", "8", "--eval-interval", "4", "--log-interval", "1", "--eval-iters", "2",
             "--pruning-method", "magnitude", "--schedule-start", "2", "--schedule-end", "6",
             "--schedule-frequency", "2", "--dropout", "0.1"]
    dirs = []
    for _ in range(2):
        proc = _trainer(project, "gpt2", *flags)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        dirs.append(project / out.strip().splitlines()[-1].removeprefix("results: "))
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "_per_s" not in k} for r in rows]
    a, b = (strip(read_metrics(d / "metrics.jsonl")) for d in dirs)
    assert a == b and len(a) > 8


def test_diverged_run_is_recorded_as_diverged(project):
    proc = _trainer(project, "lenet5", "--max-iters", "200", "--lr", "1e6", "--grad-clip", "0",
                    "--lr-warmup-iters", "0", "--eval-interval", "100")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    summary = json.loads((project / out.strip().splitlines()[-1].removeprefix("results: ") / "summary.json").read_text())
    assert summary["status"] == "diverged" and 1 <= summary["diverged_at_step"] <= 200
    assert "lower LR" in summary["error"]


def test_sigterm_leaves_an_interrupted_summary(project):
    proc = _trainer(project, "lenet5", "--max-iters", "100000", "--log-interval", "1", "--seed", "4242")
    deadline = time.time() + 120
    results = project / "results"
    metrics = None
    while time.time() < deadline and metrics is None:
        found = sorted(results.glob("*-lenet5-none-s4242*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
        if found and found[-1].stat().st_size > 0:
            metrics = found[-1]
        time.sleep(0.2)
    assert metrics is not None, "the run never started logging"
    summary_path = metrics.parent / "summary.json"
    assert json.loads(summary_path.read_text())["status"] == "running"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "interrupted" and 0 < summary["iterations"] < 100000


def _max_step(metrics: Path) -> int:
    return max((r["step"] for r in read_metrics(metrics) if "loss" in r), default=0) if metrics.exists() else 0


def test_sigterm_to_makes_process_group_leaves_a_checkpoint_that_make_resume_finishes(project):
    # A terminal's Ctrl-C or a job scheduler signals the whole process group: the trainer gets SIGTERM
    # from the group and again from make, which forwards what it got. That is one request, not "stop now".
    make(project, "defconfig-lenet5-magnitude")
    quick = ("MAX_ITERS=300 BATCH_SIZE=32 SCHEDULE_START=2 SCHEDULE_END=200 SCHEDULE_FREQUENCY=10 "
             "EVAL_INTERVAL=300 LOG_INTERVAL=1 LR_WARMUP_ITERS=2 RUN_NAME=cut")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    proc = subprocess.Popen(["make", "--no-print-directory", "train", f"SET={quick}"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = project / "results" / "cut"
    deadline = time.time() + 180
    while _max_step(run_dir / "metrics.jsonl") < 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, out + err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary.get("error")
    step = checkpoint.verify(run_dir)  # checkpoint.pt and checkpoint.json both there, and matching
    assert step is not None and 20 <= step < 300 and summary["iterations"] == step
    assert "make resume RESUME=results/cut" in summary["error"]
    # Result files are for sharing: the umask decides, not mkstemp's 0600.
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config", "command", "metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

    # The same RUN_NAME again is refused, and says how to resume; nothing in the directory changes.
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    again = make(project, "train", f"SET={quick}", check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "make resume RESUME=results/cut" in again.stderr and "remove it yourself" in again.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

    # make resume without RESUME continues the newest interrupted run, to the end.
    make(project, "resume")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["iterations"] == 300
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 301))


def test_a_second_run_with_the_same_run_name_is_refused_and_touches_nothing(project):
    first = _trainer(project, "lenet5", "--max-iters", "200", "--log-interval", "1", "--eval-interval", "200",
                     "--run-name", "shared", "--seed", "1")
    run_dir = project / "results" / "shared"
    deadline = time.time() + 120
    while _max_step(run_dir / "metrics.jsonl") < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    # The first run is held (stopped, its lock kept) while the second starts: however slow that start, it
    # meets a run in progress, and the first need not train for longer than the second takes to start.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None and _max_step(run_dir / "metrics.jsonl") < 200, "the first run ended too soon"
        command = (run_dir / "command").read_text()
        second = _trainer(project, "lenet5", "--max-iters", "4", "--run-name", "shared", "--seed", "2")
        out, err = second.communicate(timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and err.strip().splitlines()[-1].startswith("error: another process is running in")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (run_dir / "command").read_text() == command and "--seed 1" in command
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["seed"] == 1 and summary["iterations"] == 200


def _lenet5_with_files_limited_to(project: Path, limit: int, name: str) -> subprocess.CompletedProcess:
    """A run whose files may not grow past `limit` bytes: writes fail as on a full disk."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-m", "lenet5.train", "--output-dir", "results", "--run-name", name,
                           "--max-iters", "20", "--checkpoint-interval", "5", "--eval-interval", "20"],
                          cwd=project, capture_output=True, text=True, preexec_fn=limit_files, timeout=300)


def test_a_full_disk_mid_run_is_one_line_not_a_traceback(project):
    # 200 kB: config, summary and metrics fit, the checkpoint does not.
    result = _lenet5_with_files_limited_to(project, 200_000, "full")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "cannot write results/full/checkpoint.pt: File too large" in errors[0]
    summary = json.loads((project / "results" / "full" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["iterations"] == 5
    assert "no checkpoint was written" in summary["error"]
    assert not (project / "results" / "full" / "checkpoint.json").exists()
    # 1 kB: not even the run's copy of its config (written by kconfiglib) fits.
    result = _lenet5_with_files_limited_to(project, 1000, "fuller")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write results/fuller/config: File too")


def test_resnet_trains_on_a_cifar_format_archive(project, data_dir):
    make(project, "defconfig-resnet18-bitter7")
    result = make(project, "train", f"SET=MAX_ITERS=6 BATCH_SIZE=4 RESNET_WIDTH=8 SCHEDULE_START=2 SCHEDULE_END=6 "
                                    f"SCHEDULE_FREQUENCY=2 EVAL_INTERVAL=6 LR_WARMUP_ITERS=1 DATA_DIR={data_dir} "
                                    "DATA_WORKERS=2 GRAD_ACCUM_STEPS=2")
    summary = json.loads((run_dir_of(result, project) / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["model"] == "resnet18-cifar10"
    assert summary["final_pruned_count"] == target_count(0.5, summary["prunable_params"])
    assert summary["items_per_step"] == 8  # batch 4 x 2 accumulated micro-batches


def test_missing_cifar_says_which_make_target_to_run(project, tmp_path):
    make(project, "defconfig-resnet18-magnitude")
    result = make(project, "train", f"SET=DATA_DIR={tmp_path} RESNET_DATASET=cifar100", check=False)
    assert result.returncode != 0
    assert "make data-cifar100" in result.stderr


def test_data_gpt2_custom_then_train(project, tmp_path):
    text = tmp_path / "my.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Story {i}. " + "To be, or not to be, that is the question. " * 15})
                              for i in range(60)), encoding="utf-8")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(REPO_ROOT / "data" / "gpt2", data / "gpt2")
    result = make(project, "data-gpt2", "DATASET=custom", f"DATA_PATH={text}", f"DATA_DIR={data}")
    assert result.stdout.strip().splitlines()[-1] == f"data: {data / 'prepared' / 'custom-gpt2'}"
    make(project, "defconfig-gpt2-magnitude")
    result = make(project, "train", f"SET=GPT2_DATASET=custom DATA_DIR={data} {QUICK_GPT2}")
    summary = json.loads((run_dir_of(result, project) / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["dataset"] == "custom"


@pytest.mark.parametrize("name", ["gpt2-124m-finewebedu-bitter7", "gpt2-124m-finewebedu-magnitude",
                                  "resnet50-bitter7"])
def test_gpu_defconfigs_validate_and_print_their_command(project, name):
    make(project, f"defconfig-{name}")
    command = make(project, "command").stdout.strip()
    assert "--device cuda" in command or "resnet" in name
    if "124m" in name:
        for flag in ("--gpt2-size 124m", "--block-size 1024", "--lr 6e-4", "--min-lr 6e-5",
                     "--lr-warmup-iters 2000", "--weight-decay 0.1", "--target-sparsity 0.5", "--compile"):
            assert flag in command, flag
