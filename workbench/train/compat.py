"""Every private torch and Lightning internal the workbench uses, in one place, each with the reason no public API
does the job. Nothing else in `workbench` reads a name with a leading underscore from torch or Lightning
(tests/test_packaging.py scans for it) and tests/train/test_compat.py checks each internal against the installed
versions, so a torch or Lightning release that moves one fails there, by name, instead of silently here.

Public APIs used instead where they exist: `GradScaler.get_scale()` where a host read is due anyway, the
`LightningModule.trainer` setter, `torch.nn.utils.get_total_norm` / `clip_grad_norm_` for total norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.amp.grad_scaler import OptState
from torch.utils._python_dispatch import TorchDispatchMode  # the documented base of __torch_dispatch__ modes
from torch.utils._pytree import tree_flatten  # no public pytree module in torch <= 2.14

__all__ = ["TorchDispatchMode", "attached_trainer", "current_autograd_node", "foreach_abs", "foreach_copy_",
           "foreach_max", "foreach_mul_", "foreach_norm", "foreach_sub_", "found_inf", "module_hook_dicts",
           "op_arguments", "queue_backward_callback",
           "scale_tensor", "scheduler_children", "scheduler_group_lists", "set_state_dict_metadata",
           "state_dict_metadata",
           "tensor_version", "tensor_versions", "tree_flatten", "unscaled"]

# Per-tensor norms over a list in one kernel launch per device and dtype: torch's own `clip_grad_norm_` uses these;
# the public alternatives are a total norm only (`get_total_norm`) or one launch per tensor (`vector_norm`).
foreach_norm: Callable[..., tuple[torch.Tensor, ...]] = torch._foreach_norm
foreach_abs: Callable[..., tuple[torch.Tensor, ...]] = torch._foreach_abs
foreach_max: Callable[..., tuple[torch.Tensor, ...]] = torch._foreach_max
foreach_mul_: Callable[..., None] = torch._foreach_mul_
foreach_copy_: Callable[..., None] = torch._foreach_copy_
foreach_sub_: Callable[..., None] = torch._foreach_sub_


# ---------------------------------------------------------------------------------------------- GradScaler

def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The scaler's scale as its (1,) device tensor, None before its first `scale()`. `get_scale()` is the public
    read, but it is a host sync (`.item()`) on every call; the workbench reads once per step in one copy. The
    tensor is rewritten in place by `update()`: copy it to keep this step's value."""
    scale = scaler._get_scale_async()
    return scale if isinstance(scale, torch.Tensor) else None


def growth_tracker(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The scaler's count of unskipped steps since the last scale change, as its device tensor (None before the
    first `scale()`). `state_dict()` reads it (and the scale) with `.item()`; a replay bundle copies the tensors."""
    tracker = scaler._growth_tracker
    return tracker if isinstance(tracker, torch.Tensor) else None


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The GradScaler's own skip verdict for `optimizer` this step, one (1,) float tensor per device (> 0:
    skipped), valid between `unscale_`/`step` and `update()`. No public API says whether `step()` skipped; the
    scale's change across `update()` is no test (an infinite or underflowed scale stays as it is when backed off)."""
    return list(scaler._found_inf_per_device(optimizer).values())


def unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether `scaler.unscale_(optimizer)` ran this step: GradScaler keeps it in private per-optimizer state and
    says it nowhere else."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is not None and state["stage"] is OptState.UNSCALED


# ---------------------------------------------------------------------------------------------- tensors, ops

def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter (autograd's own): a host-side integer, so reading it costs no device
    sync; no public API exposes it."""
    return int(tensor._version)


def tensor_versions(tensors: Iterable[torch.Tensor | None]) -> list[int]:
    """`tensor_version` of each tensor (-1 for None), read without a call per tensor (watch reads ~100 of them
    every step)."""
    return [-1 if t is None else t._version for t in tensors]


def state_dict_metadata(state: Any) -> Any:
    """The `_metadata` a `state_dict()` carries (module versions `_load_from_state_dict` consults); None without."""
    return getattr(state, "_metadata", None)


def set_state_dict_metadata(state: Any, metadata: Any) -> None:
    """Attach `metadata` to a state dict built by hand, as `state_dict()` does."""
    state._metadata = metadata


def op_arguments(func: Any) -> list[Any]:
    """The schema arguments (`.name`, `.is_write`, ...) of an aten OpOverload seen by a dispatch mode; the schema
    has no public accessor."""
    return list(func._schema.arguments)


def current_autograd_node() -> Any:
    """The autograd node running now (inside backward), None outside; no public API names it."""
    return torch._C._current_autograd_node()


# nn.Module's forward/backward hook dicts: no public API lists a module's hooks (a replica is copied without them).
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                      "_backward_pre_hooks")


def module_hook_dicts(module: torch.nn.Module) -> list[Any]:
    """The hook dicts `module` holds (each an OrderedDict, possibly empty)."""
    return [getattr(module, name) for name in _MODULE_HOOK_DICTS if hasattr(module, name)]


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run `callback` once the current backward pass has finished (call from inside a hook during backward):
    autograd's engine queue, which has no public entry point."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


# ---------------------------------------------------------------------------------------------- schedulers

# Per-group lists a torch LR scheduler keeps (LambdaLR's lr_lambdas, CyclicLR's max_lrs, ReduceLROnPlateau's
# min_lrs, `_last_lr` behind the public `get_last_lr()`): no public API adds a param group to a scheduler.
_SCHEDULER_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "min_lrs", "base_momentums", "max_momentums")


def scheduler_children(scheduler: Any) -> list[Any]:
    """The schedulers a SequentialLR / ChainedScheduler chains (private `_schedulers`); [] for any other."""
    return list(getattr(scheduler, "_schedulers", None) or [])


def scheduler_group_lists(scheduler: Any) -> dict[str, list[Any]]:
    """name -> the scheduler's per-group list, for each of `_SCHEDULER_LISTS` it has; assign back with setattr."""
    found = {name: getattr(scheduler, name, None) for name in _SCHEDULER_LISTS}
    return {name: values for name, values in found.items() if isinstance(values, list)}


# ---------------------------------------------------------------------------------------------- Lightning

@contextmanager
def attached_trainer(module: Any, trainer: Any) -> Iterator[None]:
    """Run with `trainer` attached to the LightningModule `module` (its public setter), then put back whatever was
    attached before: the public getter raises when none is, so the one read of `_trainer` is here."""
    saved = module._trainer
    module.trainer = trainer
    try:
        yield
    finally:
        module.trainer = saved
