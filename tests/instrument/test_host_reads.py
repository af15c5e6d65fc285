"""Device reads per optimizer step from workbench code, counted on CPU (tests/host_reads.py): every entry point
under its default settings moves the step's values to the host in one transfer (`to_host`) and reads nothing
else. A policy that must decide on the host before backward or before the update adds the one read it needs.

An entry point is one line in ENTRY_POINTS: a name and a function `(steps) -> HostReads` that builds its run,
then counts `steps` optimizer steps."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from host_reads import HostReads  # tests/host_reads.py (tests/ is on the path through its conftest)
from workbench.run.byo import instrument
from workbench.train.step import StepConfig, TrainStep, get_semantics

STEPS = 4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def user_loss(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    ce = F.cross_entropy(model(x).float(), y)
    return {"ce": ce, "l2": 1e-4 * sum(p.float().square().sum() for p in model.parameters())}


def step_loss(model: nn.Module, batch: Any, weights: Any, *, rnnt: bool, mode: bool,
              normalization: str) -> dict[str, torch.Tensor]:
    terms = user_loss(model, batch)
    return {"total": terms["ce"] + terms["l2"], **terms}


def train_step(precision: str, policy: str | None = None) -> Callable[[int], HostReads]:
    def run(steps: int) -> HostReads:
        model = mlp()
        semantics = get_semantics("corrected", **({"nonfinite_policy": policy} if policy else {}))
        step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                         StepConfig(precision=precision, semantics=semantics), torch.device("cpu"), loss_fn=step_loss)
        with HostReads() as reads:
            for batch in batches(steps):
                step([batch], None)  # a list of one micro-batch (a bare tuple reads as micro-batches)
        return reads
    return run


def byo(precision: str, policy: str | None = None, **options: Any) -> Callable[[int], HostReads]:
    def run(steps: int) -> HostReads:
        model = mlp()
        semantics = get_semantics("corrected", **({"nonfinite_policy": policy} if policy else {}))
        with instrument(model, torch.optim.AdamW(model.parameters(), lr=1e-3), user_loss, precision=precision,
                        semantics=semantics, **options) as session, HostReads() as reads:
            for batch in batches(steps):
                session.step(batch)
        return reads
    return run


def watched(precision: str) -> Callable[[int], HostReads]:
    """The user's own loop under `workbench.watch` (fp16: autocast with a GradScaler, unscale_ before the clip)."""
    from workbench import watch

    def run(steps: int) -> HostReads:
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
        with watch(model, optimizer, scaler=scaler, say=lambda line: None) as w, HostReads() as reads:
            for batch in batches(steps):
                with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                    terms = user_loss(model, batch)
                loss = terms["ce"] + terms["l2"]
                w.loss(loss)
                optimizer.zero_grad()
                if scaler is None:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    scaler.step(optimizer)
                    scaler.update()
        return reads
    return run


def lightning(steps: int) -> HostReads:
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from workbench.run.lightning import WorkbenchCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            terms = user_loss(self.net, batch)
            return {"loss": terms["ce"] + terms["l2"], **{k: v.detach() for k, v in terms.items()}}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    x = torch.cat([b[0] for b in batches(steps)])
    y = torch.cat([b[1] for b in batches(steps)])
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=[WorkbenchCallback()],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, gradient_clip_val=1.0)
    with HostReads() as reads:
        trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=16))
    return reads


# name -> (run, transfers per step, other reads per step).
# Without a GradScaler, `skip_step` (the corrected loop's default) must know on the host whether the norm is
# finite before it calls optimizer.step(): that decision read is the step's one copy, and what observers measure
# after the update (the parameters' non-finite check, the update's size) rides the next step's copy (the last
# step's at the session's close, outside the count: one copy per run). Under fp16 the GradScaler decides (torch's
# own read) and under `continue` nothing is decided: one copy. `skip_before_backward` and `stop` read the loss
# before backward: one read each, outside the packet.
ENTRY_POINTS: dict[str, tuple[Callable[[int], HostReads], int, int]] = {
    "TrainStep fp32": (train_step("fp32"), 1, 0),
    "TrainStep fp16 GradScaler": (train_step("fp16"), 1, 0),
    "TrainStep fp32 skip_before_backward": (train_step("fp32", "skip_before_backward"), 1, 1),
    "TrainStep fp32 stop": (train_step("fp32", "stop"), 1, 1),
    "byo.instrument fp32": (byo("fp32"), 1, 0),
    "byo.instrument fp32 continue": (byo("fp32", "continue"), 1, 0),
    "byo.instrument fp16": (byo("fp16"), 1, 0),
    "byo.instrument fp16 activations": (byo("fp16", activations=True), 1, 0),
    "Lightning callback fp32": (lightning, 1, 0),
    "watch fp32": (watched("fp32"), 1, 0),
    "watch fp16 GradScaler": (watched("fp16"), 1, 0),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_one_transfer_per_step(name: str):
    run, transfers, others = ENTRY_POINTS[name]
    reads = run(STEPS)
    assert reads.transfers == transfers * STEPS and len(reads.outside) == others * STEPS, (reads.transfers,
                                                                                            reads.outside)
