"""The one settings schema: every switch of a run, with its type, allowed values, default and help text.

A setting is a field of `RunSettings` (one joint-stage run forked from a CTC-warm checkpoint) or of
`TrainSettings` (staged training from scratch) whose metadata holds a `Setting`: help text, a `Check` (type,
allowed values, how to parse it from text) and whether it may vary across a sweep (`axis`). From these fields
come the command line's flags (`workbench.cli`), the sweep's axes (`workbench.studies.sweep`), the notebooks'
parameter validation (`validate_parameters`) and the explorer's widgets (`workbench.views.explorer`). Adding a
switch is one field here plus its use in the engine; both settings classes validate every value on
construction and raise `SettingsError` naming the setting and what it expects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

from workbench.model.config import PRESETS
from workbench.model.losses import RNNT_NORMALIZATIONS
from workbench.train.device import PRECISIONS
from workbench.train.optim import OPTIMIZERS
from workbench.train.policies import POLICIES
from workbench.train.step import SCOPES, SEMANTICS, LoopSemantics, get_semantics

_TRUE, _FALSE = ("yes", "true", "1", "on"), ("no", "false", "0", "off")


class SettingsError(ValueError):
    """A setting has a value it does not allow; the message is one line naming the setting."""


@dataclass(frozen=True)
class Check:
    """What values a setting takes: `kind` (bool, int, float or str), an optional test on the coerced value,
    choices (a callable, so registries filled later are seen), whether None is allowed (and whether 0 means
    None, as for the clip norm), and the text that describes an allowed value (used in every error message)."""

    kind: type
    expected: str
    test: Callable[[Any], bool] | None = None
    choices: Callable[[], Iterable[str]] | None = None
    optional: bool = False
    none_at_zero: bool = False

    def __call__(self, value: Any) -> Any:
        """The value coerced to `kind` (an int where a float is expected becomes a float); ValueError if not
        allowed, with the expectation as its message."""
        if value is None and self.optional:
            return None
        if self.none_at_zero and value == 0 and not isinstance(value, bool):
            return None
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if ok and self.choices is not None:
            ok = value in tuple(self.choices())
        if ok and self.test is not None:
            ok = self.test(value)
        if not ok:
            raise ValueError(self.describe())
        return value

    def describe(self) -> str:
        text = f"one of {', '.join(self.choices())}" if self.choices is not None else self.expected
        return text + (" (or none)" if self.optional and self.choices is not None else "")

    def parse(self, text: str) -> Any:
        """A value from command-line text, checked ("none"/"off" gives None where None is allowed)."""
        text = text.strip()
        if self.optional and text.lower() in ("none", "off"):
            return None
        try:
            if self.kind is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value: Any = text.lower() in _TRUE
            elif self.kind is int:
                value = int(text)
            elif self.kind is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise ValueError(self.describe()) from None
        return self(value)


def choice(options: Callable[[], Iterable[str]], *, optional: bool = False) -> Check:
    return Check(str, "", choices=options, optional=optional)


def integer(minimum: int, expected: str) -> Check:
    return Check(int, expected, test=lambda v: v >= minimum)


def positive_number(expected: str, *, optional: bool = False) -> Check:
    return Check(float, expected, test=lambda v: math.isfinite(v) and v > 0, optional=optional)


def _clip(value: float) -> bool:
    return math.isfinite(value) and value > 0


BOOL = Check(bool, "yes or no")
TEXT = Check(str, "a text", test=lambda v: bool(v.strip()))
PATH = Check(str, "a path", test=lambda v: bool(v.strip()))
CLIP = Check(float, "a positive max gradient norm (0 or off turns clipping off)", test=_clip, optional=True,
             none_at_zero=True)


@dataclass(frozen=True)
class Setting:
    """Metadata of one settings field: help text, its check, whether it may vary across a sweep (`axis`), its
    label prefix in run ids (`short`), and for the explorer its widget's label and range (`widget`:
    ("int", lo, hi) or ("log10", lo, hi) for a log slider)."""

    help: str
    check: Check
    axis: bool = False
    short: str = ""
    label: str = ""
    widget: tuple[str, float, float] | None = None

    def field(self, default: Any) -> Any:
        """A dataclass field with this setting's metadata and `default`."""
        return field(default=default, metadata={"setting": self})


# Settings shared by both settings classes (each defined once).
SEED = Setting("seed of the data order, dropout and the fresh decoder's initialisation", integer(0, "an integer >= 0"),
               axis=True, short="seed")
BATCH_SIZE = Setting("trials per batch", integer(1, "an integer >= 1"))
PRECISION = Setting("autocast precision (fp16 with a GradScaler)", choice(lambda: PRECISIONS), axis=True,
                    label="precision")
CLIP_NORM = Setting("max gradient norm; 0 or off turns clipping off", CLIP, axis=True, short="clip")
LOOP_SEMANTICS = Setting("training-loop semantics: the seed's loop or the corrected one",
                        choice(lambda: SEMANTICS), axis=True, label="loop semantics")
NORMALIZATION = Setting("RNN-T loss normalisation", choice(lambda: RNNT_NORMALIZATIONS), axis=True)
POLICY = Setting("unfreezing policy of the RNN-T decoder", choice(lambda: POLICIES), axis=True, label="unfreezing")
FREEZE_STEPS = Setting("freeze length N: steps the decoder stays frozen (or the length of its ramp)",
                       integer(0, "an integer >= 0 (steps)"), axis=True, short="N", label="freeze length N",
                       widget=("int", 0, 200))
REBUILD_AT_UNFREEZE = Setting("rebuild the optimizer when the decoder unfreezes (no: it trains outside it)", BOOL,
                              axis=True)


def _lr(help_text: str, axis: bool = False) -> Setting:
    return Setting(help_text, positive_number("a positive learning rate"), axis=axis, short="lr",
                   label="learning rate", widget=("log10", -7, -1))


@dataclass(frozen=True)
class RunSettings:
    """Everything that distinguishes one joint-stage run. Defaults are the seed's joint stage."""

    name: str = Setting("label of the run (names its figures and summary rows)", TEXT).field("run")
    steps: int = Setting("joint-stage steps of the run", integer(1, "an integer >= 1 (steps)"), label="joint steps",
                         widget=("int", 1, 400)).field(20)
    lr: float = _lr("joint-stage learning rate", axis=True).field(1e-5)
    precision: str = PRECISION.field("fp16")
    semantics: str = LOOP_SEMANTICS.field("seed_faithful")
    policy: str = POLICY.field("none")
    freeze_steps: int = FREEZE_STEPS.field(0)
    rebuild_at_unfreeze: bool = REBUILD_AT_UNFREEZE.field(True)
    clip: float | None = CLIP_NORM.field(1.0)
    rnnt_normalization: str = NORMALIZATION.field("seed_sqrt_tu")
    optimizer: str = Setting("optimizer kind (its settings are the seed's)", choice(lambda: OPTIMIZERS),
                             axis=True).field("adamw")
    init_scale: float = Setting("GradScaler initial loss scale (fp16)", positive_number("a positive finite scale"),
                                axis=True, short="scale").field(65536.0)
    batch_size: int = BATCH_SIZE.field(4)
    seed: int = SEED.field(0)
    ctc_only: bool = Setting("control run: the RNN-T decoder is never attached", BOOL).field(False)
    attribution_steps: int = Setting("steps attributed by loss term after the stage start and an unfreeze",
                                     integer(0, "an integer >= 0 (steps)")).field(2)
    trace: bool = Setting("replay the non-finite steps and report the causal chain of the first non-finite value",
                          BOOL).field(True)
    decoder_lr: float | None = Setting("learning rate of the fresh RNN-T decoder when it differs from lr",
                                       positive_number("a positive learning rate", optional=True), axis=True,
                                       short="dlr").field(None)
    eval_at_start: bool = Setting("measure the validation PER (CTC and the untrained decoder's RNN-T) before "
                                  "step 1", BOOL).field(False)
    eval_after_attach: int = Setting("measure the validation PER this many steps after the decoder's first "
                                     "trainable step (0: not)", integer(0, "an integer >= 0 (steps)")).field(0)
    eval_at_end: bool = Setting("measure the validation PER after the last step (a search that needs only the "
                                "outcome skips it)", BOOL).field(True)
    carry_scaler: bool = Setting("start the joint stage with the CTC warmup's GradScaler, as the seed's single "
                                 "scaler does (needs an fp16 CTC-warm checkpoint)", BOOL).field(False)
    # single-switch overrides of the named loop semantics (none keeps the semantics' own value)
    rebuild_at_stage_change: bool | None = Setting(
        "override: rebuild the optimizer when the joint stage starts (the seed keeps the CTC stage's)",
        Check(bool, "yes or no", optional=True)).field(None)
    clip_scope: str | None = Setting("override: clip over the whole model or the optimizer's parameters",
                                     choice(lambda: SCOPES, optional=True)).field(None)
    zero_grad_scope: str | None = Setting("override: zero the gradients of the whole model or the optimizer's",
                                          choice(lambda: SCOPES, optional=True)).field(None)
    substring_match: bool | None = Setting(
        "override: match a stage's components by substring as the seed does (rnnt_decoder.joint.encoder_proj then "
        "sits in the CTC stage's optimizer)", Check(bool, "yes or no", optional=True)).field(None)

    def __post_init__(self) -> None:
        _validate(self)
        if POLICIES[self.policy].freezes and not self.ctc_only and self.freeze_steps >= self.steps:
            raise SettingsError(f"freeze_steps: expected fewer than steps = {self.steps} (the decoder would never "
                                f"unfreeze), got {self.freeze_steps}")

    def loop_semantics(self) -> LoopSemantics:
        overrides = {k: getattr(self, k) for k in ("rebuild_at_stage_change", "clip_scope", "zero_grad_scope",
                                                   "substring_match") if getattr(self, k) is not None}
        return get_semantics(self.semantics, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainSettings:
    """Staged training (CTC warmup -> joint -> mode) from a fresh model. Defaults: a corrected fp32 loop."""

    preset: str = Setting("model size preset", choice(lambda: PRESETS)).field("small")
    data: str = Setting("Brain-to-Text '25 data root", PATH).field("data_samples")
    out: str = Setting("folder for checkpoints and the summary", PATH).field("runs/train")
    seed: int = SEED.field(0)
    batch_size: int = BATCH_SIZE.field(4)
    ctc_steps: int = Setting("CTC-warmup steps", integer(0, "an integer >= 0 (steps)")).field(300)
    joint_steps: int = Setting("joint-stage steps", integer(0, "an integer >= 0 (steps)")).field(20)
    mode_steps: int = Setting("mode-stage steps", integer(0, "an integer >= 0 (steps)")).field(0)
    ctc_lr: float = _lr("CTC-warmup learning rate").field(1e-3)
    joint_lr: float = _lr("joint-stage learning rate").field(1e-5)
    mode_lr: float = _lr("mode-stage learning rate").field(1e-5)
    precision: str = PRECISION.field("fp32")
    clip: float | None = CLIP_NORM.field(1.0)
    semantics: str = LOOP_SEMANTICS.field("corrected")
    rnnt_normalization: str = NORMALIZATION.field("seed_sqrt_tu")
    policy: str = POLICY.field("none")
    freeze_steps: int = FREEZE_STEPS.field(0)
    rebuild_at_unfreeze: bool = REBUILD_AT_UNFREEZE.field(True)
    device: str = Setting("auto (CUDA when present), cpu, cuda, cuda:1, ...", TEXT).field("auto")
    max_sessions: int | None = Setting("use only the first K sessions",
                                       Check(int, "an integer >= 1", test=lambda v: v >= 1, optional=True)).field(None)
    resume_from: str | None = Setting("checkpoint of a completed stage to continue from",
                                      Check(str, "a path", optional=True)).field(None)
    eval_every: int = Setting("validation PER every this many steps (0: only after each stage)",
                              integer(0, "an integer >= 0 (steps)")).field(0)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def settings_of(cls: type) -> dict[str, Setting]:
    """name -> Setting of a settings class, in field order."""
    return {f.name: f.metadata["setting"] for f in fields(cls) if "setting" in f.metadata}


def defaults_of(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls) if "setting" in f.metadata}


def axes() -> dict[str, Setting]:
    """The run settings a sweep may vary."""
    return {name: s for name, s in settings_of(RunSettings).items() if s.axis}


def check(name: str, value: Any, setting: Setting, *, label: str | None = None) -> Any:
    """`value` checked against `setting`; SettingsError "<label>: expected ..., got ..." otherwise."""
    try:
        return setting.check(value)
    except ValueError as exc:
        raise SettingsError(f"{label or name}: expected {exc}, got {value!r}") from None


def _validate(instance: Any) -> None:
    for name, setting in settings_of(type(instance)).items():
        object.__setattr__(instance, name, check(name, getattr(instance, name), setting))


def validate_parameters(params: Mapping[str, Any], *, lists: Iterable[str] = (),
                        optional: Iterable[str] = ()) -> None:
    """Check notebook parameters that are settings (of either class) with the same rules as everywhere else.

    Names in `lists` hold a list of values (a sweep axis, the freeze lengths to compare); each element is checked.
    Names in `optional` may be None (the notebook then takes its preset's value). Parameters that are not settings
    are left to the notebook. Raises SettingsError naming the parameter.
    """
    known = {**settings_of(TrainSettings), **settings_of(RunSettings)}
    many, maybe = set(lists), set(optional)
    for name, value in params.items():
        setting = known.get(name)
        if setting is None or (value is None and name in maybe):
            continue
        if name in many:
            if not isinstance(value, (list, tuple)) or not value:
                raise SettingsError(f"{name}: expected a non-empty list, got {value!r}")
            for item in value:
                check(name, item, setting)
        else:
            check(name, value, setting)


# Notebook parameters that are not settings, with the values they take (None, their default, means "the preset's").
# Parameters whose default is None and that hold a list of a setting's values are named in NOTEBOOK_LISTS.
NOTEBOOK_PARAMETERS: dict[str, Check] = {
    "seeds": integer(1, "a number of seeds >= 1"),
    "workers": integer(0, "a number of workers >= 0 (0: one per CPU core)"),
    "lrs": positive_number("a positive learning rate"),
    "boundary_lo": positive_number("a positive learning rate"),
    "boundary_hi": positive_number("a positive learning rate"),
    "boundary_rounds": integer(1, "an integer >= 1"),
    "boundary_steps": integer(1, "an integer >= 1"),
    "boundary_precisions": choice(lambda: PRECISIONS),
    "configurations": TEXT,
    "data": PATH,
    "data_root": PATH,
    "cache_dir": PATH,
    "output_dir": PATH,
}
NOTEBOOK_LISTS = frozenset({"freeze_steps", "lr", "lrs", "policy", "configurations", "boundary_precisions"})


def _default_check(default: Any) -> Check | None:
    """The check a declared default implies when the parameter is in no schema: its type (an int passes as a
    float)."""
    if isinstance(default, bool):
        return BOOL
    for kind, expected in ((int, "an integer"), (float, "a number"), (str, "a text")):
        if isinstance(default, kind):
            return Check(kind, expected)
    return None


def check_notebook_parameters(notebook: str, declared: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Check `given` papermill parameters against the ones `notebook` declares (name -> default value) before any
    cell runs: every name declared, every value of the type the settings schema, `NOTEBOOK_PARAMETERS` or the
    declared default says (a list where the default is a list or the name is in `NOTEBOOK_LISTS`, each element
    checked). Raises SettingsError "<name>: expected ..., got ..." naming the notebook."""
    known = {**settings_of(TrainSettings), **settings_of(RunSettings)}
    for name, value in given.items():
        if name not in declared:
            raise SettingsError(f"{name}: expected a parameter of {notebook} ({', '.join(declared)}), got "
                                f"{name}={value!r}")
        default = declared[name]
        rule = known[name].check if name in known else NOTEBOOK_PARAMETERS.get(name)
        many = isinstance(default, list) or (default is None and name in NOTEBOOK_LISTS)
        if rule is None:
            rule = _default_check(default[0] if isinstance(default, list) and default else default)
        if value is None and default is None:
            continue
        label = f"{name} ({notebook})"
        if many:
            if not isinstance(value, list) or not value:
                raise SettingsError(f"{label}: expected a non-empty JSON list, got {value!r}")
            items = value
        else:
            items = [value]
        for item in items:
            if isinstance(item, list) or (rule is None and isinstance(item, dict)):
                raise SettingsError(f"{label}: expected a single value, got {value!r}")
            if rule is not None:
                check(name, item, Setting("", rule), label=label)
