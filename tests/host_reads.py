"""Count the device-to-host reads made by workbench code.

A read is any call that brings a tensor's value to the host: `Tensor.item`, `tolist`, `__bool__`, `__float__`,
`__int__`, `numpy`, `cpu` (each a host sync on an accelerator), plus `to_host`, the one sanctioned transfer
(counted by its own counter, `HOST_COPIES`; the reads inside it are not counted again). Reads in
`workbench/train/host.py` are the boundary's own: `to_host`'s, and `surely_finite`'s, which reads only a tensor
already in host memory (no sync) and nothing on an accelerator. `HostReads` patches the
methods and counts the calls whose caller is a file under `workbench/`; reads made by torch itself (inside
`GradScaler.step`, an optimizer's step) or by the test are not counted; `GradScaler.get_scale`, a read on
request, counts when workbench code calls it.

    with HostReads() as reads:
        for _ in range(4):
            step(batch)
    assert reads.per_step(4) == 1 and reads.outside == []

Add an entry point to `tests/instrument/test_host_reads.py` with one line in its parametrisation.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import workbench
from workbench.train import host

PACKAGE = str(Path(workbench.__file__).resolve().parent)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
HOST_FILE = str(Path(host.__file__).resolve())


def _from_workbench(depth: int) -> str | None:
    """`file:line` of the caller `depth` frames up when that file is workbench code, else None."""
    frame = sys._getframe(depth)
    filename = str(Path(frame.f_code.co_filename).resolve())
    if filename == HOST_FILE:
        return None
    return f"{filename[len(PACKAGE) - len('workbench'):]}:{frame.f_lineno}" if filename.startswith(PACKAGE) else None


class HostReads:
    """Context manager counting reads from workbench code: `transfers` (to_host calls) and `outside` (the
    `file:line method` of every other read)."""

    def __init__(self) -> None:
        self.transfers = 0
        self.outside: list[str] = []
        self._saved: dict[str, Any] = {}
        self._copies = 0

    def __enter__(self) -> HostReads:
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t: torch.Tensor, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any):
                where = _from_workbench(2)
                if where is not None:
                    self.outside.append(f"{where} {_name}")
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        original_scale = torch.amp.GradScaler.get_scale
        self._saved_scale = original_scale

        def counted_scale(scaler: torch.amp.GradScaler) -> float:
            where = _from_workbench(2)
            if where is not None and scaler._get_scale_async() is not None:  # else the init scale, no read
                self.outside.append(f"{where} GradScaler.get_scale")
            return original_scale(scaler)

        torch.amp.GradScaler.get_scale = counted_scale
        self._copies = host.HOST_COPIES
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        torch.amp.GradScaler.get_scale = self._saved_scale
        self.transfers = host.HOST_COPIES - self._copies

    @property
    def total(self) -> int:
        return self.transfers + len(self.outside)

    def per_step(self, steps: int) -> float:
        """Reads from workbench code per step, transfers and other reads together."""
        return self.total / steps
