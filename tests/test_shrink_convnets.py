"""The physically smaller LeNet-5 and ResNet (lenet5/, resnet/shrink.py) compute what the channel-pruned ones do.

Units are pruned the way channel structure prunes them (lib/pruning/channel.py):
every entry a unit's slices name is zeroed (its filter or neuron, its bias or
BatchNorm scale and shift, the next layer's matching input columns), half of
each layer's units as SPARSITY_SCOPE=layer does. A few more units lose only
their output columns, their own weights, bias and BatchNorm shift staying
non-zero: nothing of them reaches the output, so they go too. Inputs are real
MNIST digits (for ResNet padded to 32x32 and repeated over the three colour channels).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lenet5.model import LeNet5
from lenet5.shrink import shrink as shrink_lenet
from lenet5.train import EVAL_BATCH, _to_tensors
from lenet5.train import channel_units as lenet_units
from lib.classification import evaluate
from lib.data.idx import load_mnist
from lib.export import final_model_files, read_final_model
from lib.kconfig import REPO_ROOT, apply_overrides, read_config, write_config
from lib.pruning.units import Units
from resnet.model import ResNet
from resnet.shrink import shrink as shrink_resnet
from resnet.train import channel_units as resnet_units
from scripts import evaluate as evaluate_script
from scripts import export

LENET_PARAMS = 61_706
# Half of each layer's units pruned, one more conv2 filter and fc1 neuron losing only their output columns:
# widths 3, 8 - 1, 60 - 1, 42 = conv1 3*26 + conv2 7*(3*25+1) + fc1 59*(7*25+1) + fc2 42*60 + fc3 10*43.
LENET_SMALL = 3 * 26 + 7 * 76 + 59 * 176 + 42 * 60 + 10 * 43


def mnist(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist(REPO_ROOT / "data" / "mnist", "test")
    return _to_tensors(images[:count], labels[:count], torch.device("cpu"))


def as_cifar(x: torch.Tensor) -> torch.Tensor:
    """MNIST digits shaped as CIFAR images: 32x32, three channels."""
    return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


@torch.no_grad()
def prune_units(units: Units, seed: int, outputs_only: dict[str, int]) -> dict[int, torch.Tensor]:
    """Half of each family's units pruned whole, and `outputs_only[family]` more losing only their output
    columns; per parameter (by id), which entries the removed units own (what a smaller model lacks)."""
    gen = torch.Generator().manual_seed(seed)
    owned: dict[int, torch.Tensor] = {}
    for family in units.families:
        order = torch.randperm(family.count, generator=gen)
        half, extra = family.count // 2, outputs_only.get(family.name, 0)
        whole, columns = order[:half], order[half:half + extra]
        for s in family.slices:
            s.param.index_fill_(s.dim, s.index[whole].flatten(), 0.0)
            if s.dim == 1:
                s.param.index_fill_(s.dim, s.index[columns].flatten(), 0.0)
            mask = owned.setdefault(id(s.param), torch.zeros_like(s.param, dtype=torch.bool))
            mask.index_fill_(s.dim, s.index[order[:half + extra]].flatten(), True)
    return owned


def pruned_lenet() -> tuple[LeNet5, int]:
    """LeNet-5 with whole units pruned (and unstructured zeros besides); the parameter count its units own."""
    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        for layer in (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3):
            layer.bias.add_(0.05)  # no bias zero: a kept unit's bias must survive, a removed one's must go
    owned = prune_units(lenet_units(model), 1, {"conv2": 1, "fc1": 1})
    with torch.no_grad():
        model.fc2.weight.mul_(torch.rand(model.fc2.weight.shape) > 0.3)  # scattered zeros stay as they are
    return model, sum(int(m.sum()) for m in owned.values())


def pruned_resnet(depth: int) -> tuple[ResNet, int]:
    """A narrow ResNet with realistic BatchNorm statistics and shifts, block-internal units pruned."""
    torch.manual_seed(0)
    model = ResNet(depth, 10, width=8)
    x, _ = mnist(64)
    model.train()
    with torch.no_grad():
        for batch in as_cifar(x).split(32):
            model(batch)  # running means and variances of real activations
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)  # a shift a removed channel would pass on, were its columns not zero
    owned = prune_units(resnet_units(model), 2, {"layer1.0.conv1": 1, "layer3.1.conv1": 2, "layer1.0.conv2": 1})
    return model.eval(), sum(int(m.sum()) for m in owned.values())


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet5_smaller_model_has_the_kept_widths_and_the_masked_models_outputs():
    model, owned = pruned_lenet()
    small = shrink_lenet(model)
    assert [small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features,
            small.fc2.out_features] == [3, 7, 59, 42]
    assert small.fc1.in_features == 7 * 25  # the flatten: 25 fc1 inputs per kept conv2 filter
    assert params(model) == LENET_PARAMS and params(small) == LENET_SMALL == LENET_PARAMS - owned
    x, _ = mnist(1000)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_smaller_model_keeps_the_residual_stream_and_the_masked_models_outputs(depth):
    model, owned = pruned_resnet(depth)
    small = shrink_resnet(model)
    blocks = [b for stage in (small.layer1, small.layer2, small.layer3, small.layer4) for b in stage]
    full = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    for b, f in zip(blocks, full):
        # half of each inner conv's filters stay (fewer where only output columns were zeroed); the last conv of
        # the block writes all of its residual channels, as do the stem and the shortcuts
        inner = [c for c in ("conv1", "conv2", "conv3") if hasattr(f, c)][:-1]
        for c in inner:
            assert getattr(b, c).out_channels <= getattr(f, c).out_channels // 2 + 1
        last = "conv3" if hasattr(f, "conv3") else "conv2"
        assert getattr(b, last).out_channels == getattr(f, last).out_channels
        assert type(b.shortcut) is type(f.shortcut)
    assert small.layer1[0].conv1.out_channels == 8 // 2 - 1 and small.layer3[1].conv1.out_channels == 32 // 2 - 2
    assert small.layer1[0].bn1.running_mean.shape == (3,)
    assert params(small) == params(model) - owned
    x, _ = mnist(32)
    with torch.no_grad():
        assert (small(as_cifar(x)) - model(as_cifar(x))).abs().max().item() <= 1e-5


def run_dir_with(model: torch.nn.Module, name: str, tmp_path, defconfig: str, *overrides: str):
    """A run directory as a run leaves it: its final model and its config."""
    for file, data in final_model_files(model, name, 24).items():
        (tmp_path / file).write_bytes(data)
    kconf, seen = read_config(REPO_ROOT / "defconfigs" / defconfig)
    apply_overrides(kconf, seen, [f"DATA_DIR={REPO_ROOT / 'data'}", "DEVICE=cpu", *overrides])
    write_config(kconf, tmp_path / "config")
    return tmp_path


@pytest.mark.slow  # two evaluations of the whole MNIST test set
def test_make_export_writes_the_smaller_lenet5_and_make_evaluate_gives_the_runs_evaluation(tmp_path, capsys):
    model, _ = pruned_lenet()
    run = run_dir_with(model, "lenet5", tmp_path, "lenet5-bitter7-channel")
    assert export.main(["--results", str(run)]) == 0
    out = capsys.readouterr()
    small_dir = run / "export" / "small"
    assert f"wrote: {small_dir / 'model.safetensors'}\nwrote: {small_dir / 'config'}\n" in out.out
    assert f"smaller model: conv1 3, conv2 7, fc1 59, fc2 42; parameters 61,706 -> {LENET_SMALL:,}" in out.err
    assert (small_dir / "config").read_bytes() == (run / "config").read_bytes()

    # What the trainer's last evaluation gives for the masked model: the whole MNIST test set.
    x, y = mnist(10_000)
    with torch.no_grad():
        expected = evaluate(model, x, y, EVAL_BATCH, torch.device("cpu"))
    results = []
    for directory in (run, small_dir):
        assert evaluate_script.main(["--results", str(directory)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    masked, small = results
    assert masked == {"results": str(run), "model": "lenet5", "step": 24, "params": LENET_PARAMS, **expected}
    assert small["params"] == LENET_SMALL and small["val_accuracy"] == expected["val_accuracy"]
    assert abs(small["val_loss"] - expected["val_loss"]) <= 1e-6


def test_make_export_writes_the_smaller_resnet_with_its_batchnorm_statistics(tmp_path, capsys):
    model, owned = pruned_resnet(18)
    run = run_dir_with(model, "resnet18-cifar10", tmp_path, "resnet18-bitter7", "SPARSITY_STRUCTURE=channel")
    assert export.main(["--results", str(run)]) == 0
    assert "smaller model: inner channels per block [[3], [4], [8], [8], [16], [14], [32], [32]]" in \
        capsys.readouterr().err
    small = export.model_from_final(read_final_model(run / "export" / "small"), run)
    assert params(small) == params(model) - owned
    x, _ = mnist(32)
    with torch.no_grad():
        assert (small(as_cifar(x)) - model(as_cifar(x))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["lenet5", "resnet"])
def test_no_smaller_model_without_a_whole_unit_pruned(kind, tmp_path, capsys):
    torch.manual_seed(3)
    model = LeNet5() if kind == "lenet5" else ResNet(18, 10, width=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand(p.shape) > 0.5)  # 50% unstructured: no unit's output columns all zero
    name = "lenet5" if kind == "lenet5" else "resnet18-cifar10"
    run = run_dir_with(model, name, tmp_path, "lenet5-bitter7" if kind == "lenet5" else "resnet18-bitter7")
    assert export.main(["--results", str(run)]) == 0
    out = capsys.readouterr()
    units = "conv filter or fc neuron" if kind == "lenet5" else "block-internal conv filter"
    assert out.err == f"no whole {units} is pruned: no smaller model to write\n"
    assert out.out.splitlines() == [f"wrote: {run / 'export' / f}" for f in ("model.safetensors", "config",
                                                                            "shape.json")]
    assert not (run / "export" / "small").exists()


def test_a_layer_whose_every_unit_is_pruned_keeps_one_that_adds_nothing():
    """Global scope may prune a whole family: torch's BatchNorm cannot be 0 wide, so one dead channel stays."""
    model, _ = pruned_resnet(18)
    with torch.no_grad():
        for s in next(f for f in resnet_units(model).families if f.name == "layer2.1.conv1").slices:
            s.param.index_fill_(s.dim, s.index.flatten(), 0.0)
    small = shrink_resnet(model)
    assert small.layer2[1].conv1.out_channels == 1 and small.layer2[1].bn1.num_features == 1
    assert small.layer2[0].conv1.out_channels == 8  # its neighbour: half of 16
    x, _ = mnist(32)
    with torch.no_grad():
        assert (small(as_cifar(x)) - model(as_cifar(x))).abs().max().item() <= 1e-5
