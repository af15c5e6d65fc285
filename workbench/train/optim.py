"""Optimizer construction with the seed's settings, and the counts the seed logs when it builds one."""

from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


def component_groups(model: torch.nn.Module) -> list[dict]:
    """Trainable parameters grouped by top-level component, each group tagged with its `name`.

    One group per component lets policies warm up or add the decoder's learning rate without touching the
    encoder's, and lets the run log record a learning rate per component.
    """
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(name.split(".", 1)[0], []).append(param)
    return [{"name": name, "params": params} for name, params in groups.items()]


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | list[dict],
    lr: float,
    kind: str = "adamw",
    *,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-8,
    weight_decay: float = 0.05,
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW with the seed's defaults (betas 0.9/0.98, eps 1e-8, weight decay 0.05 on everything), or plain SGD.

    `params` is an iterable of parameters (frozen ones are left out) or a list of param-group dicts.
    """
    params = list(params)
    if not params or not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if lr <= 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr}")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {kind!r}")


def optimizer_size(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(parameter tensors, elements) held by the optimizer, as the seed logs them."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return len(params), sum(p.numel() for p in params)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
