"""ResNet trainer: ResNet-18/50 (CIFAR variant), CIFAR-10/100 and test accuracy.

Run by `make train` with flags derived from .config, or on its own:
`python -m resnet.train --help` lists every flag and its Kconfig default.
The dataset comes from `make data-cifar10` / `make data-cifar100`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lib.classification import cross_entropy, evaluate
from lib.cli import trainer_main
from lib.data.epochs import EpochSampler
from lib.data.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar, num_classes
from lib.pruning.calibration import sample_indices
from lib.pruning.units import UnitFamily, Units, consecutive
from lib.settings import Settings
from lib.train_loop import Task
from resnet.model import ResNet

EVAL_BATCH = 500
PAD = 4


def build_model(s: Settings) -> ResNet:
    return ResNet(int(s.resnet_depth), num_classes(s.resnet_dataset), width=s.resnet_width)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the batch padded by 4 (zeros after normalising) and random flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _normalised(images, dataset: str) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN[dataset]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD[dataset]).view(1, 3, 1, 1)
    return torch.from_numpy(images).float().div_(255.0).sub_(mean).div_(std)


TIED = "its output channels are tied by a residual add (left out: pruning one side alone would not remove the channel)"


def channel_units(model: ResNet) -> Units:
    """The filters whose output channels no residual add ties, with their BatchNorm channel.

    In a basic block that is conv1's filters (with bn1's scale and shift and
    conv2's matching input channels); in a bottleneck conv1's and conv2's.
    The stem, every block's last convolution and the shortcut convolutions
    write into the residual stream, whose channels are shared by every block
    of a stage: they are left out of the pool (recorded as such), and so is
    the classifier, whose rows are the logits.
    """
    families, left_out = [], {"conv1.weight": TIED, "fc.weight": "its rows are the logits and its inputs are "
                                                                 "residual-stream channels"}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for j, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{j}"
            convs = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]
            for conv, after in zip(convs, convs[1:]):  # every conv but the last, which feeds the residual add
                layer, bn, n = getattr(block, conv), getattr(block, "bn" + conv[-1]), getattr(block, conv).out_channels
                families.append(UnitFamily(f"{prefix}.{conv}", (
                    consecutive(f"{prefix}.{conv}.weight", layer.weight, 0, n),
                    consecutive(f"{prefix}.bn{conv[-1]}.weight", bn.weight, 0, n),
                    consecutive(f"{prefix}.bn{conv[-1]}.bias", bn.bias, 0, n),
                    consecutive(f"{prefix}.{after}.weight", getattr(block, after).weight, 1, n))))
            if isinstance(block.shortcut, torch.nn.Sequential):
                left_out[f"{prefix}.shortcut.0.weight"] = TIED
    return Units(families, left_out)


def build_task(s: Settings, device: torch.device) -> Task:
    data_dir = Path(s.data_dir)
    train_x, train_y = load_cifar(data_dir, s.resnet_dataset, "train")
    test_x, test_y = load_cifar(data_dir, s.resnet_dataset, "test")
    train_x, test_x = _normalised(train_x, s.resnet_dataset), _normalised(test_x, s.resnet_dataset)
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    model = build_model(s)
    gen = torch.Generator().manual_seed(s.seed)
    sampler = EpochSampler(len(train_y), s.batch_size, gen)  # the same generator also draws augmentations

    def next_batch():
        idx = sampler.next()
        x, y = train_x[idx], train_y[idx]
        if s.resnet_augment:
            x = augment(x, gen)
        if device.type == "cuda":  # each batch is a new tensor: pinned, so its copy overlaps compute
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def calibration_batches(n: int) -> list[tuple]:  # training images, not augmented, by the calibration generator
        return [(train_x[idx].to(device), train_y[idx].to(device))
                for idx in sample_indices(len(train_y), s.batch_size, n, s.seed)]

    # Convolution kernels and the classifier: BatchNorm scales and biases are not pruned.
    prunable = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
    return Task(name=f"resnet{s.resnet_depth}-{s.resnet_dataset}", model=model, prunable=prunable,
                group_of=lambda n: n.split(".")[0], units=channel_units(model), next_batch=next_batch,
                loss=cross_entropy, calibration_batches=calibration_batches,
                evaluate=lambda m: evaluate(m, test_x, test_y, EVAL_BATCH, device),
                data_state=sampler.state_dict, load_data_state=sampler.load_state_dict,
                items_per_step=s.batch_size, item_unit="samples", quality_key="val_accuracy",
                extra_summary={"dataset": s.resnet_dataset, "train_samples": len(train_y),
                               "test_samples": len(test_y), "steps_per_epoch": sampler.per_epoch})


def main(argv: list[str] | None = None) -> int:
    return trainer_main("resnet", build_task, argv, prog="python -m resnet.train",
                        description="Train ResNet-18/50 on CIFAR with kprune's shared loop, optimizers and pruning.")


if __name__ == "__main__":
    sys.exit(main())
