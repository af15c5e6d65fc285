"""The interactive explorer behind notebook 03: joint-stage runs forked from one CTC-warm checkpoint, overlaid.

`Explorer` is the computation: `run(settings)` forks a run from the checkpoint (same weights, optimizer state
and batches every time), draws the overlay of every run kept so far while it trains, keeps the finished run
for the next overlay and prints the outcome with the tracer's verdict; `clear()` empties the overlay. It holds
all the state, so a headless papermill run (where no widget callback ever fires) calls the same `run` once
with the parameter cell's values.

`build_controls` puts ipywidgets in front of it: sliders and dropdowns only supply values, a Run button starts
one run (never a slider move) and a Clear button empties the overlay. Button-triggered runs draw into an
`ipywidgets.Output` by replacing its `outputs` trait: a trait update reaches the frontend from inside a
callback, where display-handle updates captured by an Output widget are dropped.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import ipywidgets as widgets
from matplotlib.figure import Figure

from workbench.device import PRECISIONS
from workbench.experiment import RunResult, RunSettings, RunState, run_joint
from workbench.plots import figure_png, save_figure, training_figure
from workbench.reproduce import summary_row
from workbench.train.step import SEMANTICS
from workbench.train.unfreeze import POLICIES

CONTROLS: tuple[str, ...] = ("warmup", "lr", "policy", "precision", "semantics", "steps")
# Gradient-norm groups drawn by default: the encoder the CTC stage trained and the fresh decoder it meets.
DEFAULT_GROUPS: tuple[str, ...] = ("encoder", "ctc_head", "rnnt_decoder.predictor", "rnnt_decoder.joint")
# Redraws per run when `every` is not given: drawing costs about a quarter of a second.
REDRAWS_PER_RUN = 20


class FigureView(Protocol):
    """Where live figures go: `workbench.plots.LiveFigure` (a display handle) or `OutputView` (a widget)."""

    def show(self, fig: Figure) -> None: ...


class OutputView:
    """Shows a figure in an `ipywidgets.Output` as its only output (one PNG, replaced at every redraw)."""

    def __init__(self, output: widgets.Output) -> None:
        self.output = output

    def show(self, fig: Figure) -> None:
        png = base64.b64encode(figure_png(fig)).decode("ascii")
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": png, "text/plain": "<training figure>"}},)


def describe(values: Mapping[str, Any]) -> str:
    """A short run name from the control values, e.g. `freeze_params N=10, lr 1e-05, fp16, seed_faithful`."""
    return (f"{values['policy']} N={values['warmup']}, lr {values['lr']:.0e}, {values['precision']}, "
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


def summarize(result: RunResult) -> dict[str, Any]:
    """JSON-ready outcome of one run: settings, first non-finite steps, tracer verdict, final losses, val PER."""
    return {**summary_row(result), "val_rnnt_per": result.val_rnnt_per, "events": result.events,
            "log": result.log_path}


def outcome_lines(result: RunResult) -> list[str]:
    """What a finished run printed: its outcome and, when the tracer replayed a step, its verdict."""
    total = result.losses.get("total", [])
    if result.first_nonfinite_loss_step is None and result.first_nonfinite_param_step is None:
        per = "-" if result.val_per is None else f"{result.val_per:.3f}"
        final = total[-1] if total else math.nan
        lines = [f"{result.name}: finite throughout; final loss {final:.4g}; val PER {per}"]
    else:
        lines = [f"{result.name}: first non-finite loss at step {result.first_nonfinite_loss_step}; parameters "
                 f"non-finite after step {result.first_nonfinite_param_step}; {len(result.overflow_steps)} "
                 f"overflow steps, {len(result.skipped_steps)} skipped"]
    if result.tracer_verdict:
        lines.append(f"  tracer: {result.tracer_verdict}")
    if result.outside_optimizer:
        lines.append(f"  {len(result.outside_optimizer)} trainable tensors outside the optimizer, e.g. "
                     f"{result.outside_optimizer[0]}")
    return lines


class Explorer:
    """Joint-stage runs forked from `checkpoint` on `data`, overlaid in one figure.

    Every run writes a run log to `<output_dir>/logs/<time>-<random>/run<k>.h5`. `history` holds the finished
    runs of the overlay (oldest first) and `overlay` their recorded series (label -> RunState), including the
    run in progress. `every` is the redraw period in steps (default: about REDRAWS_PER_RUN redraws per run);
    `groups` and `terms` choose the gradient-norm groups and loss terms drawn (None: all).
    """

    def __init__(self, checkpoint: str | Path, data: str | Path, output_dir: str | Path, *, device: str = "cpu",
                 every: int | None = None, groups: Sequence[str] | None = DEFAULT_GROUPS,
                 terms: Sequence[str] | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.data = Path(data)
        self.output_dir = Path(output_dir)
        self.device = device
        self.every = every
        self.groups = list(groups) if groups is not None else None
        self.terms = list(terms) if terms is not None else None
        self.history: list[RunResult] = []
        self.overlay: dict[str, RunState] = {}
        self._count = 0
        logs = self.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # A fresh folder per explorer: run logs refuse to overwrite, and re-running the notebook must not collide.
        self.log_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=logs))

    def run(self, settings: RunSettings, *, view: FigureView | None = None,
            log: Callable[[str], None] = print) -> RunResult:
        """Fork one run, redraw the overlay in `view` while it trains, keep it in the overlay and return it.

        The run's name becomes `#<k> <settings.name>`, k counting this explorer's runs. Outcome lines (and the
        tracer's verdict when a step went non-finite) go to `log`. A run that raises is not kept.
        """
        self._count += 1
        settings = dataclasses.replace(settings, name=f"#{self._count} {settings.name}")
        label = settings.name
        every = self.every or max(1, settings.steps // REDRAWS_PER_RUN)

        def on_step(i: int, state: RunState) -> None:
            self.overlay[label] = state
            if state.first_nonfinite_loss_step == i:
                log(f"{label}: step {i}: non-finite loss (the tracer's verdict follows at the end of the run)")
            if view is not None and i % every == 0:
                view.show(self.figure())

        log(f"{label}: {settings.steps} joint steps from {self.checkpoint.name}")
        try:
            result = run_joint(self.checkpoint, self.data, settings, log_path=self.log_dir / f"run{self._count}.h5",
                               device=self.device, on_step=on_step, log=lambda line: log(f"{label}: {line}"))
        except BaseException:
            self.overlay.pop(label, None)
            raise
        self.history.append(result)
        if view is not None:
            view.show(self.figure())
        for line in outcome_lines(result):
            log(line)
        return result

    def clear(self) -> None:
        """Empty the overlay: the next run is drawn alone."""
        self.history.clear()
        self.overlay.clear()

    def figure(self, title: str = "joint stage from the CTC-warm checkpoint") -> Figure:
        """The overlay of every kept run (and the one in progress): loss terms, group norms, scale, non-finite."""
        return training_figure(self.overlay, title=title, groups=self.groups, terms=self.terms)

    def save_figure(self, path: str | Path) -> Path:
        """Write the overlay figure as PNG."""
        return save_figure(self.figure(), path)


class ExplorerControls(widgets.VBox):
    """Controls of an Explorer: `controls` (name -> widget, names in CONTROLS), `run_button`, `clear_button`,
    `plot` (the live figure) and `messages` (outcome lines and tracer verdicts).

    The widgets hold only values; every run goes through `explorer.run`. `fixed` RunSettings fields (seed,
    batch_size, ...) are passed unchanged to every run.
    """

    def __init__(self, explorer: Explorer, defaults: Mapping[str, Any]) -> None:
        missing = [key for key in CONTROLS if key not in defaults]
        if missing:
            raise ValueError(f"explorer controls: no default for control {missing[0]!r}")
        self.explorer = explorer
        self.fixed = {k: v for k, v in defaults.items() if k not in CONTROLS}
        style = {"description_width": "initial"}
        longest = max(200, 2 * int(defaults["steps"]))
        self.controls: dict[str, widgets.ValueWidget] = {
            "warmup": widgets.IntSlider(value=defaults["warmup"], min=0, max=longest, description="warmup N",
                                        continuous_update=False, style=style),
            "steps": widgets.IntSlider(value=defaults["steps"], min=1, max=longest, description="joint steps",
                                       continuous_update=False, style=style),
            "lr": widgets.FloatLogSlider(value=defaults["lr"], base=10, min=-7, max=-1, step=0.25,
                                         description="learning rate", readout_format=".1e",
                                         continuous_update=False, style=style),
            "policy": widgets.Dropdown(options=POLICIES, value=defaults["policy"], description="unfreezing",
                                       style=style),
            "precision": widgets.Dropdown(options=PRECISIONS, value=defaults["precision"], description="precision",
                                          style=style),
            "semantics": widgets.Dropdown(options=list(SEMANTICS), value=defaults["semantics"],
                                          description="loop semantics", style=style),
        }
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play",
                                         tooltip="fork one run from the CTC-warm checkpoint and overlay it")
        self.clear_button = widgets.Button(description="Clear", icon="trash", tooltip="empty the overlay")
        self.plot = widgets.Output()
        self.messages = widgets.Output(layout={"max_height": "12em", "overflow": "auto"})
        self.run_button.on_click(self._on_run)
        self.clear_button.on_click(self._on_clear)
        c = self.controls
        super().__init__([
            widgets.HBox([c["warmup"], c["steps"], c["lr"]]),
            widgets.HBox([c["policy"], c["precision"], c["semantics"]]),
            widgets.HBox([self.run_button, self.clear_button]),
            self.plot,
            self.messages,
        ])

    def values(self) -> dict[str, Any]:
        """The fixed fields and the controls' current values."""
        return {**self.fixed, **{name: widget.value for name, widget in self.controls.items()}}

    def _say(self, line: str) -> None:
        self.messages.append_stdout(line + "\n")

    def _on_run(self, _button: widgets.Button) -> None:
        self.run_button.disabled = True
        try:
            self.explorer.run(settings_from(self.values()), view=OutputView(self.plot), log=self._say)
        except Exception:
            # ipywidgets sends a callback's exception to the kernel log only: show it where the user looks.
            self._say(traceback.format_exc())
        finally:
            self.run_button.disabled = False

    def _on_clear(self, _button: widgets.Button) -> None:
        self.explorer.clear()
        self.plot.outputs = ()
        self.messages.outputs = ()


def build_controls(explorer: Explorer, defaults: Mapping[str, Any]) -> ExplorerControls:
    """Widgets for `explorer`, starting at `defaults` (every key in CONTROLS, plus fixed RunSettings fields)."""
    return ExplorerControls(explorer, defaults)
