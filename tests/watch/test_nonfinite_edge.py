"""A parameter is non-finite exactly when one of its elements is: a finite tensor near 1e19, whose float32 norm
overflows, is not called non-finite by the shared check (`workbench.train.host`), by TrainStep's recorder or by
watch, and a real inf still is, with its element count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loops import Net, batches
from workbench.run.byo import instrument
from workbench.run.watch import watch
from workbench.train.host import nonfinite_elements, nonfinite_flags

HUGE = 3e19   # finite in float32 (max 3.4e38); the sum of squares of two such values overflows


def test_the_screen_flags_every_nonfinite_tensor_and_the_count_settles_it():
    tensors = [torch.full((4,), 1e30), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf"), 0.0]),
               torch.tensor([1.0, 2.0], dtype=torch.float16), torch.tensor([float("nan")], dtype=torch.bfloat16),
               torch.full((2,), HUGE)]
    flags = nonfinite_flags(tensors).tolist()
    assert flags == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # the screen: the finite 1e30 and 3e19 tensors overflow it
    assert nonfinite_elements(tensors, flags) == [0, 1, 1, 0, 1, 0]
    assert nonfinite_elements(tensors) == [0, 1, 1, 0, 1, 0]


class Spare(Net):
    """Net with a parameter outside the forward and the optimizer, where a test puts a value."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.spare = nn.Parameter(torch.zeros(4), requires_grad=False)
        with torch.no_grad():
            self.spare[:2] = value


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def trainstep_rows(value: float):
    torch.manual_seed(0)
    model = Spare(value)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with instrument(model, optimizer, loss_fn, clip=None, trace=False) as session:
        for batch in batches(3):
            session.step(batch)
    return session.record


def watch_rows(value: float):
    torch.manual_seed(0)
    model = Spare(value)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with watch(model, optimizer, say=lambda line: None) as w:
        for batch in batches(3):
            loss = loss_fn(model, batch)
            w.loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return w.record, w.findings


@pytest.mark.parametrize("entry", ["trainstep", "watch"])
@pytest.mark.parametrize("value, tensors, elements", [(HUGE, 0, 0), (float("inf"), 1, 2), (-HUGE, 0, 0)])
def test_a_huge_finite_parameter_is_finite_and_an_inf_is_not(entry, value, tensors, elements):
    if entry == "trainstep":
        record = trainstep_rows(value)
    else:
        record, findings = watch_rows(value)
        assert any(f["kind"] == "nonfinite" and "spare" in f["tensors"] for f in findings) == (tensors > 0)
    assert record.values("params_nonfinite/tensors") == [tensors] * 3
    assert record.values("params_nonfinite/elements") == [elements] * 3
    assert record.values("params_finite") == [tensors == 0] * 3
