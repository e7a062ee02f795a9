"""Structure and scope settings: every combination either configures or is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.errors import ConfigError, KpruneError
from lib.kconfig import REPO_ROOT, apply_overrides, read_config, settings_from_kconfig
from lib.pruning.build import build_pruner
from lib.pruning.registry import SCOPES, STRUCTURES


def _settings(defconfig: str, *overrides: str):
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / defconfig)
    apply_overrides(kconf, seen, list(overrides))
    return settings_from_kconfig(kconf)


def _refused(defconfig: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        _settings(defconfig, *overrides)
    return str(info.value)


def test_defaults_are_unstructured_and_global_and_bitter4_means_layer_adaptive():
    s = _settings("gpt2-bitter7")
    assert (s.sparsity_structure, s.sparsity_scope, s.nm_n, s.block_rows) == ("unstructured", "global", None, None)
    assert _settings("gpt2-bitter4").sparsity_scope == "layer-adaptive"
    nm = _settings("gpt2-bitter7", "SPARSITY_STRUCTURE=nm")
    assert (nm.nm_n, nm.nm_m) == (2, 4)
    assert _settings("gpt2-magnitude", "PRUNING_METHOD=none").sparsity_structure is None


def test_nm_above_its_pattern_is_refused_with_the_largest_target_it_allows():
    msg = _refused("gpt2-bitter7", "SPARSITY_STRUCTURE=nm", "TARGET_SPARSITY=0.6")
    assert ("CONFIG_TARGET_SPARSITY: 0.6 is above 0.5 = (M-N)/M, the most 2:4 sparsity can prune (at most 2 of "
            "every 4 weights); set TARGET_SPARSITY to at most 0.5") in msg
    assert "0.75" in _refused("gpt2-bitter7", "SPARSITY_STRUCTURE=nm", "NM_N=1", "TARGET_SPARSITY=0.8")
    assert _settings("gpt2-bitter7", "SPARSITY_STRUCTURE=nm", "NM_N=1", "TARGET_SPARSITY=0.75").nm_n == 1
    assert _settings("gpt2-bitter7", "SPARSITY_STRUCTURE=nm", "NM_N=4", "NM_M=8").nm_m == 8


@pytest.mark.parametrize("overrides, expected", [
    (("NM_N=4",), "CONFIG_NM_N: 4 must be below NM_M (4)"),
    (("NM_M=6",), "CONFIG_NM_M: 6 is not a supported group length: use 4 or 8"),
])
def test_bad_n_m_is_refused(overrides, expected):
    assert expected in _refused("gpt2-bitter7", "SPARSITY_STRUCTURE=nm", *overrides)


def test_channel_by_row_and_a_scope_that_contradicts_bitter4_are_refused():
    assert "SPARSITY_SCOPE: row cannot be used with SPARSITY_STRUCTURE=channel" in _refused(
        "gpt2-bitter7", "SPARSITY_STRUCTURE=channel", "SPARSITY_SCOPE=row")
    msg = _refused("gpt2-bitter4", "SPARSITY_SCOPE=global")
    assert "global conflicts with bitter4, which is bitter3's score with layer-adaptive scope" in msg


def test_structure_options_need_their_structure():
    assert "NM_N" in _refused("gpt2-bitter7", "NM_N=1")  # nm not chosen: the value would not take


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("scope", SCOPES)
def test_every_structure_and_scope_configures_or_is_refused(structure, scope):
    """The Kconfig check and the pruner agree on every pair."""
    overrides = ["PRUNING_METHOD=magnitude", f"SPARSITY_STRUCTURE={structure}", f"SPARSITY_SCOPE={scope}"]
    if structure == "channel" and scope == "row":
        _refused("lenet5-magnitude", *overrides)
        return
    s = _settings("lenet5-magnitude", *overrides, "TARGET_SPARSITY=0.5")
    from lenet5.train import build_model, channel_units
    model = build_model(s)
    pool = [(n, p) for n, p in model.named_parameters() if n.endswith(".weight")]
    pruner, _ = build_pruner(s, pool, torch.optim.AdamW(model.parameters()), 1, units=channel_units(model))
    assert (pruner.structure.kind, pruner.scope) == (structure, scope)
    record = pruner.update(s.schedule_end)
    assert record.pruned_groups == record.target_groups > 0


def test_channel_without_units_is_a_clear_error():
    s = _settings("lenet5-magnitude", "SPARSITY_STRUCTURE=channel")
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(KpruneError, match="channel structure needs the model's units"):
        build_pruner(s, [("w", w)], torch.optim.AdamW([w]), 16)
