"""Staged training: stages, the one TrainStep, the loop, checkpoints and validation."""

from workbench.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from workbench.train.evaluate import EvalResult, evaluate
from workbench.train.loop import TrainConfig, run_training
from workbench.train.optim import build_optimizer, optimizer_params, optimizer_size
from workbench.train.stages import COMPONENTS, Stage, seed_stages, set_trainable
from workbench.train.step import (
    NONFINITE_POLICIES, SEMANTICS, LoopSemantics, NonFiniteError, StepConfig, StepResult, TrainStep,
    get_semantics, make_scaler,
)

__all__ = [
    "COMPONENTS", "EvalResult", "LoopSemantics", "NONFINITE_POLICIES", "NonFiniteError", "SEMANTICS", "Stage",
    "StepConfig", "StepResult", "TrainConfig", "TrainStep", "build_optimizer", "evaluate", "get_semantics",
    "load_checkpoint", "make_scaler", "model_from_checkpoint", "optimizer_params", "optimizer_size",
    "run_training", "save_checkpoint", "seed_stages", "set_trainable",
]
