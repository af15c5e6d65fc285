"""A frozen parameter decays: the previous task's prompts are frozen (requires_grad=False) but stay in an AdamW
optimizer with weight decay, and their `.grad` is a zeroed tensor rather than None, so every step shrinks them.

Source: iamwangyabin/S-Prompts pull request 2, "Fix typo & bugs about weight decay",
https://github.com/iamwangyabin/S-Prompts/pull/2 (the mean of the frozen `prompt_pool[0]` fell while learning task
5). Fixed, as the pull request does: the optimizer is built over the parameters that require a gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import task, watched

SOURCE = "S-Prompts PR 2"
EXPECTED = "frozen_changed"
ACTS = 1  # the first step of the new task decays the frozen prompts


class Prompted(nn.Module):
    """Two prompt vectors added to the features (one per task) and a classifier: (B, 16) -> (B, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ModuleList([nn.Linear(1, 16, bias=False) for _ in range(2)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        one = torch.ones(1, 1, device=x.device)
        return self.head(x + self.prompts[task_id](one))


def run(variant: str):
    torch.manual_seed(0)
    model = Prompted()
    # task 0 was learned: its prompt got gradients (zeroed in place since), then it was frozen for task 1
    model(torch.zeros(1, 16), 0).sum().backward()
    model.zero_grad(set_to_none=False)
    model.prompts[0].requires_grad_(False)
    params = model.parameters() if variant == "bug" else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)

    def loop(w):
        for x, y in task(20):
            optimizer.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x, 1), y)
            w.loss(loss)
            loss.backward()
            optimizer.step()

    return watched(model, optimizer, loop)
