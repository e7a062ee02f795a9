"""LeNet-5 (LeCun et al. 1998), with ReLU and max pooling as commonly trained today."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (6, 16, 120, 84)  # conv1 and conv2 filters, fc1 and fc2 neurons
MAP = 5 * 5  # conv2's output map after pooling: each of its filters feeds fc1 this many inputs


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, widths: Sequence[int] = WIDTHS):
        """`widths` other than WIDTHS: a smaller LeNet-5 with whole filters and neurons removed (lenet5/shrink.py)."""
        super().__init__()
        c1, c2, f1, f2 = widths
        self.conv1 = nn.Conv2d(1, c1, kernel_size=5, padding=2)   # 28x28 -> 28x28
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)             # 14x14 -> 10x10
        self.fc1 = nn.Linear(c2 * MAP, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)  # channel-major: conv2 filter j is fc1's inputs j*MAP ... (j+1)*MAP - 1
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
