"""`workbench diagnose` of `byo.instrument` sessions and Lightning runs: the run keeps, beside its log, the replay
bundle of its first step at which the evidence appears, and diagnose continues that bundle with each candidate on
its captured batches. A head that is unfrozen but never given to the optimizer (the bug the coverage check finds):
the control reproduces the stall in every seed and the recommendation, an optimizer-coverage fix, is healthy in
every seed."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.cli import main
from workbench.records import read_record
from workbench.run.byo import instrument
from workbench.run.kept import bundle_path
from workbench.studies.diagnose import DiagnoseError, diagnose
from workbench.studies.diagnose import continued
from workbench.train.step import get_semantics


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(16, 1, generator=g)


class Net(nn.Module):
    """An encoder (with dropout: the seeds' RNG draws its masks) and a head that starts frozen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1))
        self.head = nn.Linear(32, 1)
        self.head.requires_grad_(False)


def mse(model: Net, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return F.mse_loss(model.head(model.encoder(x)), y)


def byo_run(log, *, unfreeze_at: int | None = 3, steps: int = 20) -> Net:
    """The bug: the head is made trainable at `unfreeze_at` and never given to the optimizer."""
    model = Net()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with instrument(model, optimizer, mse, log_path=log) as session:
        for k in range(1, steps + 1):
            if k == unfreeze_at:
                model.head.requires_grad_(True)
            session.step(batch(k))
    return model


def test_a_byo_session_keeps_the_bundle_of_its_first_step_with_the_evidence(tmp_path):
    byo_run(tmp_path / "clean.h5", unfreeze_at=None, steps=4)
    replay = read_record(tmp_path / "clean.h5").attrs["replay"]
    assert (replay["step"], replay["why"], replay["source"]) == (1, "the earliest step", "byo")
    assert replay["model_class"].endswith(":Net") and replay["loss_fn"].endswith(":mse")
    byo_run(tmp_path / "stale.h5", steps=5)
    replay = read_record(tmp_path / "stale.h5").attrs["replay"]
    assert (replay["step"], replay["why"]) == (3, "the first step with a trainable tensor outside the optimizer")
    assert replay["optimizer"]["groups"] == [["encoder.0.weight", "encoder.0.bias"]]
    assert bundle_path(tmp_path / "stale.h5").is_file() and replay["bundle"] == "stale.bundle.pt"


def test_a_run_that_goes_non_finite_keeps_the_bundle_of_its_first_non_finite_step(tmp_path):
    # plain SGD at lr 10 on this regression overshoots further every step until the weights overflow
    model = Net()
    model.head.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    with instrument(model, optimizer, mse, clip=None, log_path=tmp_path / "blows.h5") as session:
        for k in range(1, 31):
            session.step(batch(k))
    record = read_record(tmp_path / "blows.h5")
    norms, losses = record.values("clip/total_norm"), record.values("loss/total")
    first = next(s for s, n, v in zip(record.steps, norms, losses) if not (math.isfinite(n) and math.isfinite(v)))
    assert first < record.first_nonfinite_step()  # the gradient norm overflowed before the loss did
    assert (record.attrs["replay"]["step"], record.attrs["replay"]["why"]) == (first, "the first non-finite step")


@pytest.mark.slow
def test_diagnose_of_a_byo_session_recommends_a_coverage_fix_healthy_in_every_seed(tmp_path):
    log = tmp_path / "byo.h5"
    byo_run(log)
    assert read_record(log).status == "finished"
    found = diagnose(log, seeds=3, model=Net(), loss_fn=mse)
    assert found.scope["run_outcome"] == "stalled" and found.scope["bundle_step"] == 3
    assert found.control["outcomes"] == ["stalled"] * 3 and found.control["reproduced"], found.lines
    by = {c["name"]: c for c in found.candidates}
    assert {"rebuild_at_stage_change", "add_missing_group"} <= set(by)
    assert found.recommended in by, found.table() + "\n".join(found.lines)
    best = by[found.recommended]
    assert best["coverage"] and best["healthy"] == 3 and best["outside_seeds"] == 0, found.table()
    assert found.lines[-1].startswith("In code: ")
    # the seeds draw different dropout masks: different runs from the same state
    losses = [read_record(tmp_path / "byo_diagnose" / f"control-seed{s}.h5").losses for s in (0, 1)]
    assert losses[0] != losses[1]


def test_an_fp16_loop_that_clips_before_unscaling_gets_clip_after_unscale(tmp_path):
    # SGD's step shrinks with the clip coefficient, which the loss scale (65536) pushed below 1e-3
    model = Net()
    model.head.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loop = get_semantics("corrected", unscale_before_clip=False)
    with instrument(model, optimizer, mse, precision="fp16", clip=1.0, semantics=loop,
                    log_path=tmp_path / "fp16.h5") as session:
        for k in range(1, 21):
            session.step(batch(k))
    found = diagnose(tmp_path / "fp16.h5", seeds=3, model=Net(), loss_fn=mse)
    assert "clip_collapsed" in found.evidence and found.scope["run_outcome"] != "healthy"
    assert found.control["reproduced"], found.lines
    by = {c["name"]: c for c in found.candidates}
    assert by["clip_after_unscale"]["changes"] == "unscale_before_clip False -> True"
    assert found.recommended == "clip_after_unscale" and by["clip_after_unscale"]["healthy"] == 3, found.table()
    assert found.lines[-1] == "In code: scaler.unscale_(optimizer) before clip_grad_norm_."


def test_a_group_of_its_own_takes_the_groups_held_tensors_at_ten_times_the_lr_with_their_state():
    model = Net()
    model.head.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mse(model, batch(0)).backward()
    optimizer.step()
    state = optimizer.state[model.head.weight]
    continued._own_group(model, optimizer, ["head.weight", "head.bias"])
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-2) and optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[1]["params"][0] is model.head.weight and optimizer.state[model.head.weight] is state


def test_the_same_seed_continues_a_kept_bundle_to_the_same_numbers(tmp_path):
    log = tmp_path / "byo.h5"
    byo_run(log, steps=4)
    kept = continued.load(read_record(log), str(log), model=Net(), loss_fn=mse)
    a, b = (continued.run(kept, kept.control, 1, 3, tmp_path / f"{n}.h5").losses for n in "ab")
    assert a == b


def test_a_byo_log_whose_model_cannot_be_built_asks_for_it_in_one_line(tmp_path):
    class Local(Net):
        pass

    model = Local()
    optimizer = torch.optim.AdamW(model.encoder.parameters(), lr=1e-2)
    with instrument(model, optimizer, mse, log_path=tmp_path / "local.h5") as session:
        session.step(batch(0))
    with pytest.raises(DiagnoseError, match=r"local.h5: a byo run of .*Local: to continue it, pass the model in "
                                            r"Python: diagnose\(log, model=<the model>, loss_fn=<its loss function>\)"):
        diagnose(tmp_path / "local.h5")
    assert main(["diagnose", str(tmp_path / "local.h5")]) == 2


pl = pytest.importorskip("lightning.pytorch")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


class StaleHead(pl.LightningModule):
    """An encoder (with dropout) and a head the module unfreezes at `unfreeze_at` without giving it to the
    optimizer that `configure_optimizers` built over the trainable tensors at the start."""

    def __init__(self, lr: float = 1e-2, unfreeze_at: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1))
        self.head = nn.Linear(32, 1)
        self.head.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.encoder(x)), y)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step + 1 == self.hparams.unfreeze_at:
            self.head.requires_grad_(True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec")
def test_diagnose_of_a_lightning_run_recommends_a_coverage_fix_healthy_in_every_seed(tmp_path, capsys):
    from torch.utils.data import DataLoader, TensorDataset

    from workbench.run.lightning import WorkbenchCallback

    x = torch.cat([batch(k)[0] for k in range(4)])
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16)
    log = tmp_path / "lightning.h5"
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", devices=1, callbacks=[WorkbenchCallback(log, log=print)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(StaleHead(), data)
    replay = read_record(log).attrs["replay"]
    assert (replay["source"], replay["step"], replay["hparams"]) == ("lightning", 3, {"lr": 1e-2, "unfreeze_at": 3})
    capsys.readouterr()
    # through the CLI: the log names an importable class and its hparams rebuild it
    assert main(["diagnose", str(log), "--seeds", "3", "--json", str(tmp_path / "d.json")]) == 0
    printed = capsys.readouterr().out
    found = diagnose(log, seeds=3, module=StaleHead(), out=tmp_path / "api")
    assert found.control["outcomes"] == ["stalled"] * 3 and found.control["reproduced"], found.lines
    best = next(c for c in found.candidates if c["name"] == found.recommended)
    assert best["coverage"] and best["healthy"] == 3 and best["outside_seeds"] == 0, found.table()
    assert f"Recommended: {found.recommended}, healthy in 3/3 seeds" in printed and "3/3 stalled" in printed


@pytest.mark.slow
def test_the_readmes_byo_diagnose_example_runs_as_written(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "model=model, loss_fn=" in b]
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "control                  nothing                         3/3 stalled" in proc.stdout
    assert "Recommended: rebuild_at_stage_change, healthy in 3/3 seeds" in proc.stdout


def test_a_missing_or_damaged_bundle_is_one_line_naming_the_log_and_the_file(tmp_path):
    byo_run(tmp_path / "run.h5", steps=3)
    bundle = bundle_path(tmp_path / "run.h5")
    bundle.write_bytes(b"not a bundle")
    with pytest.raises(DiagnoseError, match=r"run.h5: run.bundle.pt: expected a replay bundle torch.load\("
                                            r"weights_only=True\) reads, got "):
        diagnose(tmp_path / "run.h5", model=Net(), loss_fn=mse)
    bundle.unlink()
    with pytest.raises(DiagnoseError, match=r"run.h5: replay: expected the run's kept bundle at .*run.bundle.pt, "
                                            r"got no file there"):
        diagnose(tmp_path / "run.h5", model=Net(), loss_fn=mse)
    byo_run(tmp_path / "again.h5", steps=3)
    with pytest.raises(DiagnoseError, match=r"again.h5: the model given has no parameter 'encoder.0.bias': expected "
                                            r"an object of the run's own class, Net"):
        diagnose(tmp_path / "again.h5", model=nn.Linear(8, 1), loss_fn=mse)
