"""What every case shares: a small learnable classification task and running a loop under watch."""

from __future__ import annotations

from typing import Any, Callable

import torch

from workbench.run.watch import Watch, watch


def task(steps: int, seed: int = 0, n_in: int = 16, n_classes: int = 4, batch: int = 32,
         scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches (x (batch, n_in) * scale, y (batch,)) with y from a fixed linear map of x."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_in, n_classes, generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, n_in, generator=g)
        out.append((x * scale, (x @ w).argmax(1)))
    return out


def watched(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop: Callable[[Watch], None],
            **kwargs: Any) -> Watch:
    """Run `loop(w)` under watch (findings collected, not printed) and return the Watch."""
    with watch(model, optimizer, say=lambda line: None, **kwargs) as w:
        loop(w)
    return w
