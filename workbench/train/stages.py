"""Training stages (CTC warmup -> joint -> mode): which components train, with which loss weights and learning
rate, and the order in which each stage sees its batches.

What is trainable is decided here and by the unfreezing policies (`policies.py`), never inside the training step,
in the spirit of Lightning's BaseFinetuning.

Each stage draws its batches from its own loader and re-seeds torch's RNG (dropout) from (seed, stage index), so a
run that starts its joint stage from a saved CTC-warm checkpoint sees exactly the batches and dropout masks the
full run would have seen, and runs that compare settings from one checkpoint see the same data order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

from workbench.data import B2TDataset, Batch, make_loader
from workbench.model.losses import LossWeights

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

    @property
    def index(self) -> int:
        """Position in the curriculum (0 CTC warmup, 1 joint, 2 mode), whatever stages are left out."""
        return STAGE_NAMES.index(self.name)


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


def set_trainable(model: nn.Module, components: tuple[str, ...] | list[str], *,
                  substring: bool = False) -> list[str]:
    """Make exactly the parameters of `components` trainable; return the trainable parameter names.

    With `substring`, a parameter is trainable when a component's name occurs anywhere in its name, as the seed's
    component manager decides (modessm.md 3.2): "encoder" then also matches rnnt_decoder.joint.encoder_proj.
    """
    names = [n for n, _ in model.named_children()]
    unknown = [c for c in components if c not in names]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; the model has {names}")
    trainable = []
    for name, param in model.named_parameters():
        matches = any(c in name for c in components) if substring else name.split(".", 1)[0] in components
        param.requires_grad_(matches)
        if param.requires_grad:
            trainable.append(name)
    return trainable


def stage_seed(seed: int, stage_index: int) -> int:
    """The seed of a stage's data order and of torch's RNG (dropout) at the stage's start."""
    return seed * 1000 + stage_index


def decoder_seed(seed: int) -> int:
    """The seed of the fresh RNN-T decoder's initialisation in a run with seed `seed`."""
    return seed * 1000 + 999


def stage_batches(dataset: B2TDataset, batch_size: int, seed: int, stage: Stage) -> Iterator[Batch]:
    """The stage's training batches, reshuffled every epoch, without end; full batches only."""
    loader = make_loader(dataset, batch_size, shuffle=True, seed=stage_seed(seed, stage.index), drop_last=True)
    while True:
        yield from loader
