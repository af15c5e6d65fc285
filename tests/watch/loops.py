"""Hand-made training loops for watch's tests: each has a silent bug (`bug=True`) or is its clean twin."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.run.watch import Watch, watch


class Net(nn.Module):
    """features (Linear + BatchNorm) -> head; (B, 8) -> logits (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of a learnable task: y from a fixed linear map of x."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def run(step: Callable[[nn.Module, torch.optim.Optimizer, Any, int, Watch], None], *, steps: int = 12,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
        setup: Callable[[nn.Module], None] | None = None, **kwargs: Any) -> Watch:
    """`steps` iterations of `step(model, optimizer, batch, i, w)` under watch `w`."""
    torch.manual_seed(0)
    model = Net()
    if setup is not None:
        setup(model)
    optimizer = (make_optimizer or (lambda m: torch.optim.SGD(
        [p for p in m.parameters() if p.requires_grad], lr=0.1)))(model)
    with watch(model, optimizer, **{"say": lambda line: None, **kwargs}) as w:
        for i, batch in enumerate(batches(steps)):
            step(model, optimizer, batch, i, w)
    return w


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, i: int, w: Watch) -> None:
    x, y = batch
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    w.loss(loss)
    loss.backward()
    optimizer.step()


def kinds(w: Watch) -> list[tuple[str, int]]:
    return [(f["kind"], f["step"]) for f in w.findings]
