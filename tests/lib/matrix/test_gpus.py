"""Matrix jobs get GPUs from the runner's own visible list, and sharing is said out loud."""

from __future__ import annotations

import json
import threading

from lib.matrix import runner as runner_module
from lib.matrix.gpus import gpu_for, sharing_note, visible_gpus
from lib.matrix.plan import Plan


def _no_count():
    raise AssertionError("CUDA_VISIBLE_DEVICES is set: the device count must not be consulted")


def test_visible_list_is_the_parents_own_entries_as_written():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, _no_count) == ["2", "3"]
    uuids = "GPU-8f1c2d3e-aaaa-bbbb-cccc-0123456789ab, MIG-4d5e6f70-1111-2222-3333-444455556666"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": uuids}, _no_count) == [
        "GPU-8f1c2d3e-aaaa-bbbb-cccc-0123456789ab", "MIG-4d5e6f70-1111-2222-3333-444455556666"]


def test_hidden_or_invalid_entries_end_the_list_as_cuda_does():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, _no_count) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, _no_count) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "5,-1,6"}, _no_count) == ["5"]


def test_without_the_variable_every_counted_gpu_is_visible():
    assert visible_gpus({}, lambda: 3) == ["0", "1", "2"]
    assert visible_gpus({}, lambda: 0) == []


def test_jobs_take_entries_of_the_list_round_robin():
    gpus = ["4", "7"]
    assert [gpu_for(slot, gpus) for slot in range(4)] == ["4", "7", "4", "7"]
    assert gpu_for(0, []) is None


def test_sharing_is_reported_only_when_jobs_outnumber_gpus():
    assert sharing_note(2, ["4", "7"]) is None
    assert sharing_note(3, []) is None  # CPU runs share nothing to warn about
    note = sharing_note(3, ["4", "7"])
    assert "JOBS=3" in note and "2 GPU(s)" in note and "up to 2 per GPU" in note and "JOBS=2" in note


def test_runner_passes_visible_entries_to_its_children_and_records_sharing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    seen = []

    class FakeProc:
        pid = 0

        def __init__(self, argv, env, **kwargs):
            seen.append(env["CUDA_VISIBLE_DEVICES"])

        def wait(self):
            together.wait()  # the three run at once, as JOBS=3 means: no slot is handed back early
            return 0

    together = threading.Barrier(3, timeout=30)
    monkeypatch.setattr(runner_module.subprocess, "Popen", FakeProc)
    runs = [type("Run", (), {"id": f"r{i}", "model": "lenet5", "argv": []})() for i in range(3)]
    plan = Plan(name="gpus", axes={}, baseline=None, runs=runs, dropped=[], base_config="")
    r = runner_module.Runner(tmp_path, plan, jobs=3, cpu_count=3)
    r.run()
    assert sorted(seen) == ["GPU-aaaa", "GPU-aaaa", "GPU-bbbb"]
    status = json.loads((tmp_path / "status.json").read_text())
    assert "share 2 GPU(s)" in status["gpu_sharing"]
    assert "warning: JOBS=3" in capsys.readouterr().out
