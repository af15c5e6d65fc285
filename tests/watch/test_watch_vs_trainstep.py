"""A watch log classifies like a TrainStep log of the same run: the same loop, once through
`workbench.run.byo.instrument` (the workbench's TrainStep) and once written out by hand under `watch`, gives the
same steps, the same skipped steps and the same outcome with the same reasons."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from loops import Net, batches
from workbench.records.outcome import classify
from workbench.run.byo import instrument
from workbench.run.watch import watch
from workbench.train.device import autocast
from workbench.train.step import get_semantics


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def through_trainstep(precision: str, init_scale: float, lr: float, steps: int, policy: str):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with instrument(model, optimizer, loss_fn, precision=precision, init_scale=init_scale, clip=None,
                    semantics=get_semantics("corrected", nonfinite_policy=policy), trace=False) as session:
        for batch in batches(steps):
            session.step(batch)
    return session.record


def by_hand_under_watch(precision: str, init_scale: float, lr: float, steps: int):
    """TrainStep's order written as a user would: forward under autocast, zero_grad, scaled backward, unscale_,
    the scaler's step and update; no guard of its own."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    cpu = torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if precision == "fp16" else None
    with watch(model, optimizer, scaler=scaler, say=lambda line: None) as w:
        for batch in batches(steps):
            model.train()
            with autocast(cpu, precision):
                loss = loss_fn(model, batch)
            w.loss(loss)
            model.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
    return w.record


@pytest.mark.parametrize("precision, init_scale, lr, policy, expected", [
    # fp16 at lr 300: the forward overflows (a non-finite loss) and the GradScaler skips every such step
    ("fp16", 2.0 ** 16, 300.0, "skip_step", "overflow_skipped"),
    # fp16 at lr 3: the scaler skips most steps, so the groups are updated on too few of them
    ("fp16", 2.0 ** 16, 3.0, "skip_step", "stalled"),
    # fp32 at lr 1e6 and no guard: the update writes non-finite parameters (at step 4)
    ("fp32", 1.0, 1e6, "continue", "diverged"),
    # fp32 at lr 1e4: the loss reaches 4e37 and the weights values whose float32 norm overflows, but every value
    # stays finite, so neither calls it diverged (the updates, swamped by the weights, are mostly zero)
    ("fp32", 1.0, 1e4, "continue", "stalled"),
])
def test_same_run_same_outcome(precision, init_scale, lr, policy, expected):
    mine = through_trainstep(precision, init_scale, lr, 12, policy)
    theirs = by_hand_under_watch(precision, init_scale, lr, 12)
    assert mine.steps == theirs.steps == list(range(1, 13))
    assert mine.values("skipped") == theirs.values("skipped")
    assert mine.values("loss/total") == pytest.approx(theirs.values("loss/total"), nan_ok=True)
    assert mine.scale == theirs.scale
    a, b = classify(mine), classify(theirs)
    assert a.kind == expected
    assert (a.kind, a.reasons, a.warnings) == (b.kind, b.reasons, b.warnings)


def test_byo_and_watch_measure_updates_with_one_observer():
    """What the optimizer did is measured by one implementation (`workbench.run.updates`): on the same fp32 run,
    TrainStep's log (byo) and watch's log hold the same update ratios, not-updated and stale-gradient counts."""
    from workbench.run.updates import OptimizerUpdates

    torch.manual_seed(0)
    model = Net()
    with instrument(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, clip=None, trace=False) as s:
        assert sum(isinstance(obs, OptimizerUpdates) for obs in s.train_step.observers) == 1
        assert not s.probe.update_ratio  # the probe measures gradients only
    mine = through_trainstep("fp32", 1.0, 0.1, 12, "continue")
    theirs = by_hand_under_watch("fp32", 1.0, 0.1, 12)
    for prefix in ("update_ratio", "not_updated", "stale_grad"):
        a, b = mine.prefixed(prefix), theirs.prefixed(prefix)
        assert set(a) == set(b) == {"features", "head"}
        for group in a:
            assert a[group] == pytest.approx(b[group], rel=1e-6), (prefix, group)
    assert classify(mine).kind == classify(theirs).kind
