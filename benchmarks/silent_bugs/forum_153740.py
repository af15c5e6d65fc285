"""A layer frozen mid-training keeps moving: requires_grad=False stops new gradients, but its `.grad` is still the
zeroed tensor from before, so the optimizer still steps it and SGD's momentum carries it on.

Source: PyTorch forum thread 153740, "Why there is still a small change in frozen layer parameters?",
https://discuss.pytorch.org/t/why-there-is-still-a-small-change-in-frozen-layer-parameters/153740 (the poster's
own answer: also set `param.grad = None` when freezing). Fixed: the freeze sets the gradients to None.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "forum 153740"
EXPECTED = "frozen_changed"
FREEZE_AT = 6  # fc1 is frozen before this step
ACTS = FREEZE_AT  # the first step after the freeze moves fc1 by its momentum


def run(variant: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loop(w):
        for step, (x, y) in enumerate(task(20), start=1):
            if step == FREEZE_AT:
                for p in model[0].parameters():
                    p.requires_grad = False
                    if variant == "fixed":
                        p.grad = None
            optimizer.zero_grad(set_to_none=False)  # zeroes gradients in place, as zero_grad did before torch 2.0
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
