"""bitter4's layer-adaptive sparsity: depth-scaled per-layer counts that add up to the global target."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lib.pruning.methods import Observation, build_method
from lib.pruning.pruner import LAYER_CAP, Pruner, layer_adaptive_counts, target_count
from lib.pruning.schedules import Schedule


def _cap(n: int) -> int:
    return int(LAYER_CAP * n)


def _random_cases(seed: int, cases: int):
    rng = random.Random(seed)
    for _ in range(cases):
        n_layers = rng.randint(1, 9)
        sizes = [rng.choice([rng.randint(1, 40), rng.randint(20, 3000)]) for _ in range(n_layers)]
        capacity = sum(_cap(n) for n in sizes)
        if capacity == 0:
            continue
        yield sizes, rng.randint(0, capacity)


def test_cap_is_95_percent():
    assert LAYER_CAP == 0.95


def test_counts_sum_to_k_exactly_and_respect_the_cap():
    checked = 0
    for sizes, k in _random_cases(0, 600):
        counts = layer_adaptive_counts(k, sizes)
        assert sum(counts) == k, (sizes, k, counts)
        assert len(counts) == len(sizes)
        for c, n in zip(counts, sizes):
            assert 0 <= c <= _cap(n), (sizes, k, counts)
        checked += 1
    assert checked > 500


def test_fractions_do_not_decrease_with_depth():
    # per-layer fraction count/n is non-decreasing up to the rounding of one weight in each layer
    rng = random.Random(1)
    for _ in range(300):
        sizes = [rng.randint(20, 2000) for _ in range(rng.randint(2, 8))]
        k = rng.randint(0, sum(_cap(n) for n in sizes))
        counts = layer_adaptive_counts(k, sizes)
        fr = [c / n for c, n in zip(counts, sizes)]
        for i in range(len(sizes) - 1):
            slack = 1 / sizes[i] + 1 / sizes[i + 1]
            assert fr[i + 1] >= fr[i] - slack - 1e-12, (sizes, k, counts)


@pytest.mark.parametrize("n_layers", [2, 3, 5, 12])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_equal_layers_follow_the_0p7_to_1p3_scaling(n_layers, sparsity):
    n = 10_000
    sizes = [n] * n_layers
    k = target_count(sparsity, n * n_layers)
    counts = layer_adaptive_counts(k, sizes)
    assert sum(counts) == k
    # no cap binds (1.3 * 0.5 < 0.95), so the mean scale is 1 and layer i gets s * (0.7 + 0.6 i / (L - 1))
    for i, c in enumerate(counts):
        expected = sparsity * (0.7 + 0.6 * i / (n_layers - 1)) * n
        assert abs(c - expected) <= 1.0, (i, c, expected)
    assert counts[-1] / counts[0] == pytest.approx(1.3 / 0.7, rel=2e-3)
    assert counts == sorted(counts)


def test_unequal_layers_keep_the_depth_ratios():
    sizes = [500, 4000, 20000, 1000, 300]
    k = target_count(0.4, sum(sizes))
    counts = layer_adaptive_counts(k, sizes)
    assert sum(counts) == k
    fr = [c / n for c, n in zip(counts, sizes)]
    scales = [0.7 + 0.6 * i / 4 for i in range(5)]
    c = fr[2] / scales[2]  # the common factor, read from the biggest layer
    for f, sc, n in zip(fr, scales, sizes):
        assert f == pytest.approx(c * sc, abs=1.5 / n)
    # the global fraction is still exactly the target
    assert sum(counts) / sum(sizes) == pytest.approx(0.4, abs=1 / sum(sizes))


def test_cap_binds_and_the_rest_is_redistributed():
    sizes = [1000] * 5
    k = target_count(0.85, 5000)  # 1.3 * 0.85 > 0.95: deep layers are capped
    counts = layer_adaptive_counts(k, sizes)
    assert sum(counts) == k
    assert max(counts) == _cap(1000) == 950
    assert counts == sorted(counts)
    assert counts[0] < 950


def test_single_layer_gets_everything():
    assert layer_adaptive_counts(37, [100]) == [37]
    assert layer_adaptive_counts(95, [100]) == [95]


def test_k_beyond_the_capped_capacity_is_an_error():
    with pytest.raises(ValueError):
        layer_adaptive_counts(191, [100, 100])
    assert layer_adaptive_counts(190, [100, 100]) == [95, 95]
    with pytest.raises(ValueError):
        layer_adaptive_counts(target_count(0.96, 3000), [1000, 1000, 1000])


def test_floors_are_respected():
    rng = random.Random(2)
    checked = 0
    for sizes, k in _random_cases(3, 400):
        floor = [rng.randint(0, _cap(n)) for n in sizes]
        floor = [f if rng.random() < 0.6 else 0 for f in floor]
        if sum(floor) > k:
            continue
        counts = layer_adaptive_counts(k, sizes, floor)
        assert sum(counts) == k, (sizes, k, floor, counts)
        assert all(c >= f for c, f in zip(counts, floor)), (sizes, k, floor, counts)
        assert all(c <= _cap(n) for c, n in zip(counts, sizes))
        checked += 1
    assert checked > 100


def test_floor_at_k_returns_the_floor():
    assert layer_adaptive_counts(30, [100, 100, 100], [10, 20, 0]) == [10, 20, 0]


# --- the pruner with bitter4 --------------------------------------------------

def test_pruner_with_bitter4_hits_the_global_count_with_layer_adaptive_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 60), nn.ReLU(),
                          nn.Linear(60, 5))
    prunable = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    sizes = [p.numel() for _, p in prunable]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = Schedule("cubic-ramp", start=3, end=40, final=0.8, frequency=4)
    pruner = Pruner(prunable, schedule, build_method("state", "bitter4"), opt, layer_adaptive=True)
    g = torch.Generator().manual_seed(1)
    x_all, y_all = torch.randn(128, 10, generator=g), torch.randn(128, 5, generator=g)

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    n_updates = 0
    for step in range(1, 46):
        idx = torch.randint(0, 128, (16,), generator=g)
        batch = (x_all[idx], y_all[idx])
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pruner.observe(Observation(step, model, batch, loss_fn, loss.item()))
        pruner.after_backward()
        opt.step()
        floor = [int(m.sum()) for m in pruner.masks.pruned]
        update = pruner.after_step(step)
        per_layer = [int(m.sum()) for m in pruner.masks.pruned]
        if update is None:
            assert per_layer == floor
            continue
        n_updates += 1
        k = target_count(schedule.target(step), pruner.numel)
        assert update.pruned_count == update.target_count == k == sum(per_layer)
        assert per_layer == layer_adaptive_counts(k, sizes, floor)
        assert all(c >= f for c, f in zip(per_layer, floor))
        for (_, p), m in zip(prunable, pruner.masks.pruned):
            assert (p.detach()[m] == 0).all()
    assert n_updates == len(schedule.update_steps())
    final = [int(m.sum()) / n for m, n in zip(pruner.masks.pruned, sizes)]
    assert final[-1] > final[0]  # deeper layers are pruned more
    assert max(final) <= LAYER_CAP


def test_unreachable_target_is_refused_before_training_with_the_real_layer_sizes():
    # LeNet-5's first convolution has 150 weights: its 95% cap is 142 whole weights (94.7%),
    # so 0.95 passes the settings check (<= 0.95) but cannot be reached. Refused before step 1.
    from lenet5.model import LeNet5
    from lib.errors import KpruneError

    torch.manual_seed(0)
    model = LeNet5()
    prunable = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    sizes = [p.numel() for _, p in prunable]
    capacity = sum(_cap(n) for n in sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    unreachable = Schedule("cubic-ramp", start=1, end=10, final=0.95, frequency=3)
    assert target_count(0.95, sum(sizes)) > capacity
    with pytest.raises(KpruneError) as info:
        Pruner(prunable, unreachable, build_method("state", "bitter4"), opt, layer_adaptive=True)
    message = str(info.value)
    limit = float(message.rsplit("at most ", 1)[1])
    assert message.startswith("TARGET_SPARSITY 0.95 cannot be reached") and "capped at 0.95" in message
    assert f"{capacity:,} of {sum(sizes):,}" in message
    # The largest sparsity the message offers is accepted and really reached, to the weight.
    assert target_count(limit, sum(sizes)) <= capacity
    reachable = Schedule("one-shot", start=1, end=1, final=limit)
    pruner = Pruner(prunable, reachable, build_method("state", "bitter4"), opt, layer_adaptive=True)
    assert pruner.update(1).pruned_count == target_count(limit, sum(sizes))
    # Global selection has no cap: the same target is fine without layer-adaptive sparsity.
    Pruner(prunable, unreachable, build_method("state", "bitter3"), opt)
