"""Sparsity structures x selection scopes on hand-made tensors and a tiny trained network.

Every structure (unstructured, nm, block, channel) with every scope it
accepts: exact group counts at every update of a gradual schedule, the
structure's pattern (N:M in every group, whole tiles, whole units across all
their slices, biases included), no revival, ties broken by the tie hash.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lib.errors import KpruneError
from lib.pruning.pruner import Pruner, layer_adaptive_counts, target_count
from lib.pruning.registry import LAYER_CAP
from lib.pruning.schedules import Schedule
from lib.pruning.scores import bitter7, magnitude
from lib.pruning.selection import tie_hash
from lib.pruning.scope import row_select
from lib.pruning.channel import Channel
from lib.pruning.structure import NM, Block, Structure, nm_cap_
from lib.pruning.units import UnitFamily, Units, attention_heads, consecutive

SCHEDULE = Schedule("linear", start=4, end=40, final=0.5, frequency=6)
SCOPES = ("global", "layer", "layer-adaptive", "row")


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _units(model: nn.Sequential) -> Units:
    fams = []
    for i, after in ((0, 2), (2, 4)):
        layer, nxt = model[i], model[after]
        n = layer.out_features
        fams.append(UnitFamily(f"{i}", (consecutive(f"{i}.weight", layer.weight, 0, n),
                                        consecutive(f"{i}.bias", layer.bias, 0, n),
                                        consecutive(f"{after}.weight", nxt.weight, 1, n))))
    return Units(fams)


def _structure(kind: str, model: nn.Module) -> Structure:
    return {"unstructured": Structure, "nm": lambda: NM(2, 4), "block": lambda: Block(4, 4),
            "channel": lambda: Channel(_units(model))}[kind]()


def _pool(model):
    return [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]


def _layer_groups(pruner: Pruner) -> list[torch.Tensor]:
    """Per layer, which groups are pruned, read back from the weights' bits (not the structure's state)."""
    s = pruner.structure
    masks = [m for m in pruner.masks.pruned]
    if s.kind in ("unstructured", "nm"):
        return [m.reshape(m.shape[0], -1) for m in masks]
    if s.kind == "block":
        out = []
        for m in masks:
            rows, cols = m.shape[0], m.numel() // m.shape[0]
            tiles = m.reshape(rows // 4, 4, cols // 4, 4).permute(0, 2, 1, 3).reshape(rows // 4, cols // 4, 16)
            assert (tiles.all(-1) == tiles.any(-1)).all(), "a tile is partly pruned"
            out.append(tiles.all(-1))
        return out
    out = []
    by_name = dict(zip(pruner.masks.names, masks))
    for family in s.units.families:
        flags = []
        for sl in family.slices:
            m = by_name[sl.name] if sl.name in by_name else (sl.param.detach() == 0)
            moved = m.movedim(sl.dim, 0)[sl.index]  # [units, per unit, ...]
            flags.append(moved.reshape(family.count, -1).all(1))
        assert all(torch.equal(flags[0], f) for f in flags), f"unit of {family.name} is not pruned whole"
        out.append(flags[0][None, :])
    return out


def _train(kind: str, scope: str, score=magnitude, steps: int = 48, seed: int = 0, schedule: Schedule = SCHEDULE):
    """A tiny regression run; checks every invariant at every step. Returns the pruner."""
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner = Pruner(_pool(model), schedule, score, optimizer, structure=_structure(kind, model), scope=scope)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(128, 8, generator=g), torch.randn(128, 4, generator=g)
    ever = None
    for step in range(1, steps + 1):
        idx = torch.randint(0, 128, (16,), generator=g)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        pruner.after_backward()
        optimizer.step()
        update = pruner.after_step(step)
        groups = _layer_groups(pruner)
        if update is not None:
            _check_counts(pruner, update, groups, schedule.target(step))
        flat = torch.cat([g_.reshape(-1) for g_ in groups])
        if ever is not None:
            assert not (ever & ~flat).any(), f"step {step}: a pruned {pruner.structure.group} was revived"
            ever |= flat
        else:
            ever = flat.clone()
        for p, m in zip(pruner.masks.params, pruner.masks.pruned):
            assert (p.detach()[m] == 0).all()
            for key in ("exp_avg", "exp_avg_sq"):
                assert (optimizer.state[p][key][m] == 0).all()
        for p, kept in pruner.masks.attached:  # biases of pruned units: zero, and their states too
            assert (p.detach()[~kept] == 0).all()
            for key in ("exp_avg", "exp_avg_sq"):
                assert (optimizer.state[p][key][~kept] == 0).all()
    return pruner


def _check_counts(pruner: Pruner, update, groups: list[torch.Tensor], sparsity: float) -> None:
    s, scope = pruner.structure, pruner.scope
    per_layer = [int(g.sum()) for g in groups]
    sizes = [g.numel() for g in groups]
    assert update.pruned_groups == sum(per_layer) == update.target_groups
    assert update.group == s.group
    assert update.pruned_count == pruner.masks.count() == update.target_count
    assert update.achieved_sparsity == pruner.masks.count() / pruner.numel
    if scope == "global":
        assert sum(per_layer) == target_count(sparsity, sum(sizes))
    elif scope == "layer":
        assert per_layer == [target_count(sparsity, n) for n in sizes]
    elif scope == "layer-adaptive":
        k = target_count(sparsity, sum(sizes))
        assert sum(per_layer) == k
        cap = min(LAYER_CAP, s.cap())
        assert all(c <= int(cap * n) for c, n in zip(per_layer, sizes))
    else:
        for g in groups:
            assert (g.sum(1) == target_count(sparsity, g.shape[1])).all(), "a row is off its count"
    if s.kind == "nm":
        for m in pruner.masks.pruned:
            per_group = m.reshape(m.shape[0], m.shape[1] // 4, 4, -1).sum(2)
            assert (per_group <= 2).all(), "more than M-N pruned in a group of M"


COMBOS = [(k, sc) for k, sc in itertools.product(("unstructured", "nm", "block", "channel"), SCOPES)
          if (k, sc) != ("channel", "row")]


@pytest.mark.parametrize("kind, scope", COMBOS, ids=[f"{k}-{s}" for k, s in COMBOS])
def test_every_structure_and_scope_is_exact_whole_and_never_revives(kind, scope):
    pruner = _train(kind, scope, score=bitter7)
    assert len(pruner.updates) == len(SCHEDULE.update_steps())
    assert pruner.updates[-1].target_sparsity == 0.5
    assert [u.target_groups for u in pruner.updates] == sorted(u.target_groups for u in pruner.updates)


def test_channel_by_row_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="channel unit is itself a whole row"):
        Pruner(_pool(model), SCHEDULE, magnitude, torch.optim.AdamW(model.parameters()),
               structure=Channel(_units(model)), scope="row")


def test_nm_reaches_the_full_2_of_4_pattern_exactly_at_half():
    pruner = _train("nm", "global")
    for m in pruner.masks.pruned:
        assert (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()
    assert pruner.masks.count() == pruner.numel // 2


@pytest.mark.parametrize("n, m", [(1, 4), (4, 8), (2, 4)])
def test_nm_cap_keeps_the_lowest_m_minus_n_of_each_group_with_ties_by_position(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    key = torch.randint(-5, 5, (6, 2 * m, 3), generator=g, dtype=torch.int32)  # [out, in, kernel]: many ties
    capped = key.clone().view(-1)
    nm_cap_(capped, key.shape, n, m)
    capped = capped.view(6, 2, m, 3)
    groups = key.view(6, 2, m, 3)
    for o, gi, k in itertools.product(range(6), range(2), range(3)):
        values = groups[o, gi, :, k].tolist()
        order = sorted(range(m), key=lambda j: (values[j], j))  # stable: position breaks ties
        expected = [values[j] if j in order[:m - n] else 2 ** 31 - 1 for j in range(m)]
        assert capped[o, gi, :, k].tolist() == expected


def test_nm_on_a_convolution_groups_input_channels_at_each_position():
    conv = nn.Conv2d(8, 4, 3)
    opt = torch.optim.AdamW(conv.parameters())
    pruner = Pruner([("w", conv.weight)], Schedule("one-shot", start=0, end=1, final=0.5), magnitude, opt,
                    structure=NM(2, 4))
    pruner.update(0)
    m = pruner.masks.pruned[0]  # [out 4, in 8, 3, 3]
    assert (m.view(4, 2, 4, 3, 3).sum(2) == 2).all()
    # and the groups are along the input channels: each kept pair are the larger |w| of their group
    w = conv.weight.detach()
    assert (w[m] == 0).all()


def test_structures_that_cannot_tile_a_layer_leave_it_out_and_say_why():
    a, b, c = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(8))
    d = nn.Parameter(torch.randn(8, 2, 2, 2))  # a conv kernel: [8, 2 * 2 * 2] is tiled by 4x4
    opt = torch.optim.AdamW([a, b, c, d])
    nm = Pruner([("a", a), ("b", b), ("c", c)], SCHEDULE, magnitude, opt, structure=NM(2, 4))
    assert nm.masks.names == ["b"]
    assert nm.excluded == [{"name": "a", "reason": "input dimension 6 is no multiple of M = 4"},
                           {"name": "c", "reason": "a 1-D parameter has no input dimension to group"}]
    assert nm.structure_summary()["structure_excluded"] == nm.excluded
    block = Pruner([("a", a), ("b", b), ("d", d)], SCHEDULE, magnitude, opt, structure=Block(4, 4))
    assert block.masks.names == ["d"] and block.numel == 64
    assert [e["name"] for e in block.excluded] == ["a", "b"]
    assert block.excluded[1]["reason"] == "[6, 8] is not tiled by 4x4"


def test_a_structure_that_leaves_nothing_is_a_clear_error():
    a = nn.Parameter(torch.randn(8, 6))
    with pytest.raises(KpruneError, match="SPARSITY_STRUCTURE=block leaves no prunable parameter: a: .8, 6. is "
                                          "not tiled by 4x4"):
        Pruner([("a", a)], SCHEDULE, magnitude, torch.optim.AdamW([a]), structure=Block(4, 4))


def test_block_scores_are_tile_means_and_tiles_go_whole():
    # Tile scores (means of |w|): [[1, 4], [3, 2]] -> at 50% the tiles with means 1 and 2 go, although
    # the tile of mean 3 holds the single smallest weight.
    w = torch.tensor([[1.0, 1.0, 4.0, 4.0], [1.0, 1.0, 4.0, 4.0],
                      [0.1, 5.9, 2.0, 2.0], [3.0, 3.0, 2.0, 2.0]])
    p = nn.Parameter(w.clone())
    pruner = Pruner([("w", p)], Schedule("one-shot", start=0, end=1, final=0.5), magnitude,
                    torch.optim.AdamW([p]), structure=Block(2, 2))
    record = pruner.update(0)
    assert (record.group, record.target_groups, record.pruned_groups, record.pruned_count) == ("tile", 2, 2, 8)
    assert pruner.masks.pruned[0].tolist() == [[True, True, False, False], [True, True, False, False],
                                               [False, False, True, True], [False, False, True, True]]


def test_channel_units_go_whole_with_their_bias_and_stay_zero_while_training():
    pruner = _train("channel", "layer", steps=48)
    model_params = {id(p) for p, _ in pruner.masks.attached}
    assert len(model_params) == 2  # the two hidden layers' biases
    for p, kept in pruner.masks.attached:
        assert (~kept).sum() > 0 and (p.detach()[~kept] == 0).all()
        assert (p.detach()[kept] != 0).all()  # kept biases train (they start at random values)


def test_channel_keeps_a_kept_bias_that_is_exactly_zero_training():
    # GPT-2 starts every bias at 0: the bias of a kept unit must still learn (w == 0 is no pruning signal).
    model = _model()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(_pool(model), Schedule("one-shot", start=1, end=2, final=0.25), magnitude, opt,
                    structure=Channel(_units(model)), scope="layer")
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for step in range(1, 6):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        pruner.after_backward()
        opt.step()
        pruner.after_step(step)
    for p, kept in pruner.masks.attached:
        assert (p.detach()[~kept] == 0).all()
        assert (p.detach()[kept] != 0).all()


def test_channel_unit_score_is_the_mean_over_all_its_slices():
    # Two units; unit 0 has small rows but large columns in the next layer, unit 1 the reverse.
    first, second = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.1, 0.1], [1.0, 1.0]]))
        second.weight.copy_(torch.tensor([[5.0, 0.5]]))
    units = Units([UnitFamily("h", (consecutive("a", first.weight, 0, 2), consecutive("ab", first.bias, 0, 2),
                                    consecutive("b", second.weight, 1, 2)))])
    pruner = Pruner([("a", first.weight), ("b", second.weight)], Schedule("one-shot", start=0, end=1, final=0.5),
                    magnitude, torch.optim.AdamW([*first.parameters(), *second.parameters()]),
                    structure=Channel(units))
    record = pruner.update(0)
    # means: unit 0 = (0.1 + 0.1 + 5.0) / 3 = 1.73, unit 1 = (1 + 1 + 0.5) / 3 = 0.83: unit 1 goes
    assert pruner.structure.pruned[0].tolist() == [False, True]
    assert first.weight.detach()[1].tolist() == [0.0, 0.0] and second.weight.detach()[0, 1] == 0.0
    assert first.bias.detach()[1] == 0.0 and first.bias.detach()[0] != 0.0
    assert (record.target_groups, record.pruned_groups, record.pruned_count, record.target_count) == (1, 1, 3, 3)


def test_attention_heads_own_their_q_k_v_rows():
    w = nn.Parameter(torch.zeros(3 * 8, 8))
    heads = attention_heads("c_attn", w, n_head=2, width=8)
    assert heads.index.tolist() == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19],
                                    [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]]


def test_row_select_takes_exactly_count_per_row_and_breaks_ties_by_the_tie_hash():
    keys = torch.tensor([[3, 1, 1, 1, 2], [0, 0, 0, 0, 0]], dtype=torch.int32)
    sel = row_select(keys, 2, first_index=100)
    assert sel.sum(1).tolist() == [2, 2]
    # row 0: two of the three tied 1s (pool indices 101-103), those whose indices hash lowest
    tied = tie_hash(torch.tensor([101, 102, 103]))
    assert sel[0].tolist() == [False, *(tied <= tied.sort().values[1]).tolist(), False]
    row = tie_hash(torch.arange(105, 110))
    assert sel[1].tolist() == (row <= row.sort().values[1]).tolist()
    assert not torch.equal(sel[1], torch.tensor([True, True, False, False, False]))  # not by position


@pytest.mark.parametrize("kind", ["nm", "block", "channel"])
def test_equal_scores_are_selected_by_the_tie_hash_the_same_way_twice(kind):
    def masks():
        model = _model()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
        pruner = Pruner(_pool(model), Schedule("one-shot", start=0, end=1, final=0.3), magnitude,
                        torch.optim.AdamW(model.parameters()), structure=_structure(kind, model))
        record = pruner.update(0)
        assert record.pruned_groups == record.target_groups
        return torch.cat([m.reshape(-1) for m in pruner.masks.pruned])
    first, second = masks(), masks()
    assert torch.equal(first, second)
    assert first.any() and not first.all()


def test_layer_adaptive_counts_honour_a_lower_cap():
    counts = layer_adaptive_counts(80, [64, 64, 64], cap=0.5)
    assert sum(counts) == 80 and max(counts) <= 32 and counts == sorted(counts)


def test_nm_target_above_the_pattern_is_refused_before_training():
    model = _model()
    with pytest.raises(KpruneError, match=r"TARGET_SPARSITY 0.6 cannot be reached with global nm sparsity: at "
                                          r"most 0.5 of the weights can be pruned"):
        Pruner(_pool(model), Schedule("one-shot", start=0, end=1, final=0.6), magnitude,
               torch.optim.AdamW(model.parameters()), structure=NM(2, 4))


def test_checkpoint_state_restores_pruned_units_and_their_biases():
    pruner = _train("channel", "global", steps=20)
    state = pruner.state_dict()
    model = _model()
    again = Pruner(_pool(model), SCHEDULE, magnitude, torch.optim.AdamW(model.parameters()),
                   structure=Channel(_units(model)))
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.structure.pruned, pruner.structure.pruned))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(again.masks.attached, pruner.masks.attached))


def test_attached_entries_of_pruned_units_get_no_gradient_whatever_the_loss():
    # A pruned unit's bias gets no gradient from the network itself (the next layer's columns are 0),
    # but any other loss term (a regulariser on biases, say) would move it: the masks must stop that.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(_pool(model), Schedule("one-shot", start=1, end=2, final=0.5), magnitude, opt,
                    structure=Channel(_units(model)), scope="layer")
    pruner.update(1)
    biases = [model[0].bias, model[2].bias]
    for step in range(2, 5):
        opt.zero_grad(set_to_none=True)
        (sum(b.sum() for b in biases) + model(torch.randn(4, 8)).sum()).backward()
        pruner.after_backward()
        for p, kept in pruner.masks.attached:
            assert (p.grad[~kept] == 0).all() and (p.grad[kept] != 0).all()
        opt.step()
    for p, kept in pruner.masks.attached:
        assert (~kept).sum() == p.numel() // 2 and (p.detach()[~kept] == 0).all()


def test_unit_scores_are_means_so_units_of_different_sizes_compare_fairly():
    # Family "wide": units of 2 weights, |w| 0.3 and 2; family "narrow": units of 1 weight, |w| 0.5 and 3.
    # At 25% one unit of the four goes: the lowest mean (0.3), not the lowest sum (0.5 < 0.6).
    wide, narrow = nn.Parameter(torch.tensor([[0.3, 0.3], [2.0, 2.0]])), nn.Parameter(torch.tensor([[0.5], [3.0]]))
    units = Units([UnitFamily("wide", (consecutive("wide", wide, 0, 2),)),
                   UnitFamily("narrow", (consecutive("narrow", narrow, 0, 2),))])
    pruner = Pruner([("wide", wide), ("narrow", narrow)], Schedule("one-shot", start=0, end=1, final=0.25),
                    magnitude, torch.optim.AdamW([wide, narrow]), structure=Channel(units))
    pruner.update(0)
    assert [s.tolist() for s in pruner.structure.pruned] == [[True, False], [False, False]]


def test_equal_tile_scores_are_taken_in_tie_hash_order_of_the_tile_index():
    a, b = nn.Parameter(torch.full((4, 8), 0.5)), nn.Parameter(torch.full((8, 4), 0.5))
    pruner = Pruner([("a", a), ("b", b)], Schedule("one-shot", start=0, end=1, final=0.5), magnitude,
                    torch.optim.AdamW([a, b]), structure=Block(2, 2))
    pruner.update(0)  # 8 + 8 tiles, all tied: the 8 whose pool indices 0..15 hash lowest
    hashes = tie_hash(torch.arange(16))
    expected = hashes <= hashes.sort().values[7]
    assert torch.cat([s.reshape(-1) for s in pruner.structure.pruned]).tolist() == expected.tolist()


def test_mask_memory_counts_the_structures_own_state():
    model = _model()
    plain = Pruner(_pool(model), SCHEDULE, magnitude, torch.optim.AdamW(model.parameters()))
    bits = plain.masks.state_bytes()
    block = Pruner(_pool(model), SCHEDULE, magnitude, torch.optim.AdamW(model.parameters()), structure=Block(4, 4))
    assert block.masks.state_bytes() == bits + (8 * 16 + 16 * 8 + 8 * 4) // 16  # one flag per 4x4 tile
    channel = Pruner(_pool(model), SCHEDULE, magnitude, torch.optim.AdamW(model.parameters()),
                     structure=Channel(_units(model)))
    assert channel.masks.state_bytes() == bits + (16 + 8) + (16 + 8)  # unit flags and the biases' kept masks


@pytest.mark.parametrize("shape", [(64, 96), (8, 16, 3, 3), (512, 1024)], ids=["linear", "conv", "threaded"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_the_c_nm_cap_is_the_torch_rule(shape, n, m, monkeypatch):
    """structure.nm_cap_ runs one C pass on CPUs; it must cap exactly what the torch passes cap, ties included."""
    from lib.pruning import structure as structure_module
    torch.manual_seed(0)
    keys = torch.randint(-3, 4, shape, dtype=torch.int32).view(-1)  # few values: many ties within groups
    by_c = keys.clone()
    structure_module.nm_cap_(by_c, torch.Size(shape), n, m)
    monkeypatch.setattr(structure_module, "nm_cap_native", lambda *args: False)
    by_torch = keys.clone()
    structure_module.nm_cap_(by_torch, torch.Size(shape), n, m)
    assert torch.equal(by_c, by_torch)
    capped = (by_c == torch.iinfo(torch.int32).max).view(shape[0], shape[1] // m, m, -1).sum(2)
    assert bool((capped == n).all())  # every group keeps exactly m - n selectable keys
