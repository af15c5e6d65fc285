"""The seed: a module unfrozen into an optimizer built before it, which never held it.

Source: this project's seed trainer (issue 17, "The seed: the decoder unfrozen into the CTC stage's optimizer"),
in small: an encoder trains for 4 steps, then a head is unfrozen and the loop keeps the optimizer. Fixed: the
optimizer is rebuilt at the unfreeze.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "the seed (issue 17)"
EXPECTED = "outside_optimizer"
ACTS = 5  # the first step after the unfreeze


class EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.Tanh())
        self.aux = nn.Linear(32, 4)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, head: bool) -> torch.Tensor:
        """(B, 16) -> logits (B, 4) of the auxiliary head, plus the attached head's once it trains."""
        h = self.encoder(x)
        return self.aux(h) + self.head(h) if head else self.aux(h)


def run(variant: str):
    torch.manual_seed(0)
    model = EncoderHead()
    model.head.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def loop(w):
        nonlocal optimizer
        for i, (x, y) in enumerate(task(20), start=1):
            if i == ACTS:
                model.head.requires_grad_(True)
                if variant == "fixed":
                    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x, head=i >= ACTS), y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
