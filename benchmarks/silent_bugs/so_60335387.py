"""`optimizer.zero_grad()` missing: gradients accumulate across steps.

Source: StackOverflow question 60335387, "pytorch mnist example not converge",
https://stackoverflow.com/questions/60335387 (TrainCheck's stackoverflow-60335387). Fixed: zero_grad every step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "StackOverflow 60335387"
EXPECTED = "stale_grad"
ACTS = 2  # step 1's gradient is fresh; step 2's backward adds to it


def run(variant: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def loop(w):
        for x, y in task(20):
            if variant == "fixed":
                optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
