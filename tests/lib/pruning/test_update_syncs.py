"""A mask update reads from the device a fixed number of times, not once per parameter.

On a GPU every read of a tensor's value on the host (item, bool, int, tolist,
a boolean-mask index) waits for the device. A CPU cannot see the wait, but it
can count the reads: every Tensor method that hands a value to Python, and
every boolean-mask index, is counted while an update runs. A model twice as
deep must need exactly as many.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch import nn

from lib.pruning.channel import Channel
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.pruning.structure import NM, Block, Structure
from lib.pruning.units import UnitFamily, Units, consecutive

# What a GPU runs: the torch scores (on the CPU select.c's one pass scores instead, where no device waits).
pytestmark = pytest.mark.usefixtures("torch_scores")

# Tensor methods that give a tensor's value to Python: on a GPU, each waits for the device.
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Count, by kind, the device-to-host reads made through torch.Tensor while the block runs."""
    counts: collections.Counter = collections.Counter()

    def counted(name, method):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return read

    def boolean_index(name, method):  # t[mask] and t[mask] = x find the mask's True entries on the host
        def index(self, key, *args):
            keys = key if isinstance(key, tuple) else (key,)
            if any(torch.is_tensor(k) and k.dtype == torch.bool for k in keys):
                counts[name] += 1
            return method(self, key, *args)
        return index

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        for name in ("__getitem__", "__setitem__"):
            m.setattr(torch.Tensor, name, boolean_index(name, getattr(torch.Tensor, name)))
        yield counts


def _structure(kind: str, model: nn.Sequential) -> Structure:
    if kind == "channel":
        return Channel(Units([UnitFamily(str(i), (consecutive(f"{i}.weight", model[i].weight, 0, 64),
                                                  consecutive(f"{i}.bias", model[i].bias, 0, 64),
                                                  consecutive(f"{i + 1}.weight", model[i + 1].weight, 1, 64)))
                              for i in range(len(model) - 1)]))
    return {"unstructured": Structure, "nm": lambda: NM(2, 4), "block": lambda: Block(4, 4)}[kind]()


def _reads_per_update(kind: str, depth: int, monkeypatch, variant: str = "bitter9") -> list[collections.Counter]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(depth)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pool = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    pruner = Pruner(pool, Schedule("linear", start=1, end=3, final=0.5), build_method("state", variant), opt,
                    structure=_structure(kind, model))
    reads = []
    for step in (1, 2, 3):
        opt.zero_grad()
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        with host_reads(monkeypatch) as counts:
            pruner.after_step(step)
        reads.append(counts)
    assert [u.pruned_groups > 0 for u in pruner.updates] == [False, True, True]
    return reads


@pytest.mark.parametrize("kind", ["unstructured", "nm", "block", "channel"])
def test_a_mask_update_reads_the_device_as_often_whatever_the_number_of_parameters(kind, monkeypatch):
    shallow, deep = _reads_per_update(kind, 2, monkeypatch), _reads_per_update(kind, 8, monkeypatch)
    # The updates that select (and the last keeps pruned weights pruned) read the threshold: the counter works.
    assert all(sum(counts.values()) > 0 for counts in shallow[1:])
    assert deep == shallow, (deep, shallow)


def test_bitter8_reads_adams_step_count_without_a_read_per_parameter(monkeypatch):
    # The bias correction needs Adam's step, a tensor in the state (on the GPU under fused Adam).
    shallow = _reads_per_update("unstructured", 2, monkeypatch, "bitter8")
    assert _reads_per_update("unstructured", 8, monkeypatch, "bitter8") == shallow
