"""The replay bundle a `byo.instrument` session or a Lightning `WorkbenchCallback` keeps beside its run log, so that
`workbench diagnose` can continue the run from the step where its evidence appears.

Of the bundles the run captures at its step starts (the tracer's, or the session's own once the tracer stops), it
keeps on disk the one of the run's first step at which the evidence appears, the most telling kind found:

    0  the earliest step (a run that shows nothing else: a slow loss)
    1  the first step with a trainable tensor that got a gradient outside the optimizer
    2  the first step that went non-finite (loss, gradient norm or parameters)

A later step replaces the kept bundle only with a more telling kind, and a non-finite step ends the keeping. The
bundle goes to `<log stem>.bundle.pt` (`instrument.replay.save_bundle`, written to a temporary file and renamed,
so a crash leaves the previous one whole) and the log's `replay` attribute says where, which step and why, with
what diagnose needs to rebuild the run's loop: the optimizer's class and each group's parameter names at that
step, the precision, clip and loop semantics, and the import paths of the user's model (or LightningModule) class
and loss function. A bundle that cannot be written (a batch that is not tensors, numbers and containers of them)
ends the keeping; the reason goes to the log's `replay_error` attribute and training goes on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from workbench.instrument.replay import ReplayBundle, save_bundle
from workbench.records import Recorder

WHY: tuple[str, ...] = ("the earliest step", "the first step with a trainable tensor outside the optimizer",
                        "the first non-finite step")


def import_path(obj: Any) -> str | None:
    """`module:qualname` of a class or function defined at a module's top level; None for anything else (a
    lambda, a class defined inside a function, an instance)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def optimizer_layout(optimizer: torch.optim.Optimizer, model: nn.Module,
                     names: dict[int, str] | None = None) -> dict[str, Any]:
    """The optimizer's class (import path) and each group's parameter names, in the order of its state dict.
    `names`: id -> name of the model's parameters, when the caller holds it (else the model is walked)."""
    if names is None:
        names = {id(p): name for name, p in model.named_parameters()}
    return {"class": import_path(type(optimizer)),
            "groups": [[names.get(id(p), "?") for p in group["params"]] for group in optimizer.param_groups]}


def bundle_path(log_path: str | Path) -> Path:
    """Where the bundle of the log at `log_path` goes."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.stem + ".bundle.pt")


class BundleKeeper:
    """Keeps the most telling replay bundle of a run (see the module docstring). `loop`: the run-level facts stored
    with it (source, precision, clip, semantics, class and loss-function paths)."""

    def __init__(self, log_path: str | Path, recorder: Recorder, loop: dict[str, Any],
                 say: Callable[[str], None] = lambda line: None) -> None:
        self.path = bundle_path(log_path)
        self.recorder = recorder
        self.loop = loop
        self.say = say
        self.kind = -1
        self.stopped = False

    @property
    def done(self) -> bool:
        """Nothing more to keep: a non-finite step's bundle is kept, or keeping failed."""
        return self.stopped or self.kind == len(WHY) - 1

    def wants(self, *, outside: bool, nonfinite: bool) -> bool:
        """Whether the bundle of a step that showed this would be kept (a caller that rebuilds bundles on demand
        asks first)."""
        return not self.done and (2 if nonfinite else 1 if outside else 0) > self.kind

    def offer(self, bundle: ReplayBundle | None, layout: dict[str, Any], *, outside: bool, nonfinite: bool) -> None:
        """The bundle of a step that just ran, with the optimizer's layout at its start and what the step showed."""
        kind = 2 if nonfinite else 1 if outside else 0
        if bundle is None or not self.wants(outside=outside, nonfinite=nonfinite):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            save_bundle(tmp, bundle)
            os.replace(tmp, self.path)
        except Exception as exc:  # noqa: BLE001  (keeping a bundle must never stop the training)
            tmp.unlink(missing_ok=True)
            self.stopped = True
            error = f"step {bundle.step}: {type(exc).__name__}: {exc}".replace("\n", " ")
            self.recorder.note(replay_error=error)
            self.say(f"workbench: no replay bundle kept for diagnose: {error}")
            return
        self.kind = kind
        self.recorder.note(replay={**self.loop, "bundle": self.path.name, "step": bundle.step, "why": WHY[kind],
                                   "optimizer": layout})
