"""Widgets and figures in front of the explorer (`workbench.studies.explore`), for notebook 03.

Sliders and dropdowns only supply values; they are derived from the run settings' schema for the explorer's
CONTROLS. A Run button starts one run (never a slider move) and a Clear button empties the overlay.
Button-triggered runs draw into an `ipywidgets.Output` by replacing its `outputs` trait: a trait update reaches
the frontend from inside a callback, where display-handle updates captured by an Output widget are dropped.
"""

from __future__ import annotations

import base64
import traceback
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as widgets
from matplotlib.figure import Figure

from workbench.records import RunRecord
from workbench.run.settings import RunSettings, Setting, settings_of
from workbench.studies.explore import CONTROLS, Explorer, settings_from
from workbench.views.plots import figure_png, training_figure

# Gradient-norm groups drawn by default: the encoder the CTC stage trained and the fresh decoder it meets.
DEFAULT_GROUPS: tuple[str, ...] = ("encoder", "ctc_head", "rnnt_decoder.predictor", "rnnt_decoder.joint")


def overlay_figure(runs: Mapping[str, RunRecord], *, groups: Sequence[str] | None = DEFAULT_GROUPS,
                   terms: Sequence[str] | None = None,
                   title: str = "joint stage from the CTC-warm checkpoint") -> Figure:
    """The overlay of `runs`: loss terms, group norms, scale, non-finite entries (`groups`/`terms`: None = all)."""
    return training_figure(runs, title=title, groups=None if groups is None else list(groups),
                           terms=None if terms is None else list(terms))


class OverlayView:
    """An explorer view that draws the overlay and hands the figure to `show` (a `LiveFigure.show`, or
    `OutputView.show` inside the widgets)."""

    def __init__(self, show: Callable[[Figure], None], *, groups: Sequence[str] | None = DEFAULT_GROUPS,
                 terms: Sequence[str] | None = None) -> None:
        self.show, self.groups, self.terms = show, groups, terms

    def draw(self, runs: Mapping[str, RunRecord]) -> None:
        self.show(overlay_figure(runs, groups=self.groups, terms=self.terms))


class OutputView:
    """Shows a figure in an `ipywidgets.Output` as its only output (one PNG, replaced at every redraw)."""

    def __init__(self, output: widgets.Output) -> None:
        self.output = output

    def show(self, fig: Figure) -> None:
        png = base64.b64encode(figure_png(fig)).decode("ascii")
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": png, "text/plain": "<training figure>"}},)


def widget_for(name: str, setting: Setting, value: Any) -> widgets.ValueWidget:
    """The control of one run setting: a dropdown over its choices, or a slider over its widget range."""
    style = {"description_width": "initial"}
    label = setting.label or name.replace("_", " ")
    check = setting.check
    if check.choices is not None:
        return widgets.Dropdown(options=list(check.choices()), value=value, description=label, style=style)
    if setting.widget is None:
        raise ValueError(f"setting {name!r} has no widget range")
    kind, lo, hi = setting.widget
    if kind == "log10":
        return widgets.FloatLogSlider(value=value, base=10, min=lo, max=hi, step=0.25, description=label,
                                      readout_format=".1e", continuous_update=False, style=style)
    return widgets.IntSlider(value=value, min=int(lo), max=max(int(hi), int(value)), description=label,
                             continuous_update=False, style=style)


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
        schema = settings_of(RunSettings)
        self.controls: dict[str, widgets.ValueWidget] = {
            name: widget_for(name, schema[name], defaults[name]) for name in CONTROLS}
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play",
                                         tooltip="fork one run from the CTC-warm checkpoint and overlay it")
        self.clear_button = widgets.Button(description="Clear", icon="trash", tooltip="empty the overlay")
        self.plot = widgets.Output()
        self.messages = widgets.Output(layout={"max_height": "12em", "overflow": "auto"})
        self.run_button.on_click(self._on_run)
        self.clear_button.on_click(self._on_clear)
        rows = [widgets.HBox([self.controls[n] for n in CONTROLS[i:i + 3]]) for i in range(0, len(CONTROLS), 3)]
        super().__init__([*rows, widgets.HBox([self.run_button, self.clear_button]), self.plot, self.messages])

    def values(self) -> dict[str, Any]:
        """The fixed fields and the controls' current values."""
        return {**self.fixed, **{name: widget.value for name, widget in self.controls.items()}}

    def _say(self, line: str) -> None:
        self.messages.append_stdout(line + "\n")

    def _on_run(self, _button: widgets.Button) -> None:
        self.run_button.disabled = True
        try:
            self.explorer.run(settings_from(self.values()), view=OverlayView(OutputView(self.plot).show),
                              log=self._say)
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
