"""The candidate fixes `diagnose` tries: each one named, documented intervention, registered by class.

A candidate answers evidence kinds (`workbench.studies.diagnose.evidence.KINDS`): it is tried on a run whose
evidence holds one of them. `settings(control)` is our own joint-stage run with this one change (None where the
run has it already, or where no run setting expresses it); `continued(loop)` is the same change to the loop a kept
replay bundle of a `byo.instrument` or Lightning run is continued with (`loop.Loop`; None where it does not apply);
`code` is the code-level change it stands for, in one line; `coverage` marks an optimizer-coverage fix (every
trainable tensor in the optimizer). Where a candidate is a change notebook 01
runs, its settings come from `workbench.studies.reproduce.configurations` (one place for each change).

To add one, subclass `Candidate` in any file with its name and the evidence it answers as class keywords and
override `settings` (see the README's "Extending the workbench"):

    class LowerLr(Candidate, name="lower_lr", answers=("clip_nonfinite",)):
        \"\"\"A tenth of the learning rate.\"\"\"
        code = "divide the learning rate by 10"
        def settings(self, control):
            return dataclasses.replace(control, lr=control.lr / 10)

Registry order is the order candidates are tried and shown, and breaks ties between equally small changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from workbench.run.settings import RunSettings
from workbench.studies import reproduce
from workbench.studies.diagnose.evidence import KINDS
from workbench.studies.diagnose.loop import GROUP_LR_FACTOR, Loop
from workbench.train.policies import POLICIES

CANDIDATES: dict[str, type[Candidate]] = {}
# Settings that say how a run is measured or named, not how it trains: not counted as a change.
NOT_CHANGES = ("name", "seed", "eval_at_start", "eval_at_end", "eval_after_attach", "attribution_steps", "trace")


class Candidate:
    """Base class of a candidate fix. Class keywords: `name` (registry name), `answers` (evidence kinds)."""

    name: ClassVar[str] = ""
    answers: ClassVar[tuple[str, ...]] = ()
    code: ClassVar[str] = ""
    coverage: ClassVar[bool] = False
    config: ClassVar[str | None] = None  # the notebook-01 configuration this candidate is, if any

    def __init_subclass__(cls, *, name: str, answers: tuple[str, ...], **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name in CANDIDATES or name == "control":
            raise ValueError(f"candidate {name!r} is already registered")
        unknown = [k for k in answers if k not in KINDS]
        if unknown:
            raise ValueError(f"candidate {name!r}: answers {unknown[0]!r}, expected evidence kinds of {KINDS}")
        cls.name, cls.answers = name, tuple(answers)
        CANDIDATES[name] = cls

    def settings(self, control: RunSettings) -> RunSettings | None:
        """The control run with this candidate's change; None where it does not apply. The default applies
        notebook 01's configuration `config` where `applies(control)`."""
        if self.config is None:
            raise NotImplementedError(f"candidate {self.name!r}: override settings() or set config")
        return notebook_change(control, self.config) if self.applies(control) else None

    def applies(self, control: RunSettings) -> bool:
        """Whether the change is not already part of `control`."""
        return True

    def continued(self, loop: Loop) -> Loop | None:
        """The loop of a kept bundle's continuation with this change; None (the default) where it does not apply."""
        return None

    @classmethod
    def describe(cls) -> str:
        """The first line of the class docstring: what the candidate changes."""
        return (cls.__doc__ or cls.name).strip().splitlines()[0]


def notebook_change(control: RunSettings, config: str) -> RunSettings:
    """Notebook 01's configuration `config` applied to `control` (`reproduce.configurations`)."""
    return reproduce.configurations(control, [1], only=[config])[0]


def changed(control: RunSettings | Loop, candidate: RunSettings | Loop) -> dict[str, tuple[Any, Any]]:
    """The settings that differ (name -> (control's, candidate's)), leaving out those in `NOT_CHANGES`."""
    a, b = control.to_dict(), candidate.to_dict()
    return {k: (a[k], b[k]) for k in a if k not in NOT_CHANGES and a[k] != b[k]}


def _loop(control: RunSettings, switch: str) -> Any:
    return getattr(control.loop_semantics(), switch)


class RebuildAtStageChange(Candidate, name="rebuild_at_stage_change", answers=("outside_optimizer",)):
    """Rebuild the optimizer at the stage change over every trainable tensor."""

    code = "rebuild the optimizer over every trainable tensor when the trainable set changes"
    coverage = True
    config = "rebuild_at_stage_change"

    def applies(self, control: RunSettings) -> bool:
        return not _loop(control, "rebuild_at_stage_change")

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, optimizer="rebuilt") if loop.optimizer == "kept" else None


class AddMissingGroup(Candidate, name="add_missing_group", answers=("outside_optimizer",)):
    """Keep the optimizer and its state, and add the trainable tensors it lacks as a group of their own."""

    code = "optimizer.add_param_group({'params': the trainable tensors it does not hold}) when they become trainable"
    coverage = True

    def settings(self, control: RunSettings) -> RunSettings | None:
        # our joint stage rebuilds or keeps its optimizer at the stage change (rebuild_at_stage_change); no run
        # setting adds the missing decoder to the kept one, so this candidate is for kept bundles only
        return None

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, optimizer="kept+missing") if loop.optimizer == "kept" else None


class RebuildAtUnfreeze(Candidate, name="rebuild_at_unfreeze", answers=("kept_at_unfreeze",)):
    """Rebuild the optimizer when the frozen decoder unfreezes."""

    code = "rebuild the optimizer over every trainable tensor when a frozen module unfreezes"
    coverage = True

    def settings(self, control: RunSettings) -> RunSettings | None:
        if not POLICIES[control.policy].freezes or control.rebuild_at_unfreeze:
            return None
        return dataclasses.replace(control, rebuild_at_unfreeze=True)


class FreezeThenRebuild(Candidate, name="freeze_then_rebuild", answers=("outside_optimizer",)):
    """The seed's workaround: keep the decoder frozen for 1 step, then unfreeze it into a rebuilt optimizer."""

    code = "freeze the fresh decoder for N steps, then rebuild the optimizer over every trainable tensor"
    coverage = True
    config = "freeze_params_N1_rebuild"

    def applies(self, control: RunSettings) -> bool:
        return not POLICIES[control.policy].freezes


class ClipOptimizerParams(Candidate, name="clip_optimizer_params", answers=("clip_nonfinite",)):
    """Clip over the optimizer's parameters only."""

    code = "clip_grad_norm_ over the optimizer's parameters, not model.parameters()"
    config = "clip_optimizer_params"

    def applies(self, control: RunSettings) -> bool:
        return _loop(control, "clip_scope") != "optimizer"

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, clip_scope="optimizer") if loop.clip is not None and \
            loop.clip_scope != "optimizer" else None


class ZeroGradModel(Candidate, name="zero_grad_model", answers=("stale_gradients", "clip_nonfinite")):
    """Zero every gradient of the model before the backward."""

    code = "model.zero_grad(set_to_none=True) instead of optimizer.zero_grad()"
    config = "zero_grad_model"

    def applies(self, control: RunSettings) -> bool:
        return _loop(control, "zero_grad_scope") != "model"

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, zero_grad_scope="model") if loop.zero_grad_scope != "model" else None


class ClipAfterUnscale(Candidate, name="clip_after_unscale", answers=("clip_collapsed",)):
    """Unscale the fp16 gradients before clipping them (the clip measured the loss-scaled norm)."""

    code = "scaler.unscale_(optimizer) before clip_grad_norm_"

    def settings(self, control: RunSettings) -> RunSettings | None:
        # both of our loops unscale before they clip (LoopSemantics.unscale_before_clip, not a run setting)
        return None

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, unscale_before_clip=True) if loop.precision == "fp16" and \
            loop.clip is not None and not loop.unscale_before_clip else None


class Bf16(Candidate, name="bf16", answers=("fp16_overflow",)):
    """Autocast in bf16 (no GradScaler)."""

    code = "torch.autocast(dtype=torch.bfloat16) without a GradScaler"
    config = "bf16"

    def applies(self, control: RunSettings) -> bool:
        return control.precision != "bf16"

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, precision="bf16") if loop.precision != "bf16" else None


class Fp32(Candidate, name="fp32", answers=("fp16_overflow",)):
    """Train in fp32 (no autocast)."""

    code = "no autocast: train in fp32"
    config = "fp32"

    def applies(self, control: RunSettings) -> bool:
        return control.precision != "fp32"

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, precision="fp32") if loop.precision != "fp32" else None


class InitScale4096(Candidate, name="init_scale_4096", answers=("fp16_overflow",)):
    """Start the GradScaler at 4096 instead of 65536."""

    code = "GradScaler(init_scale=4096)"
    config = "init_scale_4096"

    def applies(self, control: RunSettings) -> bool:
        return control.precision == "fp16" and (control.init_scale > 4096 or control.carry_scaler)

    def continued(self, loop: Loop) -> Loop | None:
        fp16_above = loop.precision == "fp16" and loop.init_scale is not None and loop.init_scale > 4096
        return dataclasses.replace(loop, init_scale=4096.0) if fp16_above else None


class DecoderLr(Candidate, name="decoder_lr", answers=("slow_loss",)):
    """A learning rate of its own for the fresh decoder."""

    code = f"put the fresh decoder in an optimizer group of its own at lr {reproduce.DECODER_LR:g}"

    def settings(self, control: RunSettings) -> RunSettings | None:
        if control.decoder_lr is not None or control.ctc_only:
            return None
        return dataclasses.replace(control, decoder_lr=reproduce.DECODER_LR)


class GroupLr(Candidate, name="group_lr", answers=("slow_loss",)):
    """A learning rate of its own (`GROUP_LR_FACTOR` times the first group's) for the run's slowest-updated group."""

    code = (f"put the slowest-updated parameter group in an optimizer group of its own at {GROUP_LR_FACTOR:g}x the "
            f"learning rate")

    def settings(self, control: RunSettings) -> RunSettings | None:
        return None  # our joint stage's slowest group is the fresh decoder: decoder_lr is this change there

    def continued(self, loop: Loop) -> Loop | None:
        return dataclasses.replace(loop, group_lr=loop.slowest) if loop.slowest and loop.group_lr is None else None


def derive(kinds: dict[str, str], control: RunSettings | Loop,
           only: tuple[str, ...] = ()) -> list[tuple[type[Candidate], Any]]:
    """The candidates the evidence `kinds` calls for that change something about `control` (our run's settings, or
    the loop of a kept bundle), in registry order, with their settings (or loop); `only` names the candidates to try
    instead, whatever the evidence (ValueError for an unknown name)."""
    unknown = [n for n in only if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"candidates: unknown {', '.join(unknown)}; expected some of {', '.join(CANDIDATES)}")
    picked = []
    for name, cls in CANDIDATES.items():
        wanted = name in only if only else bool(set(cls.answers) & set(kinds))
        if not wanted:
            continue
        settings = cls().continued(control) if isinstance(control, Loop) else cls().settings(control)
        if settings is not None and changed(control, settings):
            picked.append((cls, settings))
    return picked
