"""The one run engine: a TrainStep driven through stages, with its unfreezing policy, instruments and recorder.

The staged trainer (`run.staged`), a joint-stage run forked from a CTC-warm checkpoint (`run.joint`) and a
bring-your-own-model session (`run.byo`) all step through a `RunEngine`:

    engine = RunEngine(step, instruments=[probe, coverage], recorder=recorder, log=print)
    engine.enter_stage(stage, seed=0, rebuild=True, policy=make_policy("freeze_params", 100))
    for batch in batches:
        engine.step(batch)          # policy plan -> (unfreeze) -> TrainStep -> instruments -> recorder
    engine.close(val_per=...)

At a stage change the trainable components change and `change_optimizer` decides the optimizer (rebuild it, or
keep the previous stage's as the seed does); at an unfreeze the policy asks the same function. Instruments are
told of both changes (`on_change`), and both are recorded as "events".
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Sequence

from workbench.instrument.observer import StepObserver
from workbench.records.recorder import Recorder
from workbench.train.device import seed_everything
from workbench.train.optim import change_optimizer
from workbench.train.policies import UnfreezePolicy
from workbench.train.stages import Stage, set_trainable, stage_seed
from workbench.train.step import StepResult, TrainStep


class RunEngine:
    """Owns one TrainStep (`train_step`), the current stage and its policy, the instruments and the recorder.

    Instruments are attached in order and the recorder last, so it records what they measured at each step.
    Without a stage (a bring-your-own-model session) each step runs the user's loss with no weights or flags.
    """

    def __init__(self, train_step: TrainStep, *, instruments: Sequence[StepObserver] = (),
                 recorder: Recorder | None = None, log: Callable[[str], None] = lambda line: None) -> None:
        self.train_step = train_step
        self.instruments = list(instruments)
        self.recorder = recorder
        self.log = log
        self.stage: Stage | None = None
        self.policy = UnfreezePolicy()
        self.stage_step = 0
        self.module_lr: float | None = None
        for observer in [*self.instruments, recorder]:
            if observer is not None:
                observer.attach(train_step)
        scaler = train_step.scaler
        if recorder is not None and scaler is not None:
            recorder.note(scaler={"init_scale": scaler.get_scale(), "growth_interval": scaler.get_growth_interval(),
                                  "growth_factor": scaler.get_growth_factor(),
                                  "backoff_factor": scaler.get_backoff_factor()})

    @property
    def model(self) -> Any:
        return self.train_step.model

    def enter_stage(self, stage: Stage, *, seed: int, rebuild: bool, policy: UnfreezePolicy | None = None,
                    module_lr: float | None = None) -> None:
        """Start `stage`: its components become trainable (matched as the loop semantics say), `policy` (default:
        none) starts, the optimizer is rebuilt or kept (`rebuild`), and torch's RNG is seeded for the stage (see
        `train.stages`). `module_lr` is the learning rate of the policy's modules (the fresh decoder) when it
        differs from the stage's."""
        set_trainable(self.model, stage.trainable, substring=self.train_step.config.semantics.substring_match)
        self.policy = policy or UnfreezePolicy()
        if self.policy.active and self.policy.attach_step > stage.steps:
            warnings.warn(f"{self.policy.name}: {', '.join(self.policy.modules)} would unfreeze at step "
                          f"{self.policy.attach_step}, beyond the {stage.name} stage's {stage.steps} steps: "
                          f"they never train", stacklevel=2)
        self.policy.start(self.model)
        optimizer, line = change_optimizer(self.train_step.optimizer, self.model, stage.lr,
                                           "rebuild" if rebuild else "keep")
        self.train_step.optimizer = optimizer
        self.stage, self.stage_step, self.module_lr = stage, 0, module_lr
        seed_everything(stage_seed(seed, stage.index))
        self.log(f"Stage transition -> {stage.name} (lr {stage.lr:g}, weights {stage.weights})")
        self._changed("stage", f"{stage.name} stage start", line, stage=stage.name)

    def step(self, batch: Any) -> StepResult:
        """One optimizer step on `batch` (micro-batches as a list), as the stage's policy plans it."""
        stage = self.stage
        if stage is None:
            return self.train_step(batch, None)
        i = self.stage_step + 1
        plan = self.policy.plan(i, stage.weights)
        if plan.event == "unfreeze":
            optimizer, line = self.policy.unfreeze(self.model, self.train_step.optimizer, stage.lr)
            self.train_step.optimizer = optimizer
            self._changed("unfreeze", "after unfreeze", line)
        for group in self.train_step.optimizer.param_groups:
            if group.get("name") in self.policy.modules:
                group["lr"] = (self.module_lr or stage.lr) * plan.lr_scale
        result = self.train_step(batch, plan.weights, rnnt=stage.run_rnnt and plan.rnnt, mode=stage.run_mode)
        self.stage_step = i
        return result

    def run(self, batches: Iterator[Any], steps: int,
            on_step: Callable[[int, StepResult], None] | None = None) -> list[StepResult]:
        """`steps` steps on the next batches; `on_step(i, result)` after each (i counts from 1 in this call)."""
        results = []
        for i in range(1, steps + 1):
            results.append(self.step(next(batches)))
            if on_step is not None:
                on_step(i, results[-1])
        self.train_step.settle()  # the last step's post-update values reach the record (see TrainStep.settle)
        return results

    def close(self, status: str = "finished", **attrs: Any) -> None:
        """Detach every instrument and close the recorder with the run's results and final status."""
        try:
            self.train_step.settle()
        finally:  # the log is closed even when the last step's late end fails
            for observer in [*self.instruments, self.recorder]:
                if observer is not None:
                    observer.detach()
            if self.recorder is not None:
                self.recorder.close(status, **attrs)

    def _changed(self, event: str, reason: str, line: str, **fields: Any) -> None:
        self.log(line)
        if self.recorder is not None:
            self.recorder.event("events", {"step": self.train_step.step_index + 1, "event": event, **fields,
                                           "message": line})
        for observer in self.instruments:
            on_change = getattr(observer, "on_change", None)
            if on_change is not None:
                on_change(reason)
