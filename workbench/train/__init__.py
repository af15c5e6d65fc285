"""Training mechanics: the one TrainStep, loop semantics, stages, unfreezing policies, optimizers, checkpoints."""

from workbench.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from workbench.train.evaluate import EvalResult, evaluate
from workbench.train.optim import build_optimizer, change_optimizer, optimizer_params, optimizer_size
from workbench.train.policies import POLICIES, StepPlan, UnfreezePolicy, make_policy
from workbench.train.stages import COMPONENTS, Stage, seed_stages, set_trainable
from workbench.train.step import (
    NONFINITE_POLICIES, SEMANTICS, LoopSemantics, NonFiniteError, StepConfig, StepMonitor, StepResult, TrainStep,
    get_semantics, make_scaler,
)

__all__ = [
    "COMPONENTS", "EvalResult", "LoopSemantics", "NONFINITE_POLICIES", "NonFiniteError", "POLICIES", "SEMANTICS",
    "Stage", "StepConfig", "StepMonitor", "StepPlan", "StepResult", "TrainStep", "UnfreezePolicy",
    "build_optimizer", "change_optimizer", "evaluate", "get_semantics", "load_checkpoint", "make_policy",
    "make_scaler", "model_from_checkpoint", "optimizer_params", "optimizer_size", "save_checkpoint",
    "seed_stages", "set_trainable",
]
