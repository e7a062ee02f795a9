"""LeNet-5 trainer: the model, the bundled MNIST and test accuracy.

Run by `make train` with flags derived from .config, or on its own:
`python -m lenet5.train --help` lists every flag and its Kconfig default.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lenet5.model import LeNet5
from lib.classification import cross_entropy, evaluate
from lib.cli import trainer_main
from lib.data.epochs import EpochSampler
from lib.data.idx import load_mnist
from lib.pruning.calibration import sample_indices
from lib.pruning.units import UnitFamily, Units, consecutive
from lib.settings import Settings
from lib.train_loop import Task

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
EVAL_BATCH = 1000


def _to_tensors(images, labels, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    return x.to(device), torch.from_numpy(labels).to(device)


def build_model(s: Settings) -> LeNet5:
    return LeNet5()


def channel_units(model: LeNet5) -> Units:
    """Each conv filter and hidden neuron with its bias and the next layer's matching inputs.

    conv2's filters feed fc1 through the flatten: filter j owns fc1's input
    columns j*25 ... j*25+24 (its 5x5 map, channel-major). fc3's outputs are
    the logits, never units.
    """
    m = model
    spatial = m.fc1.in_features // m.conv2.out_channels
    families = []
    for name, layer, bias, after, per in (("conv1", m.conv1, "conv1.bias", "conv2", 1),
                                          ("conv2", m.conv2, "conv2.bias", "fc1", spatial),
                                          ("fc1", m.fc1, "fc1.bias", "fc2", 1), ("fc2", m.fc2, "fc2.bias", "fc3", 1)):
        count = layer.weight.shape[0]
        families.append(UnitFamily(name, (
            consecutive(f"{name}.weight", layer.weight, 0, count),
            consecutive(bias, layer.bias, 0, count),
            consecutive(f"{after}.weight", getattr(m, after).weight, 1, count, per))))
    return Units(families)


def build_task(s: Settings, device: torch.device) -> Task:
    mnist = Path(s.data_dir) / "mnist"
    train_x, train_y = _to_tensors(*load_mnist(mnist, "train"), device)
    test_x, test_y = _to_tensors(*load_mnist(mnist, "test"), device)
    model = build_model(s)
    sampler = EpochSampler(len(train_y), s.batch_size, torch.Generator().manual_seed(s.seed))

    def next_batch():
        idx = sampler.next().to(device)
        return train_x[idx], train_y[idx]

    def calibration_batches(n: int) -> list[tuple]:  # training images, by the calibration generator
        return [(train_x[idx.to(device)], train_y[idx.to(device)])
                for idx in sample_indices(len(train_y), s.batch_size, n, s.seed)]

    prunable = [(n, p) for n, p in model.named_parameters() if n.endswith(".weight")]
    return Task(name="lenet5", model=model, prunable=prunable, group_of=lambda n: n.split(".")[0],
                units=channel_units(model),
                next_batch=next_batch, loss=cross_entropy, calibration_batches=calibration_batches,
                evaluate=lambda m: evaluate(m, test_x, test_y, EVAL_BATCH, device),
                data_state=sampler.state_dict, load_data_state=sampler.load_state_dict, items_per_step=s.batch_size,
                item_unit="samples", quality_key="val_accuracy",
                extra_summary={"dataset": "mnist", "train_samples": len(train_y), "test_samples": len(test_y),
                               "steps_per_epoch": sampler.per_epoch})


def main(argv: list[str] | None = None) -> int:
    return trainer_main("lenet5", build_task, argv, prog="python -m lenet5.train",
                        description="Train LeNet-5 on MNIST with kprune's shared loop, optimizers and pruning.")


if __name__ == "__main__":
    sys.exit(main())
