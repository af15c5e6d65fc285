"""TrainStep's non-finite policies on a model whose own arithmetic overflows (exp of a large activation)."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from workbench.model.losses import LossWeights
from workbench.train import NonFiniteError, StepConfig, TrainStep, get_semantics


@dataclass
class XBatch:
    x: torch.Tensor

    def to(self, device):
        return XBatch(self.x.to(device))


def exp_loss(model, batch, weights, *, rnnt, mode, normalization):
    # exp overflows float32 once its argument passes ~88: no non-finite value is written by hand
    total = torch.exp(model(batch.x).pow(2)).mean()
    return {"total": total}


def _step(policy: str):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sem = get_semantics("corrected", nonfinite_policy=policy)
    step = TrainStep(model, opt, StepConfig(semantics=sem, clip=None), torch.device("cpu"), loss_fn=exp_loss)
    return model, step


HUGE = XBatch(torch.full((2, 4), 1e3))
W = LossWeights(ctc=1.0, rnnt=0.0, mode=0.0)


def test_skip_before_backward_computes_no_gradient():
    model, step = _step("skip_before_backward")
    before = [p.detach().clone() for p in model.parameters()]
    result = step(HUGE, W)
    assert result.skipped and result.reason == "nonfinite_loss"
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_skip_step_backpropagates_but_does_not_update():
    model, step = _step("skip_step")
    before = [p.detach().clone() for p in model.parameters()]
    result = step(HUGE, W)
    assert result.skipped and result.reason == "nonfinite_grad"
    assert any(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_stop_raises():
    _, step = _step("stop")
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        step(HUGE, W)


def test_continue_applies_the_update():
    model, step = _step("continue")
    result = step(HUGE, W)
    assert not result.skipped
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_healthy_step_is_not_skipped_under_any_policy():
    for policy in ("skip_before_backward", "skip_step", "stop", "continue"):
        _, step = _step(policy)
        assert not step(XBatch(torch.full((2, 4), 0.1)), W).skipped
