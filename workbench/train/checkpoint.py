"""Checkpoints as plain state dicts, loaded with weights_only=True (no pickled code runs on load)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from workbench.model import HybridModel, ModelConfig


def save_checkpoint(path: str | Path, model: HybridModel, *, stage: str, step: int, seed: int,
                    optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename) so an interrupted save never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.cfg),
        "stage": stage,
        "step": step,
        "seed": seed,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the config stored beside its weights."""
    state = load_checkpoint(path, map_location=device)
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()})
    model = HybridModel(cfg).to(device)
    model.load_state_dict(state["model"])
    return model, state
