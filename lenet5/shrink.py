"""A physically smaller LeNet-5: the conv filters and fc neurons pruning removed whole, taken out.

The units are the ones channel pruning uses (lenet5/train.py
`channel_units`): a conv1 filter with its bias and its input channel of
conv2; a conv2 filter with its bias and the 25 input columns of fc1 that its
5x5 map becomes through the flatten; an fc1 or fc2 neuron with its bias and
its input column of the next layer. lib/shrink.py cuts out every unit whose
output weights are all zero; the smaller model computes what the masked one
does. Every layer keeps at least one unit.
"""

from __future__ import annotations

import torch

from lenet5.model import LeNet5
from lenet5.train import channel_units
from lib.shrink import kept_units, shrunk_state

LAYERS = ("conv1", "conv2", "fc1", "fc2")  # their output widths are the model's widths
UNITS = "conv filter or fc neuron"  # what a unit is, for messages


@torch.no_grad()
def shrink(model: LeNet5) -> LeNet5:
    """The smaller LeNet-5 computing what `model` computes, without its removable filters and neurons."""
    units = channel_units(model)
    return lenet_from_state(shrunk_state(model, units, kept_units(units, at_least=1)))


def lenet_from_state(state: dict[str, torch.Tensor]) -> LeNet5:
    """The LeNet-5, full or smaller, that `state` (a state_dict) is of, loaded, in eval mode: shaped by its tensors."""
    widths = [state[f"{layer}.weight"].shape[0] for layer in LAYERS]
    model = LeNet5(state["fc3.weight"].shape[0], widths=widths)
    model.load_state_dict(state)
    return model.eval()


def describe(model: LeNet5) -> str:
    """Its widths (filters, neurons), layer by layer."""
    return ", ".join(f"{layer} {getattr(model, layer).weight.shape[0]}" for layer in LAYERS)
