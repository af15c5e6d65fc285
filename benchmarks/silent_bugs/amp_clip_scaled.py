"""Gradient clipping over still-scaled gradients: `clip_grad_norm_` before `scaler.unscale_`.

Source: PyTorch's AMP examples, "Working with Unscaled Gradients / Gradient clipping",
https://pytorch.org/docs/stable/notes/amp_examples.html#gradient-clipping: the gradients must be unscaled before
they are clipped, else the clip compares a norm multiplied by the loss scale with the max norm. Fixed: unscale_
first. The GradScaler runs on the CPU here (fp32 values, the scale's arithmetic is the same).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "PyTorch AMP examples"
EXPECTED = "clip_collapse"
ACTS = 1


def run(variant: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)

    def loop(w):
        for x, y in task(20):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)
            scaler.scale(loss).backward()
            if variant == "fixed":
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()

    return watched(model, optimizer, loop, scaler=scaler)
