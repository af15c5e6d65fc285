"""`log(softmax(x))` instead of `log_softmax(x)`: a probability that underflows to 0 gives an infinite loss and NaN
gradients.

Source: PyTorch's documentation of `torch.nn.functional.softmax`,
https://pytorch.org/docs/stable/generated/torch.nn.functional.softmax.html ("This function doesn't work directly
with NLLLoss ... Use log_softmax instead (it's faster and has better numerical properties)"). Inputs of scale 400
make a logit gap exceed what float32 softmax resolves (about 104) at the first step. Fixed: log_softmax.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "PyTorch softmax docs"
EXPECTED = "nonfinite"
ACTS = 1


def run(variant: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def loop(w):
        for x, y in task(20, scale=400.0):
            optimizer.zero_grad()
            logits = model(x)
            logp = torch.log(F.softmax(logits, dim=1)) if variant == "bug" else F.log_softmax(logits, dim=1)
            loss = F.nll_loss(logp, y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
