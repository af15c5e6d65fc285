"""The tracer's replay checks a unit (the selective scan) as one op, and looks inside only when it must.

Every non-finite value comes from float32 arithmetic on finite inputs: the scan's drive dt u B past 3.4e38 in
forward, its input gradient B . (dL/dy C) past 3.4e38 in backward, or exp of a large activation after the scan.
Each verdict is compared with the one a replay checking every op gives (the unit marker switched off).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from workbench.data import B2TDataset, collate
from workbench.instrument import tracer
from workbench.instrument.replay import capture
from workbench.instrument.tracer import Verdict, localize, trace_step
from workbench.model import HybridModel, get_config
from workbench.model.losses import LossWeights
from workbench.model.ssm import SelectiveScan
from workbench.train import build_optimizer
from workbench.train.step import StepConfig, TrainStep

ROOT = Path(__file__).resolve().parents[2]
D_INNER, D_STATE = 4, 3


@dataclass
class Frames:
    """x (batch, time, D_INNER) inputs."""

    x: torch.Tensor

    def to(self, device: torch.device | str) -> Frames:
        return Frames(self.x.to(device))


@dataclass
class Weights:
    exp_gain: float = 0.0


class ScanNet(nn.Module):
    """Gains on the scan's inputs: u = x u_gain, B = x[..., :d_state] b_gain, C = x[..., :d_state] c_gain,
    dt = 0.5, A = -1, D = 1; then exp(exp_gain * y) (the loss's gain)."""

    def __init__(self, u_gain: float, b_gain: float, c_gain: float) -> None:
        super().__init__()
        self.u_gain = nn.Parameter(torch.tensor(u_gain))
        self.b_gain = nn.Parameter(torch.tensor(b_gain))
        self.c_gain = nn.Parameter(torch.tensor(c_gain))
        self.scan = SelectiveScan(impl="chunked")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, D_INNER) -> (batch, time, D_INNER)."""
        bc = x[..., :D_STATE]
        return self.scan(x * self.u_gain, torch.full_like(x, 0.5), -torch.ones(D_INNER, D_STATE),
                         bc * self.b_gain, bc * self.c_gain, torch.ones(D_INNER))


def summed(model: nn.Module, batch: Frames, weights: Weights, *, rnnt: bool, mode: bool,
           normalization: str) -> dict[str, torch.Tensor]:
    """sum(exp(exp_gain * y)) + sum(y): dL/dy = 1 where exp_gain = 0."""
    y = model(batch.x)
    return {"total": torch.exp(weights.exp_gain * y).sum() + y.sum()}


def step_for(model: nn.Module) -> TrainStep:
    return TrainStep(model, torch.optim.SGD(model.parameters(), lr=1e-3), StepConfig(clip=None),
                     torch.device("cpu"), loss_fn=summed)


def frames(time: int = 6) -> Frames:
    return Frames(torch.ones(2, time, D_INNER))


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the replicas the tracer builds: one per replay."""
    built: list[int] = []
    real = tracer.replica

    def counted(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tracer, "replica", counted)
    return built


def every_op(monkeypatch: pytest.MonkeyPatch, step: TrainStep, batch: Frames, weights: Weights) -> Verdict | None:
    """The verdict of a replay that checks every op (the scan not marked as a unit)."""
    with monkeypatch.context() as patch:
        patch.setattr(SelectiveScan, "checked_as_unit", False)
        return localize(step, capture(step, batch, weights, index=1))


def test_forward_overflow_inside_the_scan_reopens_it_and_names_the_op(monkeypatch, replicas):
    # u = 1e19 and B = 1e20 at dt = 0.5: the drive dt u B = 5e38 overflows float32 inside the scan.
    step = step_for(ScanNet(1e19, 1e20, 1.0))
    v = localize(step, capture(step, frames(), Weights(), index=1))
    assert v is not None and len(replicas) == 2  # the scan closed, then open
    assert (v.phase, v.module, v.role, v.op, v.dtype) == ("forward", "scan", "producer", "aten.mul.out", "float32")
    assert v.input_absmax == pytest.approx(1e20, rel=1e-6)
    assert v.to_dict() == every_op(monkeypatch, step, frames(), Weights()).to_dict()


def test_backward_overflow_inside_the_scan_reopens_it(monkeypatch, replicas):
    # u = 1e-25 keeps the forward finite (h about 1e-5, y = C . h about 1e15); in backward dL/dh = dL/dy C = 1e20
    # and the input gradient B . dL/dh = 1e40 overflows float32 in the scan's batched product.
    step = step_for(ScanNet(1e-25, 1e20, 1e20))
    trace = trace_step(step, capture(step, frames(), Weights(), index=1))
    v = trace.findings[0]
    assert len(replicas) == 2
    assert (v.phase, v.module, v.role, v.op) == ("backward", "scan", "producer", "aten.bmm.out")
    assert v.tensor.startswith("grad_input (") and "ChunkedScan" in v.tensor
    assert v.to_dict() == every_op(monkeypatch, step, frames(), Weights()).to_dict()


def test_overflow_after_the_scan_replays_once_without_checking_inside_it(monkeypatch, replicas):
    # exp(100 y) with y = 1 + C . h overflows float32 after the scan: the scan stays closed.
    step = step_for(ScanNet(1.0, 1.0, 1.0))
    reads: list[int] = []
    real_range = tracer._range
    monkeypatch.setattr(tracer, "_range", lambda t: reads.append(1) or real_range(t))
    long = frames(time=400)
    v = localize(step, capture(step, long, Weights(100.0), index=1))
    closed_reads = len(reads)
    assert v is not None and len(replicas) == 1
    assert (v.phase, v.module, v.role, v.op) == ("forward", "<loss_fn>", "producer", "aten.exp.default")
    reads.clear()
    assert v.to_dict() == every_op(monkeypatch, step, long, Weights(100.0)).to_dict()
    # Checked op by op, the scan's per-frame recurrence is read at every frame; as a unit, once per call.
    assert len(reads) > 400 > 40 > closed_reads


@pytest.mark.parametrize("gain, phase", [(1.0, "backward"), (4.0, "forward")])
def test_reference_model_fp16_step_traces_the_same_with_the_scan_as_a_unit(monkeypatch, replicas, gain, phase):
    # A fresh tiny model's first fp16 step. As initialised, the GradScaler's 65536 overflows a float16 gradient in
    # backward. With the encoder's Linear weights 4x larger, its fp16 forward overflows, the loss is NaN and every
    # op of the backward sees non-finite values (no producer there: the replay checks it to the end, and the
    # scan's nodes return NaN from NaN, which must not reopen it).
    torch.manual_seed(0)
    model = HybridModel(get_config("tiny"))
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(gain)
    step = TrainStep(model, build_optimizer(model.parameters(), lr=1e-4), StepConfig(precision="fp16"),
                     torch.device("cpu"))
    dataset = B2TDataset(ROOT / "data_samples", "train")
    bundle = capture(step, collate([dataset[i] for i in range(4)]), LossWeights(ctc=0.3, rnnt=1.0, mode=0.0),
                     index=1)
    units = trace_step(step, bundle)
    assert len(replicas) == 1 and units.findings[0].phase == phase and units.found_inf
    assert [f.phase for f in units.findings] == [phase] + (["backward"] if phase == "forward" else []) + ["clip"]
    with monkeypatch.context() as patch:
        patch.setattr(SelectiveScan, "checked_as_unit", False)
        every = trace_step(step, bundle)
    assert json.dumps(every.to_dict()) == json.dumps(units.to_dict())  # NaN clip norms compare equal as text
