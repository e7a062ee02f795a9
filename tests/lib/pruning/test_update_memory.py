"""What a mask update allocates, measured with torch.profiler (tests/allocations.py).

- The recorded peak (Pruner.peak_score_bytes, summary.json's mask_update_peak) is never below the
  score memory an update really held at once, nor above it by more than a few scalars: for every
  method and variant, every structure, with the scores in the spent gradients (training) or in
  buffers of the update's own.
- A structured update (nm, block, channel) allocates no score-sized buffer beyond what the
  unstructured update does, only group-sized ones.
- Breaking a tie over whole tensors (as on a GPU) holds no more than over CPU-sized chunks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import record_function

from lib.pruning.calibration import Calibration
from lib.pruning.channel import Channel
from lib.pruning.masks import CHUNK, GPU_CHUNK
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.registry import VARIANT_NAMES
from lib.pruning.schedules import Schedule
from lib.pruning.scores import SCORE_CHUNK
from lib.pruning.selection import iter_selection, kth_threshold
from lib.pruning.structure import NM, Block, Structure
from lib.pruning.units import UnitFamily, Units, consecutive
from tests.allocations import allocation_peaks

METHODS = [("magnitude", None), ("movement", None), ("spt", None), ("wanda", None), *[("state", v) for v in VARIANT_NAMES]]
STRUCTURES = ("unstructured", "nm", "block", "channel")
SMALL_CHUNK = 4096  # score chunk of the small models below: 16 KiB per float32 intermediate
# The 0-d tensors a score makes of its Python numbers (eps, 0.1) are not score memory: a few bytes,
# while one chunk of scores, the least a wrong count of intermediates is off by, is 16 KiB or more.
SCALARS = 256


@pytest.fixture(autouse=True, scope="module")
def _bit_tables_made():
    """The bit-unpacking tables (4 KB) are made once per process, at its first mask update: not score memory.
    Made here, so the first case measured in a fresh process (a pytest-xdist worker) is measured like the rest."""
    from lib.pruning.masks import _tables
    _tables(torch.device("cpu"))


def _model(sizes: tuple[int, int, int], dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    n_in, hidden, n_out = sizes
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out)).to(dtype)


def _structure(kind: str, model: nn.Sequential) -> Structure:
    if kind == "channel":
        first, second = model[0], model[2]
        hidden, n_out = first.out_features, second.out_features
        return Channel(Units([
            UnitFamily("hidden", (consecutive("0.weight", first.weight, 0, hidden),
                                  consecutive("0.bias", first.bias, 0, hidden),
                                  consecutive("2.weight", second.weight, 1, hidden))),
            UnitFamily("out", (consecutive("2.weight", second.weight, 0, n_out),))]))
    return {"unstructured": Structure, "nm": lambda: NM(2, 4), "block": lambda: Block(4, 4)}[kind]()


def _updates(model: nn.Sequential, method: str, variant: str | None, kind: str, spent: bool, region: bool,
             marked: str = "method.score"):
    """A pruner and the measured peaks of its two pruning mask updates (the second keeps the first's pruned weights)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pool = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    pruner = Pruner(pool, Schedule("linear", start=1, end=3, final=0.5), build_method(method, variant, last_step=3),
                    opt, structure=_structure(kind, model))
    if region:  # mark each weight's scoring (by torch: method.score; by select.c: _native_keys_)
        owner, name = (pruner.method, "score") if marked == "method.score" else (pruner.update_pass, marked)
        score = getattr(owner, name)

        def scoring(*args, **kwargs):
            with record_function("kprune.score"):
                return score(*args, **kwargs)
        setattr(owner, name, scoring)
    x = torch.randn(4, model[0].in_features, dtype=model[0].weight.dtype)
    if method == "wanda":  # its calibration statistics are per column: the score itself allocates nothing
        names, params = zip(*pool)
        pruner.calibration = Calibration(model, list(names), list(params), lambda n: [(x,)] * n, 1,
                                         lambda m, batch: m(batch[0]), method)
    peaks = []
    for step in (1, 2, 3):  # the update at step 1 prunes nothing yet (sparsity 0)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        update = (lambda: pruner.after_step(step)) if spent else (lambda: pruner.update(step))
        if step == 1:
            update()
        else:
            peaks.append(allocation_peaks(update, "kprune.score" if region else None))
    assert [u.step for u in pruner.updates] == [1, 2, 3] and 0 < pruner.updates[1].pruned_groups
    return pruner, peaks


def _measured_and_recorded(method, variant, kind, spent, sizes, chunk=None, marked="method.score"):
    model = _model(sizes)
    assert model[0].weight.numel() > 2 * (chunk or SCORE_CHUNK) > model[2].weight.numel()  # chunked and whole
    pruner, peaks = _updates(model, method, variant, kind, spent, region=True, marked=marked)
    assert all(p.regions == len(pruner.masks.params) for p in peaks)  # every weight scored, every update
    return max(p.in_regions for p in peaks), pruner.peak_score_bytes


@pytest.mark.usefixtures("torch_scores")  # the torch scores' intermediates; select.c's pass: further below
@pytest.mark.parametrize("spent", [True, False], ids=["spent-gradients", "own-buffers"])
@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("method, variant", METHODS, ids=[v or m for m, v in METHODS])
def test_recorded_update_peak_is_the_measured_score_memory(method, variant, kind, spent, monkeypatch):
    # A small score chunk, so that a small first weight (96 x 128) is scored in three chunks.
    monkeypatch.setattr("lib.pruning.scores.SCORE_CHUNK", SMALL_CHUNK)
    measured, recorded = _measured_and_recorded(method, variant, kind, spent, (128, 96, 32), chunk=SMALL_CHUNK)
    assert abs(recorded - measured) <= SCALARS, (recorded, measured)


@pytest.mark.usefixtures("torch_scores")
@pytest.mark.parametrize("variant", ["bitter5", "bitter7"])
def test_recorded_update_peak_is_the_measured_score_memory_at_the_real_chunk_size(variant):
    measured, recorded = _measured_and_recorded("state", variant, "unstructured", True, (512, 1280, 128))
    assert abs(recorded - measured) <= SCALARS, (recorded, measured)


@pytest.mark.parametrize("spent", [True, False], ids=["spent-gradients", "own-buffers"])
@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("method, variant", [m for m in METHODS if m[0] in ("magnitude", "state")],
                         ids=[v or m for m, v in METHODS if m in ("magnitude", "state")])
def test_the_c_score_pass_holds_nothing_beside_the_keys(method, variant, kind, spent, monkeypatch):
    # On the CPU select.c turns every weight's score into its keys (block, channel: its float scores) in one
    # pass (every weight: the marked regions are select.c's, and a torch score would be a second region): no
    # intermediate, so the peak is the score buffers (and a group structure's group scores), as recorded.
    monkeypatch.setattr("lib.pruning.methods.FunctionMethod.score", None)  # must not be called
    measured, recorded = _measured_and_recorded(method, variant, kind, spent, (128, 96, 32), chunk=SMALL_CHUNK,
                                                marked="_native_keys_")
    assert abs(recorded - measured) <= SCALARS, (recorded, measured)
    if kind in ("unstructured", "nm"):
        assert recorded == (0 if spent else 4 * (128 * 96 + 96 * 32))  # own buffers: the keys of every weight


def test_recorded_update_peak_counts_the_float32_copy_of_a_bfloat16_weight():
    model = _model((1024, 1536, 512), dtype=torch.bfloat16)
    pruner, peaks = _updates(model, "magnitude", None, "unstructured", spent=True, region=True)
    measured = max(p.in_regions for p in peaks)
    # Own float32 buffers (a bf16 gradient cannot hold the scores), kept for the selection, and the
    # float32 copy of the weight being scored.
    first, second = (p.numel() * 4 for p in pruner.masks.params)
    assert pruner.peak_score_bytes == max(first + first, first + second + second)
    assert abs(pruner.peak_score_bytes - measured) <= SCALARS, (pruner.peak_score_bytes, measured)


@pytest.mark.slow
@pytest.mark.usefixtures("torch_scores")  # like with like: block and channel scores are torch's on the CPU too
@pytest.mark.parametrize("kind", ["nm", "block", "channel"])
def test_a_structured_update_allocates_no_score_sized_buffer_beyond_the_unstructured_one(kind):
    # Weights of 4M and 2M: one score buffer of the smaller (8 MiB) is above every chunk temporary.
    sizes = (2048, 2048, 1024)
    score_buffer = 4 * 1024 * 2048

    def peak(kind: str) -> tuple[int, Pruner]:
        pruner, peaks = _updates(_model(sizes), "state", "bitter7", kind, spent=True, region=False)
        return max(p.overall for p in peaks), pruner

    unstructured, _ = peak("unstructured")
    structured, pruner = peak(kind)
    # A group structure's own buffers are per group (a tile's or unit's mean, key and flags): small.
    groups = 0 if pruner.structure.weight_level else sum(pruner.structure.layer_sizes())
    extra = structured - unstructured
    assert extra <= 8 * groups + SCALARS
    assert 8 * groups < score_buffer / 2


@pytest.mark.slow
def test_tied_keys_are_taken_in_pieces_even_when_the_selection_runs_over_whole_tensors():
    # SPT's never-explored weights all score 0, so at its updates most keys tie. A GPU runs the selection
    # over whole tensors (GPU_CHUNK); the tied keys' int64 indices and hashes must still come in pieces.
    n = 1 << 21  # twice a CPU chunk
    keys = [torch.zeros(n, dtype=torch.int32), torch.zeros(n // 2, dtype=torch.int32)]
    thr = kth_threshold(keys, n // 2)
    assert thr.ties < thr.equal  # a tie to break
    selections, peaks = {}, {}
    for chunk in (CHUNK, GPU_CHUNK):
        def select():
            selections[chunk] = torch.cat([torch.cat([s for j, _, s in iter_selection(keys, thr, chunk=chunk) if j == i])
                                           for i in range(2)])
        peaks[chunk] = allocation_peaks(select).overall
    assert torch.equal(selections[CHUNK], selections[GPU_CHUNK]) and int(selections[CHUNK].sum()) == n // 2
    # Over whole tensors only the selected flags grow (a byte per key of the largest tensor; the result
    # itself, a byte per key, is made alike at both chunk sizes).
    assert peaks[GPU_CHUNK] <= peaks[CHUNK] + 2 * n, peaks
