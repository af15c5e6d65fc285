"""The interactive explorer behind notebook 03: joint-stage runs forked from one CTC-warm checkpoint, overlaid.

`Explorer` holds the state: `run(settings)` forks a run from the checkpoint (same weights, optimizer state and
batches every time), hands the overlay of every run kept so far to a view while it trains, keeps the finished
run for the next overlay and prints the outcome with the tracer's verdict; `clear()` empties the overlay. A
headless papermill run (where no widget callback ever fires) calls the same `run` once with the parameter
cell's values. The widgets and figures in front of it live in `workbench.views.explorer`.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from workbench.records import RunRecord, summarize
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings

# The run settings the explorer offers as controls (its widgets are derived from their settings).
CONTROLS: tuple[str, ...] = ("freeze_steps", "lr", "policy", "precision", "semantics", "steps")
# Joint steps of the notebook's run when its parameters do not say, per model preset.
EXPLORER_STEPS: dict[str, int] = {"tiny": 10, "small": 40, "seed": 4}
# Redraws per run when `every` is not given: drawing costs about a quarter of a second.
REDRAWS_PER_RUN = 20


class RunView(Protocol):
    """Where the overlay goes while runs train: `draw(runs)` with label -> RunRecord, oldest first."""

    def draw(self, runs: Mapping[str, RunRecord]) -> None: ...


def describe(values: Mapping[str, Any]) -> str:
    """A short run name from the control values, e.g. `freeze_params N=10, lr 1e-05, fp16, seed_faithful`."""
    return (f"{values['policy']} N={values['freeze_steps']}, lr {values['lr']:.0e}, {values['precision']}, "
            f"{values['semantics']}")


def settings_from(values: Mapping[str, Any]) -> RunSettings:
    """RunSettings from control values (the keys in CONTROLS) plus any other RunSettings fields (seed, ...).

    The run is named by `describe` unless `values` has a `name`.
    """
    fields = {f.name for f in dataclasses.fields(RunSettings)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"settings_from: {unknown[0]!r} is not a RunSettings field")
    missing = [key for key in CONTROLS if key not in values]
    if missing:
        raise ValueError(f"settings_from: no value for control {missing[0]!r}")
    return RunSettings(**{"name": describe(values), **values})


def outcome_lines(record: RunRecord) -> list[str]:
    """What a finished run printed: its outcome with the reasons, and the decisive link of its causal chain."""
    s = summarize(record)
    per = "-" if s["val_per"] is None else f"{s['val_per']:.3f}"
    final = s["final_loss"] if s["final_loss"] is not None else math.nan
    lines = [f"{s['name']}: {s['outcome']}; final loss {final:.4g}; val PER {per}; {len(s['overflow_steps'])} "
             f"overflow steps, {len(s['skipped_steps'])} skipped"]
    lines += [f"  {reason}" for reason in s["outcome_reasons"] + s["outcome_warnings"]]
    if s["tracer_verdict"]:
        lines.append(f"  decisive link: {s['tracer_verdict']}")
    if s["outside_optimizer"]:
        lines.append(f"  {len(s['outside_optimizer'])} trainable tensors outside the optimizer, e.g. "
                     f"{s['outside_optimizer'][0]}")
    return lines


class Explorer:
    """Joint-stage runs forked from `checkpoint` on `data`, kept for an overlay.

    Every run writes a run log to `<output_dir>/logs/<time>-<random>/run<k>.h5`. `history` holds the finished
    runs of the overlay (oldest first) and `overlay` their records (label -> RunRecord), including the run in
    progress. `every` is the redraw period in steps (default: about REDRAWS_PER_RUN redraws per run).
    """

    def __init__(self, checkpoint: str | Path, data: str | Path, output_dir: str | Path, *, device: str = "cpu",
                 every: int | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.data = Path(data)
        self.output_dir = Path(output_dir)
        self.device = device
        self.every = every
        self.history: list[RunRecord] = []
        self.overlay: dict[str, RunRecord] = {}
        self._count = 0
        logs = self.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # A fresh folder per explorer: run logs refuse to overwrite, and re-running the notebook must not collide.
        self.log_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=logs))

    def run(self, settings: RunSettings, *, view: RunView | None = None,
            log: Callable[[str], None] = print) -> RunRecord:
        """Fork one run, redraw the overlay in `view` while it trains, keep it in the overlay and return it.

        The run's name becomes `#<k> <settings.name>`, k counting this explorer's runs. Outcome lines (and the
        tracer's verdict when a step went non-finite) go to `log`. A run that raises is not kept.
        """
        self._count += 1
        settings = dataclasses.replace(settings, name=f"#{self._count} {settings.name}")
        label = settings.name
        every = self.every or max(1, settings.steps // REDRAWS_PER_RUN)

        def on_step(i: int, record: RunRecord) -> None:
            self.overlay[label] = record
            if record.first_nonfinite_loss_step() == i:
                log(f"{label}: step {i}: non-finite loss (the tracer's verdict follows at the end of the run)")
            if view is not None and i % every == 0:
                view.draw(self.overlay)

        log(f"{label}: {settings.steps} joint steps from {self.checkpoint.name}")
        try:
            record = run_joint(self.checkpoint, self.data, settings, log_path=self.log_dir / f"run{self._count}.h5",
                               device=self.device, on_step=on_step, log=lambda line: log(f"{label}: {line}"))
        except BaseException:
            self.overlay.pop(label, None)
            raise
        self.history.append(record)
        if view is not None:
            view.draw(self.overlay)
        for line in outcome_lines(record):
            log(line)
        return record

    def clear(self) -> None:
        """Empty the overlay: the next run is drawn alone."""
        self.history.clear()
        self.overlay.clear()
