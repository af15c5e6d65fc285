"""Which parameters hold a non-finite value after an optimizer update, checking only those written since the last
check: the one implementation `watch` and Lightning's `WorkbenchCallback` share.

A parameter the update wrote is judged by the norm of its change (`Updates.diff`: ||before - after||, finite only
when both are), which `OptimizerUpdates` measures anyway; any other parameter whose version counter moved (every
in-place write bumps it: a host-side count, no device read), and every parameter at the first check, goes through
the device screen `nonfinite_flags` in the caller's host copy. A suspect (a non-finite change, a flagged screen, or
a parameter found bad before and not written since) is settled by counting its non-finite elements, one read each
and only on a step with a suspect, so a finite parameter whose norm overflows is not called non-finite.

What it cannot see: a write through `.data` (it does not move the version counter).

    screen = ParamScreen(dict(model.named_parameters()))
    check = screen.queue(packet, screen.moved(), updates.pending_inside())   # after the update, before the copy
    packet.read()
    bad, elements = screen.settle(check, updates.decode().diff)
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch.nn as nn

from workbench.train import compat
from workbench.train.host import HostPacket, Slot, nonfinite_elements, nonfinite_flags

__all__ = ["ParamScreen", "ScreenCheck"]


class ScreenCheck:
    """One step's check, queued: `by_diff` (names the update wrote, judged by their change), `checked` (indices
    of the others screened on the device) and the screen's slot."""

    def __init__(self, by_diff: list[str], checked: list[int], flags: Slot | None) -> None:
        self.by_diff, self.checked, self.flags = by_diff, checked, flags


class ParamScreen:
    """The non-finite check over `named` parameters, step after step (see the module docstring)."""

    def __init__(self, named: Mapping[str, nn.Parameter]) -> None:
        self.names = list(named)
        self.params = list(named.values())
        self.index = {n: i for i, n in enumerate(self.names)}
        self._versions = compat.tensor_versions(self.params)    # every parameter's version counter at the last check
        self._unchecked = set(range(len(self.params)))           # not checked for non-finite values yet
        self._bad: set[str] = set()                              # holding a non-finite value, as last checked

    def moved(self) -> set[int]:
        """Indices of the parameters whose version counter moved since the previous call (host-side)."""
        versions = compat.tensor_versions(self.params)
        then, self._versions = self._versions, versions
        if versions == then:
            return set()
        return {i for i, (now, was) in enumerate(zip(versions, then)) if now != was}

    def queue(self, packet: HostPacket, moved: set[int], written: list[str]) -> ScreenCheck:
        """After the update: `moved` (from `moved()`), `written` (names of the parameters the update wrote and
        whose change `Updates.diff` will hold: `OptimizerUpdates.pending_inside()`). Queues the device screen of
        the other written ones in `packet`."""
        inside = {self.index[n] for n in written}
        by_diff = (moved & inside) - self._unchecked
        checked = sorted((moved | self._unchecked) - by_diff)
        flags = packet.add(nonfinite_flags([self.params[i] for i in checked])) if checked else None
        self._unchecked = set()
        return ScreenCheck([self.names[i] for i in sorted(by_diff)], checked, flags)

    def settle(self, check: ScreenCheck, diff: Mapping[str, float]) -> tuple[list[str], int]:
        """After the copy: (names in parameter order, elements) of the parameters holding a non-finite value.
        `diff`: `Updates.diff` of the step (empty when it had no update)."""
        flags: np.ndarray | None = None if check.flags is None else check.flags.value
        suspects = self._bad.difference(check.by_diff).difference(self.names[i] for i in check.checked) \
            if self._bad else set()
        if not all(map(math.isfinite, diff.values())):  # names are looked at only on a step with a bad change
            suspects.update(n for n in check.by_diff if not math.isfinite(diff.get(n, 0.0)))
        if flags is not None and flags.any():
            suspects.update(self.names[i] for i, f in zip(check.checked, flags.tolist()) if f)
        if not suspects:
            self._bad = set()
            return [], 0
        names = [n for n in self.names if n in suspects]
        counts = nonfinite_elements([self.params[self.index[n]].detach() for n in names])
        bad = [n for n, c in zip(names, counts) if c]
        self._bad = set(bad)
        return bad, sum(counts)
