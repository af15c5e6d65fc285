"""A layer built inside `forward()`: every pass makes a new, untrained layer, and the one the optimizer holds never
takes part in the loss.

Source: "PyTorch Neural Network - The forward() Layer Bug", https://thecodeforge.io/ml-ai/pytorch-neural-network/
("Layers in forward() create new weights each batch - optimizer updates old ones"). Fixed: the layer is built once
in `__init__`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "thecodeforge forward() bug"
EXPECTED = "no_gradient"
ACTS = 1  # the first forward replaces the classifier the optimizer holds


class Net(nn.Module):
    """(B, 16) -> hidden (B, 32) -> logits (B, 4); `rebuild`: the classifier is built again in every forward."""

    def __init__(self, rebuild: bool) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.classifier = nn.Linear(32, 4)
        self.rebuild = rebuild

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rebuild:
            self.classifier = nn.Linear(32, 4)
        return self.classifier(self.hidden(x))


def run(variant: str):
    torch.manual_seed(0)
    model = Net(rebuild=variant == "bug")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loop(w):
        for x, y in task(20):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
