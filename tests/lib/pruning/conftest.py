"""Shared fixtures for the pruning tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool overhead on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def torch_scores(monkeypatch):
    """Score with torch operations even where select.c's one C pass would (the CPU): the path a GPU
    takes, and a machine without a C compiler (neither takes the sampled window, select.c's too)."""
    monkeypatch.setattr("lib.pruning.update_pass.UpdatePass._native_keys_", lambda *args, **kwargs: False)
    monkeypatch.setattr("lib.pruning.update_pass.UpdatePass._sample_window", lambda *args, **kwargs: (0, None))
