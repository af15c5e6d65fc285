"""Optimizer construction with the seed's settings, the one decision about the optimizer at a stage change or an
unfreeze, and the counts the seed logs when it builds one."""

from __future__ import annotations

import inspect
from typing import Iterable

import torch
import torch.nn as nn

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
# What happens to the optimizer when the trainable set changes (see `change_optimizer`).
CHANGES: tuple[str, ...] = ("rebuild", "keep", "add_group")


def component_groups(model: nn.Module) -> list[dict]:
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
    params = optimizer_params(optimizer)
    return len(params), sum(p.numel() for p in params)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class HeldIds:
    """The ids of an optimizer's parameters, taken again only when the optimizer, its groups or their lists change
    (an instrument asks every step; the answer changes at a stage change or an unfreeze). The lists themselves are
    kept, not their ids, so one freed with its optimizer cannot pass for a new one. `generation` counts the
    changes."""

    def __init__(self) -> None:
        self._optimizer: torch.optim.Optimizer | None = None
        self._lists: list[tuple[list[torch.nn.Parameter], int]] = []
        self.ids: set[int] = set()
        self.generation = -1

    def of(self, optimizer: torch.optim.Optimizer) -> set[int]:
        lists = [(g["params"], len(g["params"])) for g in optimizer.param_groups]
        if optimizer is not self._optimizer or len(lists) != len(self._lists) or \
                any(a is not b or m != n for (a, m), (b, n) in zip(self._lists, lists)):
            self._optimizer, self._lists = optimizer, lists
            self.ids = {id(p) for lst, _ in lists for p in lst}
            self.generation += 1
        return self.ids


def change_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, lr: float, how: str, *,
                     added: Iterable[str] = ()) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer to use after the trainable set of `model` changed (a stage change or an unfreeze).

    how: "rebuild" builds a new optimizer of the same kind and settings as `optimizer` (fresh state) over every
    trainable parameter, one group per component (the seed rebuilds at its unfreeze); "keep" keeps `optimizer`
    and its state, so parameters made trainable since it was built train outside it (the seed's stale optimizer
    at its stage change); "add_group" keeps it and adds the components named in `added` as new groups.
    Every group's learning rate becomes `lr`. Returns the optimizer and a log line in the seed's style.
    """
    if how not in CHANGES:
        raise ValueError(f"optimizer change: expected one of {', '.join(CHANGES)}, got {how!r}")
    if how == "rebuild":
        kind = type(optimizer)
        # defaults can hold derived entries the constructor does not take (AdamW's decoupled_weight_decay)
        accepted = inspect.signature(kind).parameters
        settings = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "lr"}
        optimizer = kind(component_groups(model), lr=lr, **settings)
        tensors, elements = optimizer_size(optimizer)
        return optimizer, f"Created optimizer for {tensors} parameter tensors ({elements:,} elements)"
    for group in optimizer.param_groups:
        group["lr"] = lr
    if how == "add_group":
        held = {id(p) for p in optimizer_params(optimizer)}
        for name in added:
            params = [p for p in model.get_submodule(name).parameters() if id(p) not in held]
            optimizer.add_param_group({"name": name, "params": params, "lr": lr})
    held = {id(p) for p in optimizer_params(optimizer)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    outside = sum(id(p) not in held for p in trainable)
    tensors, elements = optimizer_size(optimizer)
    verb = f"Added {', '.join(added)} to the optimizer" if how == "add_group" else "Kept the optimizer"
    return optimizer, (f"{verb}: {tensors} parameter tensors ({elements:,} elements); {outside} of "
                       f"{len(trainable)} trainable tensors are outside it")
