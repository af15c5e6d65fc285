"""The Lightning callback on a real `lightning.Trainer` (CPU, fp32 and bf16-mixed): a module whose unfrozen
submodule is missing from the optimizer is reported and its run is stalled, a healthy one is healthy with no
finding, the norms sent to the trainer's logger are the run log's, nothing of the callback stays after fit, the run
log reads like the workbench's own, bad set-ups get one clear error, and StepUnfreeze unfreezes at the step."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.records import read_record  # noqa: E402
from workbench.run.lightning import LightningSetupError, StepUnfreeze, WorkbenchCallback  # noqa: E402

# Lightning's own: a torch deprecation inside lightning, and the warning of the module without an optimizer
pytestmark = [pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*configure_optimizers. returned .None.")]
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def data(n: int = 64, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


class Regressor(pl.LightningModule):
    """An encoder and a head. `stale_unfreeze_at`: the head starts frozen and outside the optimizer, and the module
    makes it trainable at that step without adding it to the optimizer (the bug the coverage check finds)."""

    def __init__(self, lr: float = 1e-2, stale_unfreeze_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.lr, self.stale_unfreeze_at = lr, stale_unfreeze_at
        if stale_unfreeze_at is not None:
            self.head.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        mse = F.mse_loss(self.head(self.encoder(x)).float(), y)
        l2 = 1e-4 * self.head.weight.float().square().sum()
        return {"loss": mse + l2, "mse": mse.detach(), "l2": l2.detach()}

    def on_train_batch_start(self, batch, batch_idx):
        if self.stale_unfreeze_at is not None and self.global_step + 1 == self.stale_unfreeze_at:
            self.head.requires_grad_(True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def fit(module, tmp_path: Path, callbacks, *, steps: int = 20, precision: str = "32-true", **trainer_kwargs):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision, callbacks=callbacks,
                         logger=pl.loggers.CSVLogger(tmp_path, name="csv"), log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         **trainer_kwargs)
    trainer.fit(module, data())
    return trainer


def logged(trainer) -> dict[str, dict[int, float]]:
    """What the CSV logger received: metric -> step -> value."""
    trainer.logger.save()
    out: dict[str, dict[int, float]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_healthy_module_is_healthy_and_the_logged_norms_are_the_run_logs(tmp_path, precision):
    lines: list[str] = []
    cb = WorkbenchCallback(tmp_path / "run.h5", log=lines.append)
    trainer = fit(Regressor(), tmp_path, [cb], precision=precision)
    summary = cb.summary()
    assert summary["outcome"] == "healthy", summary["outcome_reasons"]
    assert summary["outside_optimizer"] == [] and not cb.record.tables.get("coverage")
    assert lines[-1].startswith("workbench: outcome healthy: the training loss fell")

    record = read_record(tmp_path / "run.h5")
    assert record.status == "finished" and record.steps == list(range(1, 21))
    assert set(record.group_norms) == {"encoder", "head"}
    assert {"loss/total", "loss/mse", "loss/l2", "clip/total_norm", "update_ratio/head", "lr/group0"} <= set(
        record.series)
    sent = logged(trainer)
    for key in ("grad_norm/encoder", "grad_norm/head", "grad_norm/global", "loss/total", "update_ratio/encoder"):
        assert sent[f"workbench/{key}"] == pytest.approx(dict(zip(record.steps, record.values(key))), rel=1e-6), key
    # the total loss is the training_step's loss; its terms add up to it
    for total, mse, l2 in zip(record.values("loss/total"), record.values("loss/mse"), record.values("loss/l2")):
        assert total == pytest.approx(mse + l2, rel=1e-5)


def test_an_unfrozen_module_outside_the_optimizer_is_reported_and_stalled(tmp_path):
    lines: list[str] = []
    cb = WorkbenchCallback(tmp_path / "stale.h5", log=lines.append)
    trainer = fit(Regressor(stale_unfreeze_at=3), tmp_path, [cb], gradient_clip_val=0.5)
    summary = cb.summary()
    assert summary["outcome"] == "stalled"
    assert any(r.startswith("head got gradients on 18 steps") and "outside the optimizer on 18 of them" in r
               for r in summary["outcome_reasons"]), summary["outcome_reasons"]
    assert summary["outside_optimizer"] == ["head.weight", "head.bias"] or \
        sorted(summary["outside_optimizer"]) == ["head.bias", "head.weight"]
    coverage = cb.record.tables["coverage"]
    assert coverage[0]["step"] == 3 and len(coverage) == 18
    assert any(line.startswith("workbench: optimizer coverage: step 3: 2 trainable tensors outside the optimizer")
               for line in lines)
    record = read_record(tmp_path / "stale.h5")
    assert record.values("outside_optimizer/head")[2:] == [2] * 18
    # the clip coefficient is Lightning's: over the optimizer's parameters only
    sent = logged(trainer)
    for step, total, coef in zip(record.steps, record.values("clip/total_norm"), record.values("clip/coefficient")):
        assert coef == pytest.approx(min(1.0, 0.5 / (total + 1e-6)))
        assert sent["workbench/clip/coefficient"][step] == pytest.approx(coef)


def test_workbench_trace_and_report_read_the_callbacks_run_log(tmp_path, capsys):
    fit(Regressor(stale_unfreeze_at=3), tmp_path, [WorkbenchCallback(tmp_path / "stale.h5", log=lambda s: None)],
        steps=8)
    assert main(["trace", str(tmp_path / "stale.h5")]) == 0
    out = capsys.readouterr().out
    assert "status finished, 8 steps" in out and "optimizer-coverage findings: 6 step(s)" in out
    assert "step 3: 2 trainable tensors outside the optimizer" in out


def test_updates_are_the_shared_observers_in_one_host_copy_per_step(tmp_path):
    """What the optimizer did comes from `workbench.run.updates` (the observer watch and byo use), and the probe,
    the observer and the step's own values cross to the host in one copy per optimizer step."""
    from workbench.run.updates import OptimizerUpdates
    from workbench.train import host

    seen: list[object] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(cb.updates)

    cb = WorkbenchCallback(None, trace=False, log=lambda s: None)
    before = host.HOST_COPIES
    fit(Regressor(), tmp_path, [cb, Spy()], steps=6)
    assert host.HOST_COPIES - before == 6
    assert all(isinstance(u, OptimizerUpdates) for u in seen) and len(seen) == 6
    ratios = cb.record.prefixed("update_ratio")
    assert set(ratios) == {"encoder", "head"} and all(v > 0 for values in ratios.values() for v in values)
    assert cb.record.prefixed("not_updated") == {"encoder": [0] * 6, "head": [0] * 6}


def test_the_update_observer_takes_the_probes_norms_and_its_own_when_they_miss_a_tensor(tmp_path, monkeypatch):
    """The probe and the update observer read the gradients at the same moment, so the observer takes the probe's
    norms (no second pass over the gradients); an empty parameter, which the probe leaves out, makes the observer
    take its own, and both give the same rows."""
    from workbench.run import updates

    passes: list[int] = []
    real = updates.compat.foreach_norm

    def counted(tensors, *args, **kwargs):
        passes.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(updates.compat, "foreach_norm", counted)

    class WithEmpty(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.empty = nn.Parameter(torch.zeros(0))

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return {**out, "loss": out["loss"] + self.empty.sum()}

    calls, rows = {}, {}
    for module in (Regressor(), WithEmpty()):
        passes.clear()
        cb = WorkbenchCallback(None, trace=False, log=lambda s: None)
        fit(module, tmp_path, [cb], steps=3)
        calls[type(module).__name__] = len(passes)
        rows[type(module).__name__] = {k: v for k, v in cb.record.series.items()
                                       if k.startswith(("update_ratio/", "not_updated/")) and "root" not in k}
    # the same passes in both (the probe's, the observer's over its copies and their changes, the parameters'
    # first check) but one a step: the observer's own over the gradients, with the empty tensor only
    assert calls["WithEmpty"] - calls["Regressor"] == 3 and calls["Regressor"] == 3 * 3 + 1
    assert set(rows["Regressor"]) == {"update_ratio/encoder", "update_ratio/head", "not_updated/encoder",
                                      "not_updated/head"}
    assert rows["Regressor"] == rows["WithEmpty"]


def test_gradients_a_module_does_not_clear_are_stale(tmp_path):
    """A module whose optimizer_zero_grad clears only the encoder: the head's gradients accumulate across steps,
    which the shared observer's gradient pre-hooks report as stale_grad/head from the second step on."""

    class HeadNotCleared(Regressor):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            for p in self.encoder.parameters():
                p.grad = None

    cb = WorkbenchCallback(None, trace=False, log=lambda s: None)
    fit(HeadNotCleared(), tmp_path, [cb], steps=5)
    assert cb.record.values("stale_grad/head") == [0, 2, 2, 2, 2]
    assert cb.record.values("stale_grad/encoder") == [0] * 5
    clean = WorkbenchCallback(None, trace=False, log=lambda s: None)
    fit(Regressor(), tmp_path, [clean], steps=5)
    assert clean.record.values("stale_grad/head") == [0] * 5


def test_nothing_of_the_callback_stays_after_fit(tmp_path):
    module = Regressor()
    cb = WorkbenchCallback(None, log=lambda s: None)
    before = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
              for name, m in module.named_modules()}
    trainer = fit(module, tmp_path, [cb], steps=4)
    after = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for name, m in module.named_modules()}
    assert after == before
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in module.parameters())
    assert not any(p._backward_hooks for p in module.parameters())  # the update observer's gradient pre-hooks
    assert cb.probe is None and cb.coverage is None and cb.updates is None and cb.tracer is None
    assert cb.recorder is None
    assert [type(c) for c in trainer.callbacks].count(WorkbenchCallback) == 1
    assert cb.record.status == "finished" and len(cb.record.steps) == 4


def test_a_nan_is_traced_to_its_producer(tmp_path):
    class Blows(Regressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step + 1 == 3:
                y = y * 1e20  # finite targets whose squared error overflows float32 at step 3
            return F.mse_loss(self.head(self.encoder(x)), y)

    lines: list[str] = []
    cb = WorkbenchCallback(tmp_path / "nan.h5", log=lines.append)
    fit(Blows(), tmp_path, [cb], steps=5)
    summary = cb.summary()
    assert summary["outcome"] == "diverged" and summary["first_nonfinite_step"] == 3
    assert summary["tracer_verdicts"] and summary["tracer_verdicts"][0].startswith("step 3 forward: producer")
    assert "aten.mse_loss" in summary["tracer_verdicts"][0]
    assert [k["kind"] for k in summary["causal_chain"]][:1] == ["producer"]
    assert any(line.startswith("workbench: tracer: step 3 forward") for line in lines)


class BlowsAt(Regressor):
    """Finite targets whose squared error overflows float32 at optimizer step `at` (loss terms as Regressor's)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step + 1 == self.at:
            y = y * 1e20
        return super().training_step((x, y), batch_idx)


def test_the_tracer_captures_every_capture_every_steps_and_rebuilds_a_later_step_from_its_inputs(tmp_path,
                                                                                              monkeypatch):
    """The callback's tracer copies the model and optimizer every CAPTURE_EVERY (K) steps, not every step; a NaN
    at step K + 4 is traced from a bundle rebuilt by re-running steps K + 1 to K + 3 from the capture at step K + 1,
    each checked against the losses the live steps logged."""
    from workbench.instrument import replay_chain
    from workbench.instrument.tracer import CAPTURE_EVERY

    last = CAPTURE_EVERY + 4
    captures: list[int] = []
    real = replay_chain.capture

    def counted(step, batches, weights, *, index, **kwargs):
        captures.append(index)
        return real(step, batches, weights, index=index, **kwargs)

    monkeypatch.setattr(replay_chain, "capture", counted)
    cb = WorkbenchCallback(None, log=lambda s: None)
    fit(BlowsAt(last), tmp_path, [cb], steps=last)
    assert captures == [1, CAPTURE_EVERY + 1, last]  # two bases, then the last step's bundle on the replica
    assert cb.tracer is None and cb.record.status == "finished"
    summary = cb.summary()
    assert summary["tracer_verdicts"] and summary["tracer_verdicts"][0].startswith(f"step {last} forward: producer")
    assert not cb.record.tables.get("tracer_unreproduced")


def test_accumulation_windows_are_re_run_to_the_logged_losses_and_a_short_last_window_never_is(tmp_path):
    """Seven batches an epoch in windows of three: steps 1-3 in epoch 0 (the third a single batch, whose loss
    Lightning divides by 3 and a replay by 1), 4-6 in epoch 1. A NaN at step 6 is traced from the capture at
    epoch 1's start (steps 4 and 5 re-run as windows of three, their loss terms equal to the logged ones to the
    last bit), not from step 1, which would re-run the short window and could not match."""

    class Terms(BlowsAt):  # more loss terms, each a mean whose rounding a re-run must reproduce
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return {**out, **{f"part{i}": out["mse"] * (1 + i / 7) for i in range(6)}}

    cb = WorkbenchCallback(None, log=lambda s: None)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, precision="32-true", callbacks=[cb],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accumulate_grad_batches=3)
    trainer.fit(Terms(6), data(n=112, batch=16))
    assert cb.record.steps[:6] == [1, 2, 3, 4, 5, 6]
    summary = cb.summary()
    assert summary["tracer_verdicts"] and summary["tracer_verdicts"][0].startswith("step 6 forward: producer")
    assert not cb.record.tables.get("tracer_unreproduced")


def test_a_kept_step_whose_re_run_differs_keeps_no_bundle_and_the_log_says_why(tmp_path):
    """The keeper wants step 3's bundle (a trainable head outside the optimizer), which the chain rebuilds by
    re-running steps 1 and 2; this module's loss reads a Python counter no tensor holds, so the re-run differs.
    The log and the callback's lines say why step 3's bundle is not kept, and the keeper takes step 4's, which
    shows the same evidence and is a capture (the flipped requires_grad started a new base): nothing re-run."""

    class Drifts(Regressor):
        def __init__(self) -> None:
            super().__init__(stale_unfreeze_at=3)
            self.calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            out = super().training_step(batch, batch_idx)
            return {**out, "loss": out["loss"] * (1 + 1e-3 * self.calls)}

    lines: list[str] = []
    cb = WorkbenchCallback(tmp_path / "drift.h5", log=lines.append)
    fit(Drifts(), tmp_path, [cb], steps=4)
    record = read_record(tmp_path / "drift.h5")
    assert record.attrs["replay"]["step"] == 4
    assert record.attrs["replay_error"].startswith("step 3: step 1 re-run from the bundle of step 1: losses")
    assert any(line.startswith("workbench: no replay bundle kept for diagnose: step 3: step 1 re-run")
               for line in lines)


def test_parameters_made_non_finite_by_an_update_are_counted_at_that_step(tmp_path):
    class Overflows(Regressor):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step + 1 == 3:
                y = y * 3e38  # finite targets whose gradients overflow: the step's update writes NaN
            return F.mse_loss(self.head(self.encoder(x)), y)

    cb = WorkbenchCallback(None, trace=False, log=lambda s: None)
    fit(Overflows(), tmp_path, [cb], steps=4)
    finite = dict(zip(cb.record.steps, cb.record.values("params_finite")))
    tensors = dict(zip(cb.record.steps, cb.record.values("params_nonfinite/tensors")))
    elements = dict(zip(cb.record.steps, cb.record.values("params_nonfinite/elements")))
    assert [finite[s] for s in (1, 2, 3, 4)] == [True, True, False, False]
    assert tensors[2] == 0 and tensors[3] == 4 and elements[3] == sum(p.numel() for p in Overflows().parameters())


def test_a_parameter_written_non_finite_outside_the_optimizer_is_counted_at_that_step(tmp_path):
    """Only parameters written since the last step are screened (the update's by the norm of their change, any
    other whose version counter moved on the device): a frozen tensor the module fills with NaN in place at step 3
    is counted from that step on, and every step before is finite."""

    class Writes(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(5), requires_grad=False)  # in no optimizer group

        def training_step(self, batch, batch_idx):
            if self.global_step + 1 == 3:
                with torch.no_grad():
                    self.scale[:2] = math.nan
            return super().training_step(batch, batch_idx)

    cb = WorkbenchCallback(None, trace=False, log=lambda s: None)
    fit(Writes(), tmp_path, [cb], steps=5)
    assert cb.record.values("params_nonfinite/tensors") == [0, 0, 1, 1, 1]
    assert cb.record.values("params_nonfinite/elements") == [0, 0, 2, 2, 2]


def test_a_module_without_an_optimizer_or_configure_optimizers_gets_a_clear_error(tmp_path):
    class NoOptimizer(Regressor):
        def configure_optimizers(self):
            return None

    with pytest.raises(LightningSetupError, match=r"NoOptimizer.configure_optimizers returned no optimizer"):
        fit(NoOptimizer(), tmp_path, [WorkbenchCallback(tmp_path / "none.h5", log=lambda s: None)], steps=2)
    assert not (tmp_path / "none.h5").exists()

    class NoConfigure(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.layer(batch[0]), batch[1])

    with pytest.raises(Exception, match=r"No `configure_optimizers\(\)` method defined"):
        fit(NoConfigure(), tmp_path, [WorkbenchCallback(tmp_path / "none.h5", log=lambda s: None)], steps=2)
    assert not (tmp_path / "none.h5").exists()

    (tmp_path / "there.h5").write_text("mine")
    with pytest.raises(LightningSetupError, match="there.h5 already exists; choose another log_path"):
        fit(Regressor(), tmp_path, [WorkbenchCallback(tmp_path / "there.h5", log=lambda s: None)], steps=2)
    assert (tmp_path / "there.h5").read_text() == "mine"


@pytest.mark.parametrize("how", ["add_group", "rebuild"])
def test_step_unfreeze_unfreezes_at_the_step_into_the_optimizer(tmp_path, how):
    class WithScheduler(Regressor):
        def configure_optimizers(self):
            opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, 0.5),
                                                       "interval": "step"}}

    module = WithScheduler()
    lines: list[str] = []
    cb = WorkbenchCallback(tmp_path / "unfreeze.h5", log=lines.append)
    trainer = fit(module, tmp_path, [cb, StepUnfreeze("head", 4, how=how, log=lines.append)], steps=12)
    record = read_record(tmp_path / "unfreeze.h5")
    norms = record.values("grad_norm/head")
    assert norms[:4] == [None] * 4 and all(v > 0 for v in norms[4:])  # frozen for steps 1-4, training from step 5
    assert not record.tables.get("coverage")  # always inside the optimizer
    assert all(v > 0 for v in record.values("update_ratio/head")[4:])
    (event,) = record.tables["events"]
    assert event["event"] == "unfreeze" and event["step"] == 5 and event["how"] == how
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.01
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is optimizer and len(scheduler.base_lrs) == len(optimizer.param_groups)
    # StepLR halves every 5 steps: after 12 steps every group runs at lr / 4
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2 / 4] * len(optimizer.param_groups))
    if how == "add_group":
        assert [g.get("name") for g in optimizer.param_groups] == [None, "head"]
    else:
        assert [g["name"] for g in optimizer.param_groups] == ["encoder", "head"]
        assert not optimizer.state[module.encoder[0].weight] or \
            optimizer.state[module.encoder[0].weight]["step"] == 8  # fresh state from the rebuild at step 5
    assert record.first_nonfinite_step() is None and math.isfinite(record.values("loss/total")[-1])


def test_an_unfreeze_beyond_the_run_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"head would unfreeze at step 101, beyond the run's max_steps=6"):
        fit(Regressor(), tmp_path, [StepUnfreeze("head", 100, log=lambda s: None)], steps=6)


def test_a_policy_unfreezing_beyond_its_stage_warns():
    import warnings as _warnings

    from workbench.run.engine import RunEngine
    from workbench.train.policies import make_policy
    from workbench.train.stages import seed_stages
    from workbench.train.step import StepConfig, TrainStep

    class Parts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.preprocessor, self.encoder = nn.Linear(2, 2), nn.Linear(2, 2)
            self.ctc_head, self.rnnt_decoder = nn.Linear(2, 2), nn.Linear(2, 2)

    model = Parts()
    engine = RunEngine(TrainStep(model, torch.optim.AdamW(model.parameters()), StepConfig(), torch.device("cpu")))
    joint = seed_stages(0, 60)[0]
    with pytest.warns(UserWarning, match=r"freeze_params: rnnt_decoder would unfreeze at step 101, beyond the joint "
                                         r"stage's 60 steps"):
        engine.enter_stage(joint, seed=0, rebuild=True, policy=make_policy("freeze_params", 100))
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        engine.enter_stage(joint, seed=0, rebuild=True, policy=make_policy("freeze_params", 59))
