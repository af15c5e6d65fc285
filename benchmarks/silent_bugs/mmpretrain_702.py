"""Frozen stages that keep training: `frozen_stages` sets requires_grad=False, but the stages stay in train mode,
so their batch-norm statistics keep changing.

Source: open-mmlab/mmpretrain issue 702, https://github.com/open-mmlab/mmpretrain/issues/702 (TrainCheck's
mmpretrain-702): the freeze takes effect only when `model.train()` is called. Fixed: the frozen stage is put in
eval mode after every `train()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "mmpretrain 702"
EXPECTED = "frozen_changed"
ACTS = 1  # the first forward updates the frozen stage's running statistics


def run(variant: str):
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
    model = nn.Sequential(stem, nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    stem.requires_grad_(False)  # frozen_stages=1
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    def loop(w):
        for x, y in task(20):
            model.train()
            if variant == "fixed":
                stem.eval()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
