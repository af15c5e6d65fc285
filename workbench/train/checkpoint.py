"""Checkpoints as plain state dicts, loaded with weights_only=True (no pickled code runs on load).

Loading checks what it reads: a file torch cannot read (text, truncated, another format), an archive member whose
bytes do not match the CRC-32 the zip archive stored when it was written (torch.load does not check it), a torch
file that is not a workbench checkpoint, a model, optimizer or GradScaler state holding a non-finite value, or
weights that do not fit the model the checkpoint describes all raise `CheckpointError`, one line naming the file
and what was expected (the member or tensor where there is one).
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from workbench.model import HybridModel, ModelConfig
from workbench.model.config import PRESETS

# What `save_checkpoint` writes and every reader relies on.
REQUIRED_KEYS = ("model", "model_config", "stage", "step", "seed")
# torch.save writes a zip archive; anything else (text, HDF5, an empty file) is rejected before torch parses it.
_ZIP_MAGIC = b"PK\x03\x04"
EXPECTED = "a workbench checkpoint (a torch file written by `workbench train` or `pretrain`)"


class CheckpointError(ValueError):
    """A file that is not a usable workbench checkpoint; the message is one line naming the file."""


def save_checkpoint(path: str | Path, model: HybridModel, *, stage: str, step: int, seed: int,
                    optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (a temporary file of this process, then a rename) so an interrupted save never leaves a
    truncated checkpoint and two processes saving to one path never write into each other's file."""
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _first_line(exc: BaseException) -> str:
    """`Type: first sentence of the message`, short enough for a one-line error."""
    text = str(exc).strip().split("\n")[0].split(". ")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def verify_archive(path: Path) -> None:
    """Read every member of the zip archive `path` and compare it with the CRC-32 stored when it was written;
    CheckpointError naming the file and the first damaged member (or the damaged directory) otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                try:
                    with archive.open(info) as member:
                        while member.read(1 << 20):
                            pass
                except Exception as exc:  # noqa: BLE001  (zipfile reports damage with many exception types)
                    raise CheckpointError(f"{path}: {info.filename}: expected the bytes the archive's CRC-32 "
                                          f"describes, got a damaged member ({_first_line(exc)})") from None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: expected {EXPECTED}, got a damaged or truncated zip archive "
                              f"({_first_line(exc)})") from None


def _nonfinite_entries(value: Any, name: str) -> list[tuple[str, int, int]]:
    """(name, non-finite count, size) of every floating tensor or float under `value` that holds NaN/Inf."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() and not value.is_complex():
            return []
        bad = int((~torch.isfinite(value)).sum())
        return [(name, bad, value.numel())] if bad else []
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(name, 1, 1)]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _nonfinite_entries(v, f"{name}.{k}")]
    if isinstance(value, (list, tuple)):
        return [e for k, v in enumerate(value) for e in _nonfinite_entries(v, f"{name}.{k}")]
    return []


def check_finite_state(state: dict[str, Any], path: str | Path) -> None:
    """CheckpointError naming the first tensor of the model, optimizer or GradScaler state with a NaN/Inf value:
    a run forked from it would diagnose the damaged input as a training failure."""
    bad = [e for part in ("model", "optimizer", "scaler") for e in _nonfinite_entries(state.get(part), part)]
    if bad:
        name, count, size = bad[0]
        more = f"; {len(bad) - 1} more tensor(s) too" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: {_described(name, state)}: expected finite values, got {count} of {size} "
                              f"non-finite (NaN/Inf){more}; the checkpoint is damaged or was saved after its run "
                              f"diverged")


def _described(name: str, state: dict[str, Any]) -> str:
    """`optimizer.state.17.exp_avg_sq` with the optimizer group that parameter 17 belongs to."""
    parts = name.split(".")
    if parts[:2] != ["optimizer", "state"] or len(parts) < 3:
        return name
    for group in (state.get("optimizer") or {}).get("param_groups", []):
        if isinstance(group, dict) and str(parts[2]) in map(str, group.get("params", [])) and "name" in group:
            return f"{name} (a parameter of optimizer group {group['name']!r})"
    return name


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's state dict; CheckpointError when the file is not a workbench checkpoint, its archive is
    damaged (a CRC-32 mismatch) or its model, optimizer or scaler state holds a non-finite value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    expected = EXPECTED
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        got = "an empty file" if not head else f"a file that is not a torch zip archive (it starts with {head!r})"
        raise CheckpointError(f"{path}: expected {expected}, got {got}")
    verify_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch reports unreadable files with many exception types)
        raise CheckpointError(f"{path}: expected {expected}, got a torch archive that does not load (truncated, "
                              f"damaged or unsafe: {_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected {expected}, got a torch file holding a {type(state).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        keys = ", ".join(sorted(map(str, state))[:8]) or "none"
        raise CheckpointError(f"{path}: expected {expected} with keys {', '.join(REQUIRED_KEYS)}, got a torch file "
                              f"without {', '.join(missing)} (its keys: {keys})")
    if not isinstance(state["model"], dict) or not isinstance(state["model_config"], dict):
        raise CheckpointError(f"{path}: expected {expected} whose model and model_config are dicts, got "
                              f"{type(state['model']).__name__} and {type(state['model_config']).__name__}")
    check_finite_state(state, path)
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path) -> ModelConfig:
    """The ModelConfig stored in a loaded checkpoint; CheckpointError naming the field when it is not one."""
    try:
        return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: model_config: expected the settings of a workbench model, got "
                              f"{_first_line(exc)}") from None


def describe_config(cfg: ModelConfig) -> str:
    """The preset's name when `cfg` is one, else its main sizes."""
    for name, preset in PRESETS.items():
        if preset == cfg:
            return f"the {name!r} preset"
    return f"a model with d_model {cfg.d_model}, {cfg.n_layers} layer(s), predictor {cfg.predictor_dim}"


def load_weights(model: nn.Module, weights: dict[str, Any], path: str | Path) -> None:
    """`model.load_state_dict(weights)`, with a mismatch reported as one line naming the first differing tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and getattr(weights[k], "shape", None) != own[k].shape]
    if missing or unexpected or shapes:
        if shapes:
            k = shapes[0]
            detail = f"{k} of shape {tuple(own[k].shape)}, got {tuple(getattr(weights[k], 'shape', ()))}"
        elif missing:
            detail = f"{len(missing)} tensor(s) it lacks, e.g. {missing[0]}"
        else:
            detail = f"no tensor {unexpected[0]} ({len(unexpected)} unexpected)"
        raise CheckpointError(f"{path}: model: expected weights of {describe_config(model.cfg)}: {detail}")
    model.load_state_dict(weights)


def check_checkpoint(path: str | Path, expected: ModelConfig | None = None, *,
                     stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load and check a checkpoint before anything is trained on it: its config builds a model its weights fit,
    it is of the `expected` model when given (resuming a preset), and its stage is one of `stages` when given."""
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, path)
    if expected is not None and cfg != expected:
        raise CheckpointError(f"{path}: model_config: expected {describe_config(expected)}, got "
                              f"{describe_config(cfg)}")
    if stages is not None and state["stage"] not in stages:
        raise CheckpointError(f"{path}: stage: expected one of {', '.join(stages)}, got {state['stage']!r}")
    load_weights(HybridModel(cfg), state["model"], path)
    return state


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the config stored beside its weights. The file is read on the CPU (a GPU-saved
    checkpoint loads anywhere); the weights are copied into the model on `device`."""
    state = load_checkpoint(path)
    model = HybridModel(checkpoint_config(state, path)).to(device)
    load_weights(model, state["model"], path)
    return model, state
