"""Everything but batch-norm frozen, and the optimizer built on the (frozen) final layer only.

Source: PyTorch forum thread 84911, "Obtaining abnormal changes in loss and accuracy",
https://discuss.pytorch.org/t/obtaining-abnormal-changes-in-loss-and-accuracy/84911 (TrainCheck's
pytorch-forum-84911). The batch-norm parameters get gradients at every step but no optimizer holds them; the loss
stays flat. Fixed: every layer trainable and in the optimizer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "forum 84911"
EXPECTED = "outside_optimizer"
ACTS = 1  # the first backward gives the batch-norm parameters gradients no optimizer holds


def run(variant: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    if variant == "bug":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("1."))  # only the batch-norm layer ("bn" in name)
        optimizer = torch.optim.SGD(model[3].parameters(), lr=0.1)  # the final layer, itself frozen
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loop(w):
        for x, y in task(20):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
