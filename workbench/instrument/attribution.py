"""Loss-term attribution: how much gradient each parameter group receives from each loss term.

On the same forward as the training step (the `on_losses` event, graph still alive), for each term t with
weight w_t and each group G of trainable parameters:

    a[t, G] = || d(w_t * L_t) / d theta_G ||_2

computed with `torch.autograd.grad(..., retain_graph=True)` so the step's own backward is untouched. It
answers questions such as "while the RNN-T decoder is frozen, does the encoder still receive RNN-T gradient,
and how much compared with CTC?". Frozen groups receive nothing by definition and are reported as 0.
Under fp16 the term is multiplied by the GradScaler's scale before differentiation and the result divided
by it, so the attribution sees the same fp16 overflows the step's backward would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from workbench.instrument.host import to_host
from workbench.instrument.observer import StepObserver

TERMS: tuple[str, ...] = ("ctc", "rnnt", "mode")


@dataclass
class Attribution:
    step: int
    reason: str
    weights: dict[str, float]
    norms: dict[str, dict[str, float]]  # term -> group -> norm

    def ratio(self, group: str, num: str = "rnnt", den: str = "ctc") -> float:
        """norm from `num` / norm from `den` for one group (inf when `den` gives none)."""
        a, b = self.norms.get(num, {}).get(group, 0.0), self.norms.get(den, {}).get(group, 0.0)
        return a / b if b > 0 else float("inf") if a > 0 else 0.0

    def to_dict(self) -> dict:
        return {"step": self.step, "reason": self.reason, "weights": self.weights, "norms": self.norms}

    def one_line(self, group: str = "encoder") -> str:
        parts = ", ".join(f"{t} {g[group]:.3g}" for t, g in self.norms.items() if group in g)
        return f"step {self.step} ({self.reason}): gradient into {group} by term: {parts}"


class LossAttribution(StepObserver):
    """TrainStep observer. Attributes on every `every`-th step (0 = never), on the `after_change` steps that
    follow a change of the trainable set (`on_change`, sent by the run engine at a stage start or an unfreeze),
    and on steps requested explicitly (`request(k, reason)`)."""

    def __init__(self, groups: Mapping[str, Sequence[str]], *, every: int = 0, after_change: int = 0) -> None:
        self.groups = groups
        self.every = every
        self.after_change = after_change
        self.results: list[Attribution] = []
        self._pending: list[str] = []

    def request(self, steps: int, reason: str) -> None:
        """Attribute the next `steps` steps, replacing any request still pending."""
        self._pending = [reason] * steps

    def on_change(self, reason: str) -> None:
        """The trainable set changed (e.g. "joint stage start", "after unfreeze")."""
        if self.after_change:
            self.request(self.after_change, reason)

    def on_losses(self, ctx) -> None:
        if self._pending:
            reason = self._pending.pop(0)
        elif self.every and ctx.step % self.every == 0:
            reason = f"every {self.every}"
        else:
            return
        self.results.append(attribute(ctx.model, ctx.losses, ctx.weights, self.groups, ctx.step, reason,
                                      scale=ctx.scaler.get_scale() if ctx.scaler is not None else None))

    def events(self, step: int) -> list[tuple[str, dict]]:
        return [("attribution", a.to_dict()) for a in self.results if a.step == step]


def attribute(model: nn.Module, losses: Mapping[str, torch.Tensor], weights, groups: Mapping[str, Sequence[str]],
              step: int, reason: str, *, scale: float | None = None) -> Attribution:
    """Per-term, per-group gradient norms of one forward's loss terms; one host copy for the whole table."""
    params = dict(model.named_parameters())
    terms = [t for t in TERMS if t in losses and losses[t].requires_grad]
    trainable = {g: [params[n] for n in names if params[n].requires_grad] for g, names in groups.items()}
    flat = [p for ps in trainable.values() for p in ps]
    unique = list({id(p): p for p in flat}.values())
    device = next(model.parameters()).device
    zero = torch.zeros((), device=device)
    norms = []
    for term in terms:
        w = float(getattr(weights, term))
        if w == 0.0 or not unique:
            norms.append(torch.zeros(len(groups), device=device))
            continue
        loss = losses[term] * w * (scale or 1.0)
        grads = torch.autograd.grad(loss, unique, retain_graph=True, allow_unused=True)
        sq = {id(p): g.float().pow(2).sum() / (scale or 1.0) ** 2 if g is not None else zero
              for p, g in zip(unique, grads)}
        norms.append(torch.stack([torch.stack([sq[id(p)] for p in ps]).sum().sqrt() if ps else zero
                                  for ps in trainable.values()]))
    table = to_host(torch.stack(norms)) if norms else np.zeros((0, len(groups)))
    return Attribution(step, reason, {t: float(getattr(weights, t)) for t in terms},
                       {t: dict(zip(groups, map(float, row))) for t, row in zip(terms, table)})
