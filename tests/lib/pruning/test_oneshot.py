"""The calibrated one-shot methods: Wanda's score, SparseGPT's reconstruction, calibration's inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.errors import KpruneError
from lib.pruning.calibration import Calibration
from lib.pruning.methods import build_method
from lib.pruning.pruner import Pruner
from lib.pruning.schedules import Schedule
from lib.pruning.scores import ScoreContext
from lib.pruning.sparsegpt import spread
from lib.pruning.structure import NM, Structure

ONE_SHOT = Schedule("one-shot", start=0, end=0, final=0.5)


def _pruner(model: nn.Module, batches: list[torch.Tensor], method: str, schedule: Schedule = ONE_SHOT,
            structure: Structure | None = None, scope: str | None = None, **kw) -> Pruner:
    """A pruner over every weight matrix of `model`, calibrated on `batches` (inputs of the model)."""
    pool = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
    pruner = Pruner(pool, schedule, build_method(method, **kw), torch.optim.SGD(model.parameters(), lr=0.1),
                    structure=structure, scope=scope)
    pruner.calibration = Calibration(model, pruner.masks.names, pruner.masks.params, lambda n: [(x,) for x in batches],
                                     len(batches), lambda m, b: m(b[0]), method)
    return pruner


# ------------------------------------------------------------------ Wanda

def _wanda_layer() -> tuple[nn.Linear, torch.Tensor]:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.5]]))
    # Column j's mean square over the two rows: 16, 1, 0.25, so its norm is 4, 1, 0.5.
    return layer, torch.tensor([[4.0, 1.0, 0.5], [-4.0, 1.0, -0.5]])


def test_wanda_scores_are_weight_magnitude_times_input_norm():
    layer, x = _wanda_layer()
    pruner = _pruner(layer, [x], "wanda", scope="row")
    method = pruner.method
    method.inputs = pruner.calibration("norms")
    out = torch.empty(2, 3)
    method.score(0, layer.weight.detach(), {}, out, ScoreContext(step=0))
    # by hand: |w| * (4, 1, 0.5)
    assert out.tolist() == [[1 * 4.0, 2 * 1.0, 3 * 0.5], [3 * 4.0, 1 * 1.0, 2.5 * 0.5]]


def test_wanda_prunes_per_row_by_score_not_by_magnitude():
    layer, x = _wanda_layer()
    pruner = _pruner(layer, [x], "wanda", schedule=Schedule("one-shot", start=0, end=0, final=1 / 3), scope="row")
    pruner.update(0)
    # Row 0 scores 4, 2, 1.5: its largest weight (3) goes, where magnitude would drop the 1. Row 1: 12, 1, 1.25.
    assert pruner.masks.pruned_mask(0).tolist() == [[False, False, True], [False, True, False]]
    assert layer.weight.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 2.5]]
    assert pruner.method.inputs is None  # the statistics are freed after the update


@pytest.mark.parametrize("method, same", [("wanda", True), ("magnitude", False)])
def test_a_rescaling_that_keeps_the_function_leaves_wandas_choice_and_fools_magnitude(method, same):
    """scripts/rescale_inputs.py's transformation on LayerNorm -> Linear: outputs equal, inputs spread like
    outlier features. Wanda's |W|*||X|| is unchanged by it (the same weights pruned); magnitude's choice moves."""
    from scripts.rescale_inputs import rescale_

    def model():
        torch.manual_seed(0)
        norm, layer = nn.LayerNorm(32), nn.Linear(32, 16)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        return nn.Sequential(norm, layer)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    plain, scaled = model(), model()
    block = type("Block", (), {"ln_1": scaled[0], "attn": type("A", (), {"c_attn": scaled[1]})(),
                               "ln_2": nn.LayerNorm(1), "mlp": type("M", (), {"c_fc": nn.Linear(1, 1)})()})()
    rescale_(type("GPT", (), {"blocks": [block]})(), sigma=1.0, seed=0)
    assert torch.allclose(plain(x), scaled(x), atol=1e-5)  # the same function
    masks = []
    for m in (plain, scaled):
        pruner = _pruner(m[1], [m[0](x).detach()], method, scope="row")
        pruner.update(0)
        masks.append(pruner.masks.pruned_mask(0))
    assert masks[0].sum() == masks[1].sum() == 16 * 16
    assert torch.equal(masks[0], masks[1]) is same


def test_convolution_inputs_are_read_in_the_weight_column_order():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=(2, 3), stride=2, padding=1, bias=False)
    x = torch.randn(2, 2, 5, 4)
    pruner = _pruner(conv, [x], "wanda")
    [stats] = pruner.calibration("norms")
    # Every patch, written out position by position: column (c, ky, kx) of weight.view(3, -1).
    padded = F.pad(x, (1, 1, 1, 1))
    want, count = torch.zeros(2 * 2 * 3), 0
    for b in range(2):
        for oy in range(0, padded.shape[2] - 2 + 1, 2):
            for ox in range(0, padded.shape[3] - 3 + 1, 2):
                want += padded[b, :, oy:oy + 2, ox:ox + 3].reshape(-1).square()
                count += 1
    assert stats.count == count and torch.allclose(stats.sums, want)


@pytest.mark.parametrize("kind", ["unstructured", "nm", "block", "channel"])
def test_wanda_prunes_exactly_under_every_structure_with_convolutions_too(kind):
    from lenet5.model import LeNet5
    from lenet5.train import channel_units
    from lib.pruning.build import build_structure
    picked = {}
    for method in ("magnitude", "wanda"):
        torch.manual_seed(0)
        model = LeNet5()
        structure = build_structure(kind, nm_n=2, nm_m=4, block_rows=2, block_cols=2,
                                    units=channel_units(model) if kind == "channel" else None)
        images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * torch.rand(1, 1, 28, 1)
        update = _pruner(model, [images], method, structure=structure, scope="global").update(0)
        assert update.pruned_groups == update.target_groups > 0
        picked[method] = [m.clone() for m in structure.masks.pruned]
    assert any(not torch.equal(a, b) for a, b in zip(picked["magnitude"], picked["wanda"]))


# ------------------------------------------------------------------ SparseGPT

def _correlated(seed: int = 0, inputs: int = 64, rows: int = 2048) -> torch.Tensor:
    """Inputs whose 64 columns mix 8 hidden factors, plus a little noise: strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, generator=g) @ torch.randn(8, inputs, generator=g) \
        + 0.05 * torch.randn(rows, inputs, generator=g)


def _output_error(method: str, structure: Structure | None) -> tuple[float, Pruner, nn.Linear]:
    torch.manual_seed(1)
    layer = nn.Linear(64, 32, bias=False)
    x = _correlated()
    before = layer(x).detach()
    pruner = _pruner(layer, list(x.split(512)), method, structure=structure,
                     scope="layer" if method == "sparsegpt" else None)
    pruner.update(0)
    return float((layer(x).detach() - before).norm() / before.norm()), pruner, layer


@pytest.mark.parametrize("structure", [None, NM(2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude(structure):
    magnitude_error, _, _ = _output_error("magnitude", structure)
    error, pruner, layer = _output_error("sparsegpt", structure)
    assert error < 0.5 * magnitude_error, (error, magnitude_error)  # measured: 0.25x (unstructured), 0.30x (2:4)
    mask = pruner.masks.pruned_mask(0)
    assert pruner.masks.pruned_count == int(mask.sum()) == 1024 == int((layer.weight == 0).sum())
    if structure is not None:  # the full 2:4 pattern: exactly two of every four inputs pruned in every row
        assert (mask.view(32, 16, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("structure", [None, NM(2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_on_a_convolution_keeps_the_pattern_along_input_channels(structure):
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        torch.manual_seed(5)
        conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        # Correlated channels: 8 channels mixing 2 smooth maps.
        g = torch.Generator().manual_seed(6)
        x = torch.einsum("bkhw,kc->bchw", torch.randn(32, 2, 8, 8, generator=g), torch.randn(2, 8, generator=g))
        before = conv(x).detach()
        pruner = _pruner(conv, [x], method, structure=structure, scope="layer" if method == "sparsegpt" else None)
        pruner.update(0)
        errors[method] = float((conv(x).detach() - before).norm() / before.norm())
    mask = pruner.masks.pruned_mask(0)  # [out, in, kh, kw]
    assert int(mask.sum()) == pruner.masks.pruned_count == 6 * 8 * 9 // 2 == int((conv.weight == 0).sum())
    if structure is not None:  # 2 of every 4 consecutive input channels, at each output channel and kernel position
        assert (mask.view(6, 2, 4, 3, 3).sum(2) == 2).all()
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


def _two_layers() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))


@pytest.mark.parametrize("structure", [None, NM(2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_gradual_updates_are_exact_and_never_revive(structure):
    model = _two_layers()
    pruner = _pruner(model, list(_correlated(3).split(512)), "sparsegpt",
                     schedule=Schedule("linear", start=0, end=2, final=0.5, frequency=1),
                     structure=structure, scope="layer", sparsegpt_block_size=20)  # last blocks shorter
    first = pruner.update(1)
    masks = [m.clone() for m in pruner.masks.pruned]
    second = pruner.update(2)
    for before, after, p in zip(masks, pruner.masks.pruned, pruner.masks.params):
        assert not (before & ~after).any()  # pruned stays pruned
        assert (p[after] == 0).all()  # and exactly zero, though the OBS updates moved other weights
    assert [int(m.sum()) for m in masks] == [round(0.25 * 64 * 48), round(0.25 * 48 * 16)]
    assert [int(m.sum()) for m in pruner.masks.pruned] == [64 * 48 // 2, 48 * 16 // 2]
    assert first.pruned_count == first.target_count and second.pruned_count == second.target_count
    if structure is not None:
        assert all((m.view(m.shape[0], -1, 4).sum(-1) <= 2).all() for m in pruner.masks.pruned)


def test_sparsegpt_keeps_dead_inputs_weights_and_prunes_exactly():
    layer = nn.Linear(16, 8, bias=False)
    x = _correlated(4, inputs=16, rows=256)
    x[:, 3] = 0.0  # a dead input: H_33 = 0
    pruner = _pruner(layer, [x], "sparsegpt", scope="layer", sparsegpt_block_size=8)
    pruner.update(0)
    assert torch.isfinite(layer.weight).all() and pruner.masks.pruned_count == 64 == int((layer.weight == 0).sum())


def test_the_inverse_hessian_factor_is_dampened_and_gives_dead_inputs_the_mean_diagonal():
    from lib.pruning.sparsegpt import inverse_hessian_factor
    # H/n = [[4, 2], [2, 2]] plus 0.5 x mean diagonal (3) = [[5.5, 2], [2, 3.5]]; its inverse by hand:
    u = inverse_hessian_factor(torch.tensor([[8.0, 4.0], [4.0, 4.0]]), 2.0, 0.5, "layer")
    det = 5.5 * 3.5 - 2.0 * 2.0
    assert torch.allclose(u.T @ u, torch.tensor([[3.5, -2.0], [-2.0, 5.5]]) / det)
    assert u[1, 0] == 0  # upper triangular
    # A dead input (H_11 = 0) gets the mean live diagonal (2), then 0.01 x the new mean (2) is added to both.
    u = inverse_hessian_factor(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), 1.0, 0.01, "layer")
    assert torch.allclose(u.T @ u, torch.eye(2) / 2.02)


def test_block_size_and_dampening_come_from_the_settings():
    from lib.pruning.build import build_pruner
    from lib.settings import Settings
    layer = nn.Linear(8, 4)
    s = Settings(seed=0, pruning_method="sparsegpt", target_sparsity=0.5, schedule="one-shot", schedule_start=0,
                 sparsity_scope="layer", sparsegpt_block_size=16, sparsegpt_dampening=0.25, calibration_batches=3)
    pruner, _ = build_pruner(s, [("weight", layer.weight)], torch.optim.SGD(layer.parameters(), lr=0.1), 36)
    assert (pruner.method.block_size, pruner.method.dampening) == (16, 0.25)


def test_spread_is_exact_within_floors_and_caps():
    counts = spread(50, [40, 40, 20], [30, 0, 0], [40, 40, 10])
    assert sum(counts) == 50 and counts[0] >= 30 and counts[2] <= 10
    assert spread(30, [10, 10, 10], [0, 0, 0], [10, 10, 10]) == [10, 10, 10]
    assert spread(2, [10, 10, 10], [0, 0, 0], [10, 10, 10]) == [1, 1, 0]
    with pytest.raises(ValueError):
        spread(5, [10, 10], [3, 3], [10, 10])


def test_sparsegpt_refuses_other_scopes_and_structures():
    from lib.pruning.structure import Block
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="SPARSITY_SCOPE=global cannot be used with PRUNING_METHOD=sparsegpt"):
        _pruner(layer, [torch.randn(4, 8)], "sparsegpt", scope="global")
    with pytest.raises(ValueError, match="SPARSITY_STRUCTURE=block cannot be used with PRUNING_METHOD=sparsegpt"):
        _pruner(layer, [torch.randn(4, 8)], "sparsegpt", structure=Block(2, 2), scope="layer")


# ------------------------------------------------------------------ calibration

def test_a_parameter_no_hook_can_see_is_a_configuration_error():
    from gpt2.model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=64))
    pool = [("blocks.0.mlp.c_fc.weight", model.blocks[0].mlp.c_fc.weight), ("wte.weight", model.wte.weight)]
    with pytest.raises(KpruneError, match=r"wte\.weight is pruned by wanda.*used by wte \(Embedding\), lm_head "
                                          r"\(Linear\).*PRUNE_EMBEDDINGS=n"):
        Calibration(model, [n for n, _ in pool], [p for _, p in pool], lambda n: [], 1, lambda m, b: m(*b), "wanda")


def test_calibration_runs_in_eval_mode_and_restores_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4))
    model.train()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    pruner = _pruner(model, [torch.randn(8, 4)], "wanda")
    pruner.calibration("norms")
    assert seen == [False] and model.training


def test_hessian_is_the_sum_of_input_outer_products():
    layer = nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    pruner = _pruner(layer, [x], "sparsegpt", scope="layer")
    [stats] = pruner.calibration("hessian")
    assert stats.count == 2 and stats.sums.tolist() == [[1.0, 2.0, 0.0], [2.0, 5.0, -1.0], [0.0, -1.0, 1.0]]
    assert math.isclose(float(stats.sums.trace()), float(x.square().sum()))


# ------------------------------------------------------------------ configuration: prune-only runs and refusals

def _errors(*flags: str, model: str = "gpt2") -> list[str]:
    from lib.cli import build_parser
    from lib.kconfig import settings_errors
    from lib.settings import settings_from_namespace
    return settings_errors(settings_from_namespace(build_parser(model, prog="x", description="").parse_args(flags)))


PRUNE_ONLY = ("--max-iters", "0", "--schedule", "one-shot", "--schedule-start", "0")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_prune_only_run_is_valid_with_a_method_that_needs_no_training(method):
    # Flags take their defaults from the Kconfig tree as a whole (global scope): sparsegpt's layer scope is explicit.
    assert _errors("--pruning-method", method, *PRUNE_ONLY, "--sparsity-scope", "layer") == []


@pytest.mark.parametrize("flags, wrong", [
    (("--pruning-method", "movement", *PRUNE_ONLY), "PRUNING_METHOD=movement scores from training"),
    (("--pruning-method", "spt", *PRUNE_ONLY), "PRUNING_METHOD=spt scores from training"),
    (("--pruning-method", "state", "--optimizer", "adamwprune", *PRUNE_ONLY), "PRUNING_METHOD=state scores"),
    (("--pruning-method", "none", "--max-iters", "0"), "PRUNING_METHOD=none prunes nothing"),
    (("--pruning-method", "wanda", "--max-iters", "0", "--schedule", "linear", "--schedule-start", "0",
      "--schedule-end", "100"), "SCHEDULE=linear"),
    (("--pruning-method", "wanda", "--max-iters", "0", "--schedule", "one-shot", "--schedule-start", "5"),
     "SCHEDULE=one-shot with SCHEDULE_START=5"),
])
def test_a_prune_only_run_is_refused_otherwise_in_one_error_that_says_what_to_set(flags, wrong):
    errors = _errors(*flags)
    assert len(errors) == 1, errors
    assert errors[0].startswith("--max-iters: ") and wrong in errors[0]
    assert "SCHEDULE=one-shot and SCHEDULE_START=0" in errors[0] and "magnitude, sparsegpt, wanda" in errors[0]


def test_calibrated_methods_refuse_the_embeddings_and_sparsegpt_its_other_scopes_and_structures():
    [error] = _errors("--pruning-method", "wanda", "--prune-embeddings")
    assert error.startswith("--prune-embeddings: ") and "set PRUNE_EMBEDDINGS=n" in error
    [error] = _errors("--pruning-method", "sparsegpt", "--sparsity-scope", "global")
    assert error.startswith("--sparsity-scope: ") and "set SPARSITY_SCOPE=layer" in error
    [error] = _errors("--pruning-method", "sparsegpt", "--sparsity-structure", "channel")
    assert "set SPARSITY_STRUCTURE to unstructured or nm" in error
    [error] = _errors("--pruning-method", "sparsegpt", "--sparsity-structure", "nm", "--sparsegpt-block-size", "10",
                      "--sparsity-scope", "layer")
    assert error.startswith("--sparsegpt-block-size: ") and "10 is no multiple of NM_M (4)" in error
    # Wanda takes any scope and structure; row is only its default.
    assert _errors("--pruning-method", "wanda", "--sparsity-scope", "global", "--sparsity-structure", "block") == []
