"""A physically smaller ResNet: the block-internal filters pruning removed whole, taken out.

The units are the ones channel pruning uses (resnet/train.py
`channel_units`): each filter of every convolution of a block but its last,
with its BatchNorm channel and the next convolution's matching input
channel. The residual stream's channels (the stem, each block's last
convolution, the shortcuts) and the classifier are no units and stay as
they are. lib/shrink.py cuts out every unit whose output weights are all
zero, with its BatchNorm scale, shift and running statistics; the smaller
model computes what the masked one does in eval mode. Every layer keeps at
least one channel (torch's BatchNorm cannot have none).
"""

from __future__ import annotations

import torch

from lib.shrink import kept_units, shrunk_state
from resnet.model import DEPTHS, Bottleneck, ResNet
from resnet.train import channel_units

STAGES = ("layer1", "layer2", "layer3", "layer4")
UNITS = "block-internal conv filter"  # what a unit is, for messages


@torch.no_grad()
def shrink(model: ResNet) -> ResNet:
    """The smaller ResNet computing what `model` computes (eval mode), without its removable filters."""
    units = channel_units(model)
    return resnet_from_state(shrunk_state(model, units, kept_units(units, at_least=1)))


def _depth(state: dict[str, torch.Tensor]) -> int:
    """The DEPTHS entry whose block kind and blocks per stage `state` has."""
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(stage + ".")}) for stage in STAGES)
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, (block, per_stage) in DEPTHS.items():
        if per_stage == counts and (block is Bottleneck) == bottleneck:
            return depth
    raise ValueError(f"no ResNet depth has {counts} {'bottleneck' if bottleneck else 'basic'} blocks per stage")


def inner_widths(state: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Per block, the output channels of each of its convolutions but the last."""
    out = []
    for stage in STAGES:
        for j in sorted({int(k.split(".")[1]) for k in state if k.startswith(stage + ".")}):
            convs = 3 if f"{stage}.{j}.conv3.weight" in state else 2
            out.append(tuple(state[f"{stage}.{j}.conv{c}.weight"].shape[0] for c in range(1, convs)))
    return out


def resnet_from_state(state: dict[str, torch.Tensor]) -> ResNet:
    """The ResNet, full or smaller, that `state` (a state_dict) is of, loaded, in eval mode: shaped by its tensors."""
    model = ResNet(_depth(state), state["fc.weight"].shape[0], state["conv1.weight"].shape[0], inner_widths(state))
    model.load_state_dict(state)
    return model.eval()


def describe(model: ResNet) -> str:
    """Its block-internal channels, block by block."""
    return f"inner channels per block {[list(w) for w in inner_widths(model.state_dict())]}"
