"""Training stages (CTC warmup -> joint -> mode): which components train, with which loss weights and learning rate.

The freezing policy lives here and in `unfreeze.py`, not in the loop, in the spirit of Lightning's BaseFinetuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from workbench.losses import LossWeights

COMPONENTS: tuple[str, ...] = ("preprocessor", "encoder", "ctc_head", "rnnt_decoder", "mode_head")
STAGE_NAMES: tuple[str, ...] = ("ctc_warmup", "joint", "mode")


@dataclass(frozen=True)
class Stage:
    """One stage of the curriculum.

    `trainable` names top-level model components. Matching is by exact component name, not by substring:
    the seed's substring match made `rnnt_decoder.encoder_proj` "trainable" during CTC warmup (modessm.md 3.2).
    """

    name: str
    steps: int
    lr: float
    weights: LossWeights
    trainable: tuple[str, ...]
    run_rnnt: bool = False
    run_mode: bool = False


def seed_stages(
    ctc_steps: int,
    joint_steps: int,
    mode_steps: int = 0,
    *,
    ctc_lr: float = 1e-3,
    joint_lr: float = 1e-5,
    mode_lr: float = 1e-5,
) -> list[Stage]:
    """The seed's curriculum with its loss weights (CTC 1.0; then 0.3 CTC + 1.0 RNN-T; then + 0.1 mode).

    Stages with zero steps are left out.
    """
    stages = [
        Stage("ctc_warmup", ctc_steps, ctc_lr, LossWeights(ctc=1.0, rnnt=0.0, mode=0.0),
              ("preprocessor", "encoder", "ctc_head")),
        Stage("joint", joint_steps, joint_lr, LossWeights(ctc=0.3, rnnt=1.0, mode=0.0),
              ("preprocessor", "encoder", "ctc_head", "rnnt_decoder"), run_rnnt=True),
        Stage("mode", mode_steps, mode_lr, LossWeights(ctc=0.3, rnnt=1.0, mode=0.1),
              ("preprocessor", "encoder", "ctc_head", "rnnt_decoder", "mode_head"), run_rnnt=True, run_mode=True),
    ]
    return [s for s in stages if s.steps > 0]


def set_trainable(model: nn.Module, components: tuple[str, ...] | list[str]) -> list[str]:
    """Make exactly the parameters of `components` trainable; return the trainable parameter names."""
    names = [n for n, _ in model.named_children()]
    unknown = [c for c in components if c not in names]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; the model has {names}")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in components)
        if param.requires_grad:
            trainable.append(name)
    return trainable
