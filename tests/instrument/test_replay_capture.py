"""A replay bundle is captured without reading the device: kept where the tensors live (device memory, no host
sync), copied to the host only when kept (`to_host`, `save_bundle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.instrument.replay import capture, load_bundle, replica, save_bundle
from workbench.run.byo import UserBatch
from workbench.train.step import StepConfig, TrainStep, get_semantics

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


def _loss(model: nn.Module, batch: Any, weights: Any, *, rnnt: bool, mode: bool,
          normalization: str) -> dict[str, torch.Tensor]:
    x, y = batch.data
    ce = F.cross_entropy(model(x).float(), y)
    return {"total": ce, "ce": ce}


def _step() -> tuple[TrainStep, list[UserBatch]]:
    """An fp16 TrainStep with a GradScaler on the CPU, two steps in (the scaler has scaled and updated)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                     StepConfig(precision="fp16", semantics=get_semantics("corrected")), torch.device("cpu"),
                     loss_fn=_loss)
    g = torch.Generator().manual_seed(1)
    data = [UserBatch((torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))) for _ in range(3)]
    for batch in data[:2]:
        step([batch], None)
    return step, data


class _Spy:
    """Counts every value read and every explicit copy to the CPU, whoever makes it (torch's own calls inside
    `GradScaler.state_dict()` included)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, original))
        to = torch.Tensor.to

        def spied_to(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                self.seen.append("to(cpu)")
            return to(t, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", spied_to)
        get_scale = torch.amp.GradScaler.get_scale
        monkeypatch.setattr(torch.amp.GradScaler, "get_scale",
                            lambda scaler: (self.seen.append("get_scale"), get_scale(scaler))[1])

    def _counted(self, name: str, original: Any) -> Any:
        def counted(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.seen.append(name)
            return original(t, *args, **kwargs)
        return counted


def test_capture_reads_nothing_and_copies_nothing_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    step, data = _step()
    spy = _Spy(monkeypatch)
    bundle = capture(step, [data[2]], None, index=step.step_index + 1)
    monkeypatch.undo()
    assert spy.seen == []
    live = {id(p.untyped_storage()) for p in step.model.parameters()}
    assert not live & {id(t.untyped_storage()) for t in bundle.model_state.values()}  # copies, not aliases
    assert isinstance(bundle.scaler_state["scale"], torch.Tensor)
    assert float(bundle.scaler_state["scale"]) == step.scaler.get_scale()


def test_a_kept_bundle_crosses_once_and_replays_the_same_step(tmp_path: Path) -> None:
    step, data = _step()
    bundle = capture(step, [data[2]], None, index=step.step_index + 1)
    path = tmp_path / "b.pt"
    save_bundle(path, bundle)
    loaded = load_bundle(path)
    assert loaded.scaler_state == {**step.scaler.state_dict()}  # plain numbers on the host
    results = []
    for b in (bundle, loaded):
        rep = replica(step, b)
        results.append((rep(b.batches, None), [p.detach().clone() for p in rep.model.parameters()]))
    (first, p1), (second, p2) = results
    assert first.losses == second.losses and all(torch.equal(a, c) for a, c in zip(p1, p2))
    live = step(data[2:], None)
    assert live.losses == first.losses
