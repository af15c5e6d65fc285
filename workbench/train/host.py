"""The one device-to-host boundary: `to_host`, and the `HostPacket` that gathers a step's values for it.

A training step and every observer of it put the device values they need on the host (loss terms, the clip's
norm, the GradScaler's scale and found-inf verdict, gradient statistics, non-finite checks) into the step's
`HostPacket`; the packet concatenates them on the device and moves them in one `to_host` copy, so one host sync
serves them all. `HOST_COPIES` counts every copy; tests read it. The module lives in the training layer because
the step is its first user; `workbench.instrument.host` is the same boundary under the instruments' name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from workbench.train import compat

HOST_COPIES = 0


def to_host(t: torch.Tensor) -> np.ndarray:
    """Copy `t` (any shape, a numpy-representable dtype) to a new host array; one host sync on an accelerator.

    Always copies, even for a CPU tensor, so a caller may overwrite its device buffer right after the call.
    """
    global HOST_COPIES
    HOST_COPIES += 1
    return t.detach().to("cpu", copy=True).numpy()


class Slot:
    """Where one packed value arrives: `value` is its flat host array once the packet was read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._value: np.ndarray | None = None

    @property
    def value(self) -> np.ndarray:
        if self._value is None:
            raise RuntimeError("this value has not crossed to the host yet: read the packet first")
        return self._value


class HostPacket:
    """The device values one optimizer step needs on the host, moved together.

    `add(t)` queues a tensor (any shape, floating or integer, up to 2**24 exactly in float32) and returns its
    `Slot`; `read()` moves everything queued since the last read in one `to_host` copy (float32, or float64 when
    a queued tensor is float64) and fills the slots. A read with nothing queued copies nothing.
    `params_nonfinite(model)` is the step's one non-finite screen over the parameters, shared by every observer
    that asks for it.
    """

    def __init__(self) -> None:
        self._queued: list[tuple[Slot, torch.Tensor]] = []
        self._shared: dict[tuple[str, int], Slot] = {}
        self._grad_norms: dict[int, torch.Tensor] = {}  # by model: an instrument's float32 norms of its gradients

    def add(self, t: torch.Tensor) -> Slot:
        slot = Slot(t.numel())
        self._queued.append((slot, t.detach().reshape(-1)))
        return slot

    def read(self) -> None:
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        # Gathered where the values are (an empty check may sit on the CPU beside a model on a GPU).
        device = next((t.device for _, t in queued if t.numel()), queued[0][1].device)
        dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in queued) else torch.float32
        values = to_host(torch.cat([t.to(device, dtype, non_blocking=True) for _, t in queued]))
        start = 0
        for slot, _ in queued:
            slot._value = values[start:start + slot.size]
            start += slot.size

    def offer_grad_norms(self, model: torch.nn.Module, norms: torch.Tensor) -> None:
        """An instrument's float32 norms of `model`'s gradients at this step: the gradient screen comes from them
        when someone asks for it (`grads_nonfinite`); nothing is computed or copied otherwise."""
        self._grad_norms.setdefault(id(model), norms)

    def grads_nonfinite(self, model: torch.nn.Module) -> Slot:
        """One flag per gradient of `model`'s parameters (in parameter order; which gradients are screened is the
        first caller's choice, so read it only as "any flag set"): 1 where it may hold a NaN or inf. Shared by
        every caller of the step: from the norms an instrument offered (`offer_grad_norms`), for free; without
        them the first caller pays one multi-tensor reduction (`nonfinite_flags`)."""
        norms = self._grad_norms.get(id(model))
        return self._once(("grads", id(model)), lambda: (~torch.isfinite(norms)).float() if norms is not None
                          else nonfinite_flags([p.grad for p in model.parameters() if p.grad is not None]))

    def params_nonfinite(self, model: torch.nn.Module) -> Slot:
        """(P,) over `model.parameters()`: `nonfinite_flags` (1 where a parameter may hold a non-finite value, 0
        where it surely holds none; `nonfinite_elements` settles the flagged ones). One multi-tensor reduction per
        step, queued at the first call and shared by every later caller (ask after the update)."""
        return self._once(("params", id(model)), lambda: nonfinite_flags(list(model.parameters())))

    def _once(self, key: tuple[str, int], make: Callable[[], torch.Tensor]) -> Slot:
        """The slot of the step's shared value `key`, queued from `make()` at the first call."""
        if key not in self._shared:
            self._shared[key] = self.add(make())
        return self._shared[key]


def nonfinite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(k,) float32 on the first tensor's device: 1 where a tensor MAY hold a NaN or inf, 0 where it surely holds
    none. The device-side screen of the one non-finite check (`nonfinite_elements` settles it): a tensor's float32
    2-norm (one multi-tensor reduction, the cost of a norm) is finite exactly when every element is finite and the
    sum of squares stays below float32's range, so it flags every tensor with a NaN or inf and, besides them, only
    finite tensors with values near 1e19 or beyond (an fp16 norm would overflow long before the values do)."""
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    with torch.no_grad():  # reads parameters as they are: no detached view per tensor
        norms = compat.foreach_norm(tensors, 2, dtype=torch.float32)
        on_one = all(n.device == device for n in norms)
        return (~torch.isfinite(torch.stack(norms if on_one else [n.to(device) for n in norms]))).float()


def surely_finite(t: torch.Tensor) -> bool:
    """True when `t` is in host memory and holds no NaN or inf; False on an accelerator, without reading it.

    Lets an instrument skip a count that a finite screen makes zero where reading the screen costs no sync (the
    CPU); on an accelerator it always does the work on the device and reads the result in the step's one copy.
    """
    if t.device.type != "cpu":
        return False
    return math.isfinite(t.item()) if t.numel() == 1 else bool(torch.isfinite(t).all())  # item: 30x cheaper


def nonfinite_elements(tensors: Sequence[torch.Tensor], flags: Sequence[float] | None = None) -> list[int]:
    """How many elements of each tensor are NaN or inf, exactly: counted (one host read each) only where `flags`
    (`nonfinite_flags` on the host; None: every tensor) is set, 0 elsewhere. A tensor holds a non-finite value
    exactly when its count is above 0: the screen's flag alone is not that fact (a finite tensor near 1e19
    overflows the norm), so every caller that says "non-finite" settles it here."""
    with torch.no_grad():
        return [int((~torch.isfinite(t)).sum()) if flags is None or flags[k] else 0
                for k, t in enumerate(tensors)]
