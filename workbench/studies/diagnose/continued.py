"""Continue the replay bundle a `byo.instrument` session or a Lightning `WorkbenchCallback` kept beside its log
(`workbench.run.kept`), with the run's own loop (the control) or one candidate's (`loop.Loop`), for K steps on the
bundle's captured batches, and log each continuation like a byo session.

The bundle restores the step exactly (`instrument.replay.replica`): weights, optimizer state over the run's own
groups, GradScaler state, surviving gradients, which tensors are trainable. Then every one of the K steps runs on
the same captured batches: training that works drives the loss on a fixed batch down, so a fix is judged by
`classify` like any run, on that batch. A seed sets torch's RNG for the K steps (dropout and any other draw in
the forward); the starting state and the batches are the bundle's in every seed, so a model without random draws
gives the same run in every seed. Runs go one after another in this process (the user's model and loss function
are objects of this process).

Rebuilding the user's model needs its object: `model=` and `loss_fn=` (byo) or `module=` (Lightning) through the
Python API; without them the class recorded in the log is imported and built (no arguments for a byo model, the
module's `hparams` for a LightningModule), and where that fails, one line says what to pass.
"""

from __future__ import annotations

import copy
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from workbench.instrument import ParamGroups
from workbench.instrument.replay import ReplayBundle, load_bundle, replica
from workbench.records import RunRecord
from workbench.records.outcome import update_shares
from workbench.run.byo import instrument
from workbench.studies.diagnose.loop import GROUP_LR_FACTOR, Loop
from workbench.train.device import pick_device
from workbench.train.optim import optimizer_params
from workbench.train.step import StepConfig, TrainStep

SOURCES = ("byo", "lightning")


class KeptError(ValueError):
    """A kept bundle that cannot be continued; the message is one line naming the log and what to pass or do."""


def _imported(path: str | None, what: str) -> Any:
    if not path:
        raise ImportError(f"the {what} was not defined at a module's top level")
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Kept:
    """A log's kept bundle with what continues it: the user's model (or module) as given, its loss function
    `loss_fn(model, data)`, the run's parameter groups, and `rebuild(model, optimizer)` (the optimizer over every
    trainable tensor, fresh state)."""

    replay: dict[str, Any]
    slowest: str | None
    bundle: ReplayBundle
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Any]
    groups: ParamGroups
    rebuild: Callable[[nn.Module, torch.optim.Optimizer], torch.optim.Optimizer]
    device: torch.device

    @property
    def control(self) -> Loop:
        scale = None if self.bundle.scaler_state is None else float(self.bundle.scaler_state["scale"])
        return Loop.of_run(self.replay, scale, self.slowest)

    def restored(self) -> TrainStep:
        """A TrainStep at the bundle's state, on copies of the model and of the run's optimizer."""
        model = copy.deepcopy(self.model).to(self.device)
        params = dict(model.named_parameters())
        layout = self.replay["optimizer"]
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [params[n] for n in names]}
                  for group, names in zip(self.bundle.optimizer_state["param_groups"], layout["groups"])]
        optimizer = _imported(layout["class"], "optimizer class")(groups)
        config = StepConfig(precision=self.bundle.precision, clip=self.replay["clip"],
                            semantics=self.control.semantics())
        # only its state is used: the continuation runs the copies through `byo.instrument` with the loss function
        return replica(TrainStep(model, optimizer, config, self.device), self.bundle)


def _group_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "name", "initial_lr")}


def _rebuild_same_class(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    kind: Any = type(optimizer)
    return kind([{"params": trainable, **_group_settings(optimizer)}])


def _add_missing(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    held = {id(p) for p in optimizer_params(optimizer)}
    missing = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    if missing:
        optimizer.add_param_group({"params": missing, **_group_settings(optimizer)})
    return optimizer


def _own_group(model: nn.Module, optimizer: torch.optim.Optimizer, members: list[str]) -> None:
    """Move the tensors of `members` that the optimizer holds into a group of their own at `GROUP_LR_FACTOR`
    times the first group's learning rate (their optimizer state stays theirs)."""
    params = dict(model.named_parameters())
    moving = {id(params[n]) for n in members if n in params}
    held = [p for p in optimizer_params(optimizer) if id(p) in moving]
    if not held:
        return
    settings = _group_settings(optimizer)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in moving]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    optimizer.add_param_group({"params": held, **settings, "lr": settings["lr"] * GROUP_LR_FACTOR})


def _what_to_pass(source: str) -> str:
    return ("diagnose(log, model=<the model>, loss_fn=<its loss function>)" if source == "byo" else
            "diagnose(log, module=<a LightningModule of the run's class>)")


def load(record: RunRecord, where: str, *, model: nn.Module | None = None, loss_fn: Callable | None = None,
         module: Any = None, device: str = "cpu") -> Kept:
    """The kept bundle of `record` (a log with a `replay` attribute) with what continues it on `device` (auto, cpu,
    cuda or cuda:N); KeptError when the bundle is missing or unreadable, or the user's objects are not given and
    cannot be imported and built."""
    replay = dict(record.attrs["replay"])
    source = replay.get("source")
    if source not in SOURCES:
        raise KeptError(f"{where}: replay: expected the kept bundle of a byo.instrument or Lightning run, got source "
                        f"{source!r}")
    path = Path(replay["bundle"])
    if not path.is_absolute() and record.path is not None:
        path = Path(record.path).parent / path
    if not path.is_file():
        raise KeptError(f"{where}: replay: expected the run's kept bundle at {path}, got no file there")
    try:
        bundle = load_bundle(path)
    except Exception as exc:  # noqa: BLE001  (torch.load's errors are many)
        raise KeptError(f"{where}: {path.name}: expected a replay bundle torch.load(weights_only=True) reads, got "
                        f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
    given = module if source == "lightning" else model
    if given is None:
        try:
            cls = _imported(replay.get("model_class"), "model class")
            given = cls(**(replay.get("hparams") or {})) if source == "lightning" else cls()
        except Exception as exc:  # noqa: BLE001  (importing and building the user's class)
            raise KeptError(f"{where}: a {source} run of {record.settings.get('model')}: to continue it, pass the "
                            f"{'module' if source == 'lightning' else 'model'} in Python: {_what_to_pass(source)} "
                            f"(building {replay.get('model_class') or 'its class'} here failed: "
                            f"{type(exc).__name__}: {exc})".replace("\n", " ")) from None
    rebuild: Callable[[Any, torch.optim.Optimizer], torch.optim.Optimizer] = _rebuild_same_class
    if source == "lightning":
        from workbench.run.lightning import configured_optimizer, training_step_loss

        loss: Callable = training_step_loss
        rebuild = lambda m, optimizer: configured_optimizer(m)  # noqa: E731  (over the module's trainable tensors)
    else:
        if loss_fn is None:
            try:
                loss_fn = _imported(replay.get("loss_fn"), "loss function")
            except Exception as exc:  # noqa: BLE001
                raise KeptError(f"{where}: a byo run of {record.settings.get('model')}: to continue it, pass its loss "
                                f"function in Python: {_what_to_pass(source)} (importing "
                                f"{replay.get('loss_fn') or 'it'} failed: {type(exc).__name__}: {exc})") from None
        loss = loss_fn
    needed = set(bundle.trainable).union(*replay["optimizer"]["groups"])
    lacking = sorted(needed - {n for n, _ in given.named_parameters()})
    if lacking:
        raise KeptError(f"{where}: the {'module' if source == 'lightning' else 'model'} given has no parameter "
                        f"{lacking[0]!r}: expected an object of the run's own class, {record.settings.get('model')}")
    groups = ParamGroups({g: list(members) for g, members in record.settings.get("groups", {}).items()})
    ratios = {g: s["median_ratio"] for g, s in update_shares(record).items() if s["median_ratio"] is not None}
    slowest = min(ratios, key=ratios.__getitem__) if ratios else None
    return Kept(replay, slowest, bundle, given, loss, groups, rebuild, pick_device(device))


def run(kept: Kept, loop: Loop, seed: int, steps: int, log_path: Path) -> RunRecord:
    """The bundle's step and the steps after it, `steps` in all, on its batches with `loop`, logged at `log_path`."""
    rep = kept.restored()
    model, optimizer = rep.model, rep.optimizer
    if loop.optimizer == "rebuilt":
        optimizer = kept.rebuild(model, optimizer)
    elif loop.optimizer == "kept+missing":
        optimizer = _add_missing(model, optimizer)
    if loop.group_lr is not None:
        _own_group(model, optimizer, list(kept.groups.get(loop.group_lr, [])))
    session = instrument(model, optimizer, kept.loss_fn, groups=kept.groups, precision=loop.precision,
                         clip=loop.clip, semantics=loop.semantics(), init_scale=loop.init_scale or 65536.0,
                         log_path=log_path, overwrite=True, trace=False, device=kept.device, keep_bundle=False)
    if session.scaler is not None and rep.scaler is not None and loop.init_scale == kept.control.init_scale:
        session.scaler.load_state_dict(rep.scaler.state_dict())  # the bundle's scale and growth tracker
    batches = [b.to(kept.device) for b in kept.bundle.batches]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            session.engine.step(batches)
    except Exception as exc:
        session.close(status="failed", error=repr(exc).replace("\n", " "), wall_s=time.perf_counter() - t0)
        raise
    session.close(wall_s=time.perf_counter() - t0)
    return session.record


def run_all(kept: Kept, runs: Mapping[tuple[str, int], Loop], steps: int,
            out: Path) -> tuple[dict[tuple[str, int], RunRecord], dict[tuple[str, int], str]]:
    """Every (candidate, seed) continuation, one after another: (records, errors of runs that failed)."""
    out.mkdir(parents=True, exist_ok=True)
    records, errors = {}, {}
    for (name, seed), loop in runs.items():
        try:
            records[(name, seed)] = run(kept, loop, seed, steps, out / f"{name}-seed{seed}.h5")
        except Exception as exc:  # noqa: BLE001  (a candidate the user's code cannot run is reported, not fatal)
            errors[(name, seed)] = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return records, errors
