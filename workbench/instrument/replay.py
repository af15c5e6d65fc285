"""Replay bundles: what it takes to re-run one TrainStep exactly, on a private copy of the model.

A bundle is taken at the start of a step (before its forward), so replaying it reproduces that step: same
batches, weights, loss flags, parameters, buffers, optimizer and GradScaler state, RNG state, and the gradients
that the step's `zero_grad` does not clear (with the seed's `zero_grad_scope="optimizer"`, the parameters
outside the optimizer keep, and keep accumulating, their gradients across steps: modessm.md 7 A).

Cost of `capture`: one copy of the parameters and buffers (the model state dict), one copy of the optimizer
state (two parameter-sized tensors for Adam/AdamW), the surviving gradients (none with `zero_grad_scope="model"`)
and one copy of the batches, all kept on the device they live on: device memory, no host sync (the GradScaler's
scale and growth tracker are kept as device tensors too, not read with `get_scale()`). The bundle crosses to the
host only when it is kept: `ReplayBundle.to_host()`, which `save_bundle` calls.

A replay never touches the live run: `replica` deep-copies the model and optimizer (without the live model's
hooks, so other probes do not see the replay), and `bundle_rng` restores the caller's RNG state on exit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from workbench.train import compat

if TYPE_CHECKING:
    from workbench.train.step import TrainStep

BUNDLE_FORMAT = "workbench.replay_bundle/1"

@dataclass
class ReplayBundle:
    """Everything needed to replay one optimizer step. Tensors live where `capture` found them (the step's
    device) until `to_host()`; the RNG states are host tensors always.

    step: the index the replayed step has (TrainStep.step_index during that step).
    batches: the step's micro-batches (objects with `.to(device)`).
    weights: the loss weights passed to the step; rnnt/mode: the step's loss flags.
    model_state: the model's state dict (parameters and persistent buffers, cloned).
    optimizer_state: the optimizer's state dict (cloned).
    scaler_state: the GradScaler's state dict, or None without a scaler; "scale" and "_growth_tracker" may be
        0-dim device tensors until `to_host()` (`scaler_numbers` gives the plain state dict).
    grads: name -> gradient of every parameter whose gradient survives the step's zero_grad.
    trainable: names of the parameters with requires_grad=True.
    cpu_rng: torch's CPU generator state; cuda_rng: one state per CUDA device, or None off CUDA.
    precision: the step's precision ("fp32" | "bf16" | "fp16").
    """

    step: int
    batches: list[Any]
    weights: Any
    rnnt: bool
    mode: bool
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scaler_state: dict[str, Any] | None
    grads: dict[str, torch.Tensor]
    trainable: list[str]
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    precision: str

    def to_host(self) -> ReplayBundle:
        """This bundle with every tensor copied to the CPU and the scaler's state as plain numbers (host syncs: the
        one time a kept bundle pays for crossing)."""
        cpu = torch.device("cpu")
        return dataclasses.replace(
            self, batches=[copy.deepcopy(b.to(cpu)) for b in self.batches],
            model_state=_copy(self.model_state, cpu), optimizer_state=_copy(self.optimizer_state, cpu),
            scaler_state=scaler_numbers(self.scaler_state), grads=_copy(self.grads, cpu))


def _copy(obj: Any, device: torch.device | None = None) -> Any:
    """Copy of a (nested) state dict with every tensor cloned (onto `device`, else where it is), so the copy aliases
    nothing live. An OrderedDict's `_metadata` (module versions that `load_state_dict` consults) is kept."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if device is None else obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        out = type(obj)((k, _copy(v, device)) for k, v in obj.items())
        metadata = compat.state_dict_metadata(obj)
        if metadata is not None:
            compat.set_state_dict_metadata(out, copy.deepcopy(metadata))
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v, device) for v in obj)
    return copy.deepcopy(obj)


def _scaler_state(scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """GradScaler.state_dict() without its host reads: the scale and the growth tracker as copies of the device
    tensors once the scaler has scaled (before that `state_dict()` reads nothing)."""
    scale, tracker = compat.scale_tensor(scaler), compat.growth_tracker(scaler)
    state = scaler.state_dict() if scale is None or tracker is None else {
        "scale": scale.detach().reshape(()).clone(), "growth_factor": scaler.get_growth_factor(),
        "backoff_factor": scaler.get_backoff_factor(), "growth_interval": scaler.get_growth_interval(),
        "_growth_tracker": tracker.detach().reshape(()).clone()}
    return state


def scaler_numbers(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A captured GradScaler state with its device tensors read as the numbers `GradScaler.load_state_dict` takes."""
    if state is None:
        return None
    out = dict(state)
    if isinstance(out.get("scale"), torch.Tensor):
        out["scale"] = float(out["scale"])
    if isinstance(out.get("_growth_tracker"), torch.Tensor):
        out["_growth_tracker"] = int(out["_growth_tracker"])
    return out


def _surviving_grads(step: TrainStep) -> dict[str, torch.Tensor]:
    """Gradients the step's zero_grad leaves in place: those of parameters outside the optimizer when only the
    optimizer's parameters are zeroed; none when the whole model is."""
    if step.config.semantics.zero_grad_scope == "model":
        return {}
    held = {id(p) for group in step.optimizer.param_groups for p in group["params"]}
    return {name: p.grad.detach().clone() for name, p in step.model.named_parameters()
            if p.grad is not None and id(p) not in held}


def capture(step: TrainStep, batches: Any | Sequence[Any], weights: Any, *, rnnt: bool = True,
            mode: bool = False, index: int | None = None) -> ReplayBundle:
    """Snapshot the state `step` is about to run from (see the module docstring for the cost).

    `index` defaults to `step.step_index`, which is right from an observer's `on_step_start` (TrainStep has
    already advanced its counter there); pass `index=step.step_index + 1` when capturing before calling the step.
    """
    batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    on_cuda = step.device.type == "cuda"
    return ReplayBundle(
        step=step.step_index if index is None else index,
        batches=[copy.deepcopy(b) for b in batches],
        weights=copy.deepcopy(weights),
        rnnt=rnnt,
        mode=mode,
        model_state=_copy(step.model.state_dict()),
        optimizer_state=_copy(step.optimizer.state_dict()),
        scaler_state=None if step.scaler is None else _scaler_state(step.scaler),
        grads=_surviving_grads(step),
        trainable=[name for name, p in step.model.named_parameters() if p.requires_grad],
        cpu_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if on_cuda else None,
        precision=step.config.precision,
    )


def replica(step: TrainStep, bundle: ReplayBundle) -> TrainStep:
    """A TrainStep on deep copies of `step`'s model and optimizer, restored to `bundle`'s state.

    Same config, loss_fn and device, no observers, and none of the live model's forward/backward hooks. The
    (model, optimizer) pair is copied together so the copied optimizer holds the copied parameters; the
    structure must match the bundle's (same parameter names, same optimizer groups). Global RNG state is not
    touched: run the replica inside `with bundle_rng(bundle):` to reproduce dropout and other draws.
    """
    if bundle.precision != step.config.precision:
        raise ValueError(f"bundle precision {bundle.precision!r} differs from the step's "
                         f"{step.config.precision!r}")
    # The live model's forward/backward hook dicts are copied as empty ones: probes on it stay silent.
    memo: dict[int, Any] = {id(hooks): OrderedDict() for m in step.model.modules()
                            for hooks in compat.module_hook_dicts(m)}
    model, optimizer = copy.deepcopy((step.model, step.optimizer), memo)
    model.load_state_dict(bundle.model_state)
    # Optimizer.load_state_dict keeps same-device tensors as they are: give it copies, not the bundle's own.
    optimizer.load_state_dict(copy.deepcopy(bundle.optimizer_state))
    params = dict(model.named_parameters())
    trainable = set(bundle.trainable)
    for name, p in params.items():
        p.requires_grad_(name in trainable)
        p.grad = None
    for name, grad in bundle.grads.items():
        params[name].grad = grad.to(params[name].device, copy=True)
    scaler = None
    numbers = scaler_numbers(bundle.scaler_state)
    if numbers is not None:
        scaler = torch.amp.GradScaler(step.device.type)
        scaler.load_state_dict(numbers)
    rep = type(step)(model, optimizer, step.config, step.device, scaler=scaler, loss_fn=step.loss_fn)
    rep.step_index = bundle.step - 1
    return rep


@contextlib.contextmanager
def bundle_rng(bundle: ReplayBundle) -> Iterator[None]:
    """Run the body with the bundle's RNG state; the caller's CPU (and CUDA) RNG state is restored on exit."""
    devices = list(range(len(bundle.cuda_rng))) if bundle.cuda_rng is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(bundle.cpu_rng)
        if bundle.cuda_rng is not None:
            torch.cuda.set_rng_state_all(bundle.cuda_rng)
        yield


def _encode(obj: Any) -> dict[str, Any]:
    """A dataclass as {"type": "module:qualname", "fields": {name: value}}; anything else is stored as is."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"type": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}}
    return {"type": None, "fields": obj}


def _resolve(name: str) -> type:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise TypeError(f"{name} is not a dataclass; pass its type to load_bundle")
    return obj


def _decode(entry: dict[str, Any], cls: type | None) -> Any:
    if entry["type"] is None:
        return entry["fields"]
    return (cls or _resolve(entry["type"]))(**entry["fields"])


def save_bundle(path: str | Path, bundle: ReplayBundle) -> None:
    """Write `bundle` with torch.save in a form `torch.load(weights_only=True)` accepts.

    Constraint: each batch (and the loss weights, when not a plain dict or number) must be a dataclass whose
    init fields hold only tensors, numbers, strings, None and lists/tuples/dicts of those (as
    `workbench.data.Batch` and `workbench.model.losses.LossWeights` do). It is stored as a dict of its fields plus its
    type's import path, and rebuilt by calling the type with those fields.
    """
    bundle = bundle.to_host()
    payload = {
        "format": BUNDLE_FORMAT,
        "step": bundle.step,
        "batches": [_encode(b) for b in bundle.batches],
        "weights": _encode(bundle.weights),
        "rnnt": bundle.rnnt,
        "mode": bundle.mode,
        "model_state": bundle.model_state,
        "optimizer_state": bundle.optimizer_state,
        "scaler_state": bundle.scaler_state,
        "grads": bundle.grads,
        "trainable": bundle.trainable,
        "cpu_rng": bundle.cpu_rng,
        "cuda_rng": bundle.cuda_rng,
        "precision": bundle.precision,
    }
    for entry in payload["batches"]:
        if entry["type"] is None:
            raise TypeError(f"save_bundle: batches must be dataclasses, got {type(entry['fields']).__name__}")
    torch.save(payload, Path(path))


def load_bundle(path: str | Path, *, batch_type: type | None = None,
                weights_type: type | None = None) -> ReplayBundle:
    """Read a bundle written by `save_bundle` with `torch.load(weights_only=True)`.

    Batches and weights are rebuilt with `batch_type` / `weights_type` when given, else with the dataclass
    recorded at save time (imported by its module path).
    """
    payload = torch.load(Path(path), weights_only=True)
    if payload.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: not a replay bundle (format {payload.get('format')!r})")
    return ReplayBundle(
        step=payload["step"],
        batches=[_decode(entry, batch_type) for entry in payload["batches"]],
        weights=_decode(payload["weights"], weights_type),
        rnnt=payload["rnnt"],
        mode=payload["mode"],
        model_state=payload["model_state"],
        optimizer_state=payload["optimizer_state"],
        scaler_state=payload["scaler_state"],
        grads=payload["grads"],
        trainable=payload["trainable"],
        cpu_rng=payload["cpu_rng"],
        cuda_rng=payload["cuda_rng"],
        precision=payload["precision"],
    )
