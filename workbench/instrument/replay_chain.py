"""Replay bundles for any step at the cost of one capture every K steps: a base bundle and the inputs since.

`capture` copies the parameters, the optimizer state and the batches before every step: on a CPU that copy is the
tracer's whole cost (about 4 ms a step at `small`), and it is memory bandwidth, so a faster copy cannot remove it.
A `ReplayChain` instead captures a base bundle every `every` steps and, for the steps in between, keeps only what
re-running them takes: their batches (by reference: the loop must not refill a batch's tensors in place), loss
weights and flags, each optimizer group's settings (a scheduler's learning rate) and the RNG state. The bundle of
any step since the base is rebuilt on demand, only when a step went non-finite: the base restored on a replica
(`replay.replica`) and the steps before it re-run there (`bundle_at`), each checked against the loss the live step
recorded, then the replica captured.

A new base is also captured once `max_rerun_s` seconds have passed since the last one, so rebuilding a bundle
never re-runs more than about that much training: with slow steps (the seed's size on a CPU) every step is
captured, as before the chain. A new base is captured whenever a re-run could not reproduce the live run: the optimizer was rebuilt or its groups
changed, a parameter's `requires_grad` flipped, the GradScaler or the step's config was replaced, or a parameter
was written between two steps (its version counter moved after the last update), and after a step that raised
before its update.

    chain = ReplayChain(every=16)
    chain.start(step, batches, weights, rnnt=True, mode=False, index=step.step_index + 1)  # at each step start
    chain.updated()                      # after its update (on_pack)
    chain.ended(index, result.losses)    # at its end
    bundle = chain.bundle_at(step, index)   # only for a step that went non-finite

A loop that is not a TrainStep (Lightning's callback) also adds a window's later micro-batches to its step
(`add_batch`), names the tensors a step trained when they changed after its start (`set_trainable`), and asks for a
base at an epoch's start (`rebase`), so that a shorter last window, which a replay divides differently, is never
re-run on the way to another step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from workbench.instrument.replay import ReplayBundle, capture, replica
from workbench.train import compat

if TYPE_CHECKING:
    from workbench.train.step import TrainStep


class ReplayMismatch(RuntimeError):
    """A re-run step's loss differs from the one the live step recorded: the rebuilt bundle would not be the
    live run's state (one line naming the step and both losses)."""


@dataclass
class _Inputs:
    """What re-running one step takes besides the state before it."""

    index: int
    batches: list[Any]
    weights: Any
    rnnt: bool
    mode: bool
    groups: list[dict[str, Any]]  # each optimizer group's settings but its parameters
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    losses: dict[str, float] | None = None  # the live step's, once it ended
    trainable: list[str] | None = None  # the tensors it trained, when they changed after its start


@dataclass
class _Chain:
    base: ReplayBundle
    key: tuple[Any, ...]
    started: float  # time.perf_counter() when the base was captured
    steps: list[_Inputs] = field(default_factory=list)  # the base's step first, in order

    def covers(self, index: int) -> bool:
        return any(s.index == index for s in self.steps)


def _structure(step: TrainStep, params: list[torch.Tensor]) -> tuple[Any, ...]:
    """What a re-run from the base needs unchanged: the optimizer, its groups and state dict, the parameters and
    which of them train, the GradScaler, the step's config (precision, clip, loop semantics)."""
    optimizer = step.optimizer
    return (id(optimizer), id(optimizer.state), tuple(len(g["params"]) for g in optimizer.param_groups),
            tuple(map(id, params)), tuple(p.requires_grad for p in params), id(step.scaler), repr(step.config))


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]


class ReplayChain:
    """Base bundles every `every` steps, or `max_rerun_s` seconds, and the inputs of the steps in between (see
    the module docstring). Keeps the chain before the current one until its last step ended (a step's end may
    follow the next one's start)."""

    def __init__(self, every: int, max_rerun_s: float = 2.0, params: list[torch.Tensor] | None = None) -> None:
        """`params`: the model's parameters, when the caller holds them fixed for the whole run (else the model
        is walked at every step start, so a replaced parameter is seen)."""
        if every < 1:
            raise ValueError(f"every: expected a positive number of steps, got {every}")
        self.every = every
        self.max_rerun_s = max_rerun_s
        self._chain: _Chain | None = None
        self._previous: _Chain | None = None
        self._versions: list[int] | None = None  # of the parameters after the last update
        self._fixed = params
        self._params: list[torch.Tensor] = []  # the model's, as the last step started
        self._rebase = False  # the next step starts a new base

    def start(self, step: TrainStep, batches: Any | Sequence[Any], weights: Any, *, rnnt: bool, mode: bool,
              index: int) -> None:
        """At a step's start: capture a base when one is due (see the module docstring), else note its inputs."""
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        self._params = self._fixed if self._fixed is not None else list(step.model.parameters())
        key = _structure(step, self._params)
        chain = self._chain
        moved = self._versions is None or compat.tensor_versions(self._params) != self._versions
        if (chain is None or key != chain.key or moved or self._rebase or len(chain.steps) >= self.every
                or time.perf_counter() - chain.started >= self.max_rerun_s):
            self._rebase = False
            self._previous = chain
            base = capture(step, batches, weights, rnnt=rnnt, mode=mode, index=index)
            chain = self._chain = _Chain(base, key, time.perf_counter())
            rng, cuda_rng = base.cpu_rng, base.cuda_rng
        else:
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if chain.base.cuda_rng is not None else None
        chain.steps.append(_Inputs(index, batches, copy.deepcopy(weights), rnnt, mode, _group_settings(step.optimizer),
                                   rng, cuda_rng))
        self._versions = None

    def rebase(self) -> None:
        """The next step starts a new base (capture a bundle there), whatever else is due."""
        self._rebase = True

    def add_batch(self, batch: Any) -> None:
        """A later micro-batch of the current step (by reference; copied into the base when the step is its)."""
        chain = self._chain
        if chain is None or not chain.steps:
            raise RuntimeError("add_batch: no step started in the replay chain")
        chain.steps[-1].batches.append(batch)
        if len(chain.steps) == 1:
            chain.base.batches.append(copy.deepcopy(batch))

    def set_trainable(self, names: list[str]) -> None:
        """The tensors the current step trains, when something made others trainable after its start (a new
        `requires_grad` starts a new base at the next step, so only a chain's last step can carry this)."""
        chain = self._chain
        if chain is None or not chain.steps:
            raise RuntimeError("set_trainable: no step started in the replay chain")
        chain.steps[-1].trainable = list(names)
        if len(chain.steps) == 1:
            chain.base.trainable = list(names)

    def updated(self) -> None:
        """After the step's update: the parameters' version counters, so a write before the next step is seen."""
        self._versions = compat.tensor_versions(self._params)

    def ended(self, index: int, losses: dict[str, float]) -> None:
        """At the step's end: the losses it recorded, which its re-run must reproduce."""
        for chain in (self._chain, self._previous):
            if chain is not None:
                for s in chain.steps:
                    if s.index == index:
                        s.losses = dict(losses)
        if self._previous is not None and all(s.losses is not None for s in self._previous.steps):
            self._previous = None

    def covers(self, index: int) -> bool:
        """Whether the bundle of step `index` can be rebuilt."""
        return any(c is not None and c.covers(index) for c in (self._chain, self._previous))

    def bundle_at(self, step: TrainStep, index: int) -> ReplayBundle:
        """The bundle of step `index` (as `capture` at its start would have taken it): the base restored on a
        replica of `step` and the steps from the base to `index` re-run there; the caller's RNG state is kept.
        Raises ReplayMismatch when a re-run step's losses differ from the live ones, KeyError when not covered."""
        chain = next((c for c in (self._chain, self._previous) if c is not None and c.covers(index)), None)
        if chain is None:
            raise KeyError(f"step {index} is not in the replay chain")
        if chain.steps[0].index == index:
            return chain.base
        steps = chain.steps[:[s.index for s in chain.steps].index(index) + 1]
        devices = list(range(len(chain.base.cuda_rng))) if chain.base.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            rep = replica(step, chain.base)
            for s in steps[:-1]:
                _set_rng(s)
                _set_groups(rep.optimizer, s)
                result = rep.run(s.batches, s.weights, rnnt=s.rnnt, mode=s.mode)
                if s.losses is not None and not _same_losses(result.losses, s.losses):
                    raise ReplayMismatch(f"step {s.index} re-run from the bundle of step {chain.base.step}: losses "
                                         f"{result.losses}, the live step's {s.losses}")
            last = steps[-1]
            _set_groups(rep.optimizer, last)
            bundle = capture(rep, last.batches, last.weights, rnnt=last.rnnt, mode=last.mode, index=index)
        return dataclasses.replace(bundle, cpu_rng=last.cpu_rng, cuda_rng=last.cuda_rng,
                                   trainable=bundle.trainable if last.trainable is None else last.trainable)


def _same_losses(replayed: dict[str, float], live: dict[str, float]) -> bool:
    """Equal term by term, NaN equal to NaN (a skipped step's loss is reproduced as NaN)."""
    return replayed.keys() == live.keys() and all(
        a == b or (math.isnan(a) and math.isnan(b)) for a, b in ((replayed[k], live[k]) for k in live))


def _set_groups(optimizer: torch.optim.Optimizer, s: _Inputs) -> None:
    for group, settings in zip(optimizer.param_groups, s.groups):
        group.update(copy.deepcopy(settings))


def _set_rng(s: _Inputs) -> None:
    torch.set_rng_state(s.cpu_rng)
    if s.cuda_rng is not None:
        torch.cuda.set_rng_state_all(s.cuda_rng)
