"""The grid of a sweep: axes over the run settings the schema marks as sweepable, the runs they stand for, and
stable run ids.

Every axis value is checked by the setting's own check (`workbench.run.settings`), so a grid accepts exactly what
`workbench run` and the notebooks accept. Grid points that are the same run share one run id: with N = 0 every
policy is the plain joint stage, and the rebuild-at-unfreeze switch exists only for a policy that freezes. Every
run trains the decoder for the grid's `steps` after its first trainable step, so a run frozen for N steps has
N + steps steps, and its CTC-only control as many (equal budgets). A run id carries a stamp of the package's code, so a resumed sweep never mixes in logs that older
code wrote.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from workbench.run.settings import RunSettings, SettingsError, axes, check, defaults_of
from workbench.studies.criteria import AXES
from workbench.train.policies import POLICIES, make_policy

PACKAGE = Path(__file__).resolve().parents[2]

# Grid order: the slice axes outermost, then lr, N innermost, so a family of N finishes together.
GRID_ORDER = tuple(a for a in AXES if a != "freeze_steps") + ("freeze_steps",)
# Axes a CTC-only control does not have (it never attaches the decoder).
DECODER_AXES = ("policy", "freeze_steps", "rebuild_at_unfreeze", "rnnt_normalization", "decoder_lr")
DEFAULT_AXES: dict[str, tuple] = {"freeze_steps": (0, 1, 10, 30, 100), "lr": (1e-5, 5e-5, 1e-4, 1e-3),
                                  "policy": ("freeze_params",), "semantics": ("seed_faithful", "corrected")}


class SweepError(ValueError):
    """Bad sweep input (grid values, a folder that belongs to another checkpoint, a folder in use)."""


def _axis(name: str, values: Any) -> tuple:
    """An axis as a tuple without duplicates, every value checked by its setting; a one-line SweepError else."""
    seq = list(values) if isinstance(values, (list, tuple)) else [values]
    if not seq:
        raise SweepError(f"{name}: expected at least one value")
    out: list[Any] = []
    for value in seq:
        try:
            ok = check(name, value, axes()[name])
        except SettingsError as exc:
            raise SweepError(str(exc)) from None
        if ok not in out:
            out.append(ok)
    return tuple(out)


class SweepGrid:
    """The axes of a sweep: each sweepable run setting (`settings.axes()`) takes a value or a list; axes not
    given take `DEFAULT_AXES` or the setting's default. `steps` is the number of joint steps after the decoder's
    first trainable step (a run frozen for N steps has N + steps); `controls` adds the CTC-only control runs, one per
    run length, each step-matched to its runs (`control_settings`); `fixed` sets run settings that are not axes (e.g. eval_after_attach)."""

    def __init__(self, *, steps: int = 20, batch_size: int = 4, controls: bool = True,
                 fixed: Mapping[str, Any] | None = None, **axis_values: Any) -> None:
        unknown = sorted(set(axis_values) - set(axes()))
        if unknown:
            raise SweepError(f"{unknown[0]}: not a sweep axis; the axes are {', '.join(axes())}")
        for name, value in (("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SweepError(f"{name}: expected a positive integer, got {value!r}")
        fixed = dict(fixed or {})
        clash = sorted(set(fixed) & (set(axes()) | {"name", "steps", "batch_size", "ctc_only"}))
        if clash:
            raise SweepError(f"{clash[0]}: set by the grid itself, not a fixed setting")
        try:
            RunSettings(**fixed)
        except (SettingsError, TypeError) as exc:
            raise SweepError(f"fixed settings: {exc}") from None
        defaults = defaults_of(RunSettings)
        self.axes: dict[str, tuple] = {
            name: _axis(name, axis_values.get(name, DEFAULT_AXES.get(name, defaults[name]))) for name in axes()}
        self.steps, self.batch_size, self.controls, self.fixed = steps, batch_size, controls, fixed

    def __getattr__(self, name: str) -> tuple:
        axes_ = self.__dict__.get("axes", {})
        if name in axes_:
            return axes_[name]
        raise AttributeError(name)

    def points(self) -> Iterator[dict[str, Any]]:
        """Grid points as axis dicts, slice axes outermost and N innermost (a family of N finishes together)."""
        for values in itertools.product(*(self.axes[a] for a in GRID_ORDER)):
            yield {a: v for a, v in sorted(zip(GRID_ORDER, values), key=lambda item: AXES.index(item[0]))}

    def to_dict(self) -> dict[str, Any]:
        return {**{k: list(v) for k, v in self.axes.items()}, "steps": self.steps, "batch_size": self.batch_size,
                "controls": self.controls, "fixed": self.fixed}


def joint_settings(grid: SweepGrid, point: Mapping[str, Any]) -> RunSettings:
    """The run a grid point stands for, with axes that cannot matter there set to one canonical value, so grid
    points that are the same run share one run id."""
    values = dict(point)
    if values["freeze_steps"] == 0 or values["policy"] == "none":
        values.update(policy="none", freeze_steps=0)
    if not POLICIES[values["policy"]].freezes:
        values["rebuild_at_unfreeze"] = True
    attach = make_policy(values["policy"], values["freeze_steps"]).attach_step
    return RunSettings(steps=attach - 1 + grid.steps, batch_size=grid.batch_size, **grid.fixed, **values)


def control_settings(grid: SweepGrid, point: Mapping[str, Any]) -> RunSettings:
    """The CTC-only control of a grid point, step-matched to its run: the RNN-T decoder is never attached, so the
    decoder's axes do not exist for it; it trains as many steps as the grid point's run (its final PER is compared
    at an equal budget), and where the run measures the validation PER `eval_after_attach` steps after the
    decoder's first trainable step (step N + k), the control measures it at the same step N + k."""
    joint = joint_settings(grid, point)
    values = {k: v for k, v in point.items() if k not in DECODER_AXES}
    fixed = dict(grid.fixed)
    if fixed.get("eval_after_attach"):
        fixed["eval_after_attach"] += make_policy(joint.policy, joint.freeze_steps).attach_step - 1
    return RunSettings(steps=joint.steps, batch_size=grid.batch_size, ctc_only=True, **fixed, **values)


def _label(name: str, value: Any) -> str:
    setting = axes()[name]
    if isinstance(value, bool):
        return "" if value else f"no_{name}"
    if value is None:
        return f"{setting.short or name}off"
    if isinstance(value, (int, float)):
        return f"{setting.short or name}{value:g}"
    return str(value)


@functools.cache
def code_stamp() -> str:
    """A short hash of the package's source files: it changes whenever the code that writes run logs does."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def run_id(settings: RunSettings) -> str:
    """A readable name from the axis values plus a short hash of every setting but the name and of the code
    (`code_stamp`): the same settings and code, the same id."""
    fields = settings.to_dict()
    fields.pop("name")
    fields["code"] = code_stamp()
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    names = [a for a in GRID_ORDER if not (settings.ctc_only and a in DECODER_AXES)]
    parts = [_label(a, fields[a]) for a in names]
    stem = "-".join(p for p in (["ctc_only"] if settings.ctc_only else []) + parts if p)
    return f"{stem}-{digest}"


@dataclass
class Plan:
    """The unique runs of one or more grids (controls first) and every grid point's run and control."""

    runs: dict[str, RunSettings] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)

    @property
    def controls(self) -> list[str]:
        return [rid for rid, s in self.runs.items() if s.ctc_only]


def make_plan(grids: SweepGrid | Sequence[SweepGrid]) -> Plan:
    grids = [grids] if isinstance(grids, SweepGrid) else list(grids)
    if not grids:
        raise SweepError("a sweep needs at least one grid")
    controls: dict[str, RunSettings] = {}
    joint: dict[str, RunSettings] = {}
    cells = []
    for grid in grids:
        for point in grid.points():
            settings = joint_settings(grid, point)
            rid = run_id(settings)
            joint.setdefault(rid, dataclasses.replace(settings, name=rid))
            cid = None
            if grid.controls:
                control = control_settings(grid, point)
                cid = run_id(control)
                controls.setdefault(cid, dataclasses.replace(control, name=cid))
            cells.append({"axes": point, "run": rid, "control": cid})
    return Plan({**controls, **joint}, cells)
