"""The contract every instrument follows: an observer of at most one TrainStep at a time, removable.

An instrument reacts to some of TrainStep's events (`on_step_start`, `on_losses`, `on_after_backward`,
`on_pack`, `on_step_end`); what it needs on the host it queues in the step's `ctx.packet` (at `on_after_backward`
when it is known by then, else at `on_pack`) and reads at `on_step_end`, so the step makes one host copy for
all of them. When the step had to read its packet before the update (`skip_step` without a GradScaler), what an
observer queues at `on_pack` crosses with the next step's copy and its `on_step_end` for step k comes late (after
step k+1's decision read, or at `TrainStep.settle()`), with `ctx.step` still k: keep per-step state keyed by step,
not "the current step". It may offer what a run's recorder reads after each step: `row(step)`, the flat per-step values
it measured for that step (empty when it measured nothing there), and `events(step)`, the (table, row) event
records it produced at that step. Adding an instrument is one class here in `instrument/` with these methods.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, TypeVar

_O = TypeVar("_O", bound="StepObserver")


class StepObserver:
    """Attach/detach contract of the probes.

    Attaching appends the probe to `step.observers` unless it is already there, so re-running a notebook
    cell does not double count; `with probe.attached(step):` detaches on exit, errors included.
    """

    _train_step: Any = None

    def attach(self, step: Any) -> None:
        """Observe `step` (anything with an `observers` list, such as `workbench.train.TrainStep`)."""
        if self._train_step is not None and self._train_step is not step:
            self.detach()
        if not any(obs is self for obs in step.observers):
            step.observers.append(self)
        self._train_step = step

    def detach(self) -> None:
        """Stop observing; a no-op when not attached."""
        if self._train_step is not None:
            self._train_step.observers[:] = [obs for obs in self._train_step.observers if obs is not self]
            self._train_step = None

    @contextlib.contextmanager
    def attached(self: _O, step: Any) -> Iterator[_O]:
        """`with probe.attached(step):` observe `step` for the block, detaching on exit."""
        self.attach(step)
        try:
            yield self
        finally:
            self.detach()

    def row(self, step: int) -> dict[str, Any]:
        """Flat values measured at `step` for a run log (none by default)."""
        return {}

    def events(self, step: int) -> list[tuple[str, dict[str, Any]]]:
        """(table, row) event records produced at `step` (none by default)."""
        return []
