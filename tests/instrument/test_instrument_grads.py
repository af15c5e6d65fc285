"""GradNormProbe, OptimizerCoverage and parameter groups on small models, through a stand-in training step."""

import copy
import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from workbench.instrument import (
    ActivationStats, GradNormProbe, OptimizerCoverage, ParamGroups, default_groups, groups_from_patterns,
)
from workbench.train import host
from host_reads import HostReads  # tests/host_reads.py (tests/ is on the path through its conftest)

REL = 1e-6
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(inp=nn.Linear(6, 8), act=nn.Tanh(), mid=nn.Linear(8, 8), out=nn.Linear(8, 3)))


def batch(seed: int, n: int = 5, dim: int = 6, out: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randn(n, out, generator=gen)


def run_step(model, optimizer, batches, observers, step, scaler=None, loss_fn=None):
    """Stand-in for TrainStep: zero, backward per micro-batch (mean loss), unscale, observers, step."""
    loss_fn = loss_fn or (lambda m, x, y: nn.functional.mse_loss(m(x), y))
    ctx = SimpleNamespace(step=step, model=model, optimizer=optimizer, scaler=scaler, losses={}, result=None)

    def notify(event):
        for obs in observers:
            if hasattr(obs, event):
                getattr(obs, event)(ctx)

    notify("on_step_start")
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
            loss = loss_fn(model, x, y) / len(batches)
        (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    notify("on_after_backward")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ctx.result = SimpleNamespace(losses={}, skipped=False, grad_norm=None, scale=None)
    notify("on_step_end")


class Expected:
    """Observer computing, independently of the probe, what it should report at on_after_backward."""

    def __init__(self, model):
        self.model = model
        self.steps = {}

    def on_after_backward(self, ctx):
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        self.steps[ctx.step] = {n: torch.linalg.vector_norm(p.grad.double()).item() for n, p in named}


def grad_norm_of(model, names):
    grads = [p.grad.double().flatten() for n, p in model.named_parameters() if n in names and p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)).item()


def assert_matches_grads(model, stats, groups):
    named = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert stats.param_names == list(named)
    for i, (name, p) in enumerate(named.items()):
        g = p.grad.float()
        assert stats.param_norm[i] == pytest.approx(torch.linalg.vector_norm(g).item(), rel=REL)
        assert stats.param_max[i] == pytest.approx(g.abs().max().item(), rel=REL)
        assert stats.param_nonfinite[i] == 0
    for group, members in groups.items():
        assert stats.group_norm[group] == pytest.approx(grad_norm_of(model, members), rel=REL)
        assert stats.group_max[group] == pytest.approx(max(named[m].grad.abs().max().item() for m in members), rel=REL)
        assert stats.group_nonfinite[group] == 0
    clip_norm = torch.nn.utils.clip_grad_norm_(list(named.values()), math.inf).item()
    assert stats.global_norm == pytest.approx(clip_norm, rel=REL)


def test_groups_prefix_regex_overlap_and_typos():
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(11)])
    model.head = nn.Linear(2, 1)
    groups = groups_from_patterns(model, {"all": "layers", "one": "layers.1", "w": "re:\\.weight$",
                                          "pair": ["layers.0", "head"]})
    assert list(groups) == ["all", "one", "w", "pair"]
    assert groups["one"] == ["layers.1.weight", "layers.1.bias"]  # not layers.10
    assert len(groups["all"]) == 22 and len(groups["w"]) == 12
    assert groups["pair"] == ["layers.0.weight", "layers.0.bias", "head.weight", "head.bias"]
    with pytest.raises(ValueError, match="'layers.11'"):
        groups_from_patterns(model, {"bad": ["layers.0", "layers.11"]})


def test_default_groups_generic_and_declared_by_the_model():
    assert list(default_groups(mlp())) == ["inp", "mid", "out"]  # the Tanh has no parameters

    class Declares(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.head = nn.Linear(2, 3)

        def param_groups(self) -> dict[str, str | list[str]]:
            return {"encoder": "encoder", "first": "encoder.layers.0", "weights": "re:weight$"}

    groups = default_groups(Declares())
    assert list(groups) == ["encoder", "first", "weights"]
    assert groups["encoder"] == groups["first"] + ["encoder.layers.1.weight", "encoder.layers.1.bias"]
    assert groups["weights"] == ["encoder.layers.0.weight", "encoder.layers.1.weight", "head.weight"]


def test_reference_model_declares_its_groups():
    from workbench.model import HybridModel, get_config

    groups = default_groups(HybridModel(get_config("tiny", n_layers=2)))
    assert list(groups) == ["preprocessor", "encoder", "encoder.layers.0", "encoder.layers.1", "ctc_head",
                            "rnnt_decoder.predictor", "rnnt_decoder.joint", "mode_head"]
    assert groups["encoder"] == groups["encoder.layers.0"] + groups["encoder.layers.1"] + [
        "encoder.norm.weight", "encoder.norm.bias"]


def test_norms_equal_independent_computation_fp32():
    model = mlp()
    patterns = {"front": ["inp", "mid"], "mid": "mid", "biases": "re:bias$"}
    probe = GradNormProbe(model, patterns)
    run_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [batch(1)], [probe], step=1)
    assert probe.latest.step == 1 and probe.latest.scale is None and probe.latest.update_ratio is None
    assert_matches_grads(model, probe.latest, groups_from_patterns(model, patterns))


def test_fp16_autocast_gradscaler_reports_unscaled_values():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(6, 16), b=nn.Linear(16, 3)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    probe = GradNormProbe(model)
    run_step(model, optimizer, [batch(2)], [probe], step=1, scaler=scaler)
    assert probe.latest.scale == 2.0**12
    assert_matches_grads(model, probe.latest, default_groups(model))  # .grad is unscaled after unscale_
    assert probe.records()["scaler/scale"] == 2.0**12


def test_gradient_accumulation_is_per_optimizer_step():
    model = mlp()
    reference = copy.deepcopy(model)
    probe = GradNormProbe(model)
    (x1, y1), (x2, y2) = batch(3), batch(4)
    run_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [(x1, y1), (x2, y2)], [probe], step=1)
    # Two equal micro-batches with the loss halved each = one backward on the whole batch.
    nn.functional.mse_loss(reference(torch.cat([x1, x2])), torch.cat([y1, y2])).backward()
    full = {n: torch.linalg.vector_norm(p.grad).item() for n, p in reference.named_parameters()}
    assert probe.latest.param_norm == pytest.approx([full[n] for n in probe.latest.param_names], rel=1e-5)
    assert_matches_grads(model, probe.latest, default_groups(model))


class Blowup(nn.Module):
    """exp(30 * 4) overflows float32; a zero head weight turns the overflow into 0 * inf = NaN upstream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head, self.side = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 2)
        nn.init.constant_(self.lin.weight, 30.0)
        with torch.no_grad():
            self.head.weight[:, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.exp(self.lin(x))).sum() + self.side(x).sum()


def test_nonfinite_counts_from_overflowing_arithmetic():
    model = Blowup()
    probe = GradNormProbe(model)
    run_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [(torch.ones(3, 4), None)], [probe], step=1,
             loss_fn=lambda m, x, y: m(x))
    stats = probe.latest
    named = dict(model.named_parameters())
    expected = {n: int((~torch.isfinite(p.grad)).sum()) for n, p in named.items()}
    assert stats.param_nonfinite.tolist() == [expected[n] for n in stats.param_names]
    assert torch.isnan(model.lin.weight.grad).any() and torch.isinf(model.lin.weight.grad).any()
    for group, members in default_groups(model).items():
        assert stats.group_nonfinite[group] == sum(expected[m] for m in members)
    abs_max = [torch.linalg.vector_norm(named[n].grad, math.inf).item() for n in stats.param_names]
    np.testing.assert_array_equal(stats.param_max, abs_max)  # inf and NaN where the gradient has them
    assert math.isnan(stats.group_norm["lin"]) and math.isnan(stats.global_norm)
    # One group's NaN and inf must not leak into another group's statistics.
    assert stats.group_norm["side"] == pytest.approx(grad_norm_of(model, ["side.weight", "side.bias"]), rel=REL)
    assert stats.group_max["side"] == 3.0 and stats.group_nonfinite["side"] == 0


@pytest.mark.parametrize(("model_cls", "features"), [(mlp, 6), (Blowup, 4)])
def test_accelerator_path_counts_what_the_host_shortcut_skips(model_cls, features, monkeypatch):
    """On the CPU a finite norm skips the non-finite count (`surely_finite`); on an accelerator the count always
    runs on the device. Both give the same statistics, finite gradients or not."""
    def stats_of(path_on_device: bool):
        if path_on_device:
            monkeypatch.setattr("workbench.instrument.grad_norms.surely_finite", lambda t: False)
        model = model_cls()
        probe = GradNormProbe(model)
        run_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [(torch.ones(3, features), None)], [probe],
                 step=1, loss_fn=lambda m, x, y: m(x).sum())
        return probe.latest

    host_path, device_path = stats_of(False), stats_of(True)
    for field in ("param_norm", "param_max", "param_nonfinite"):
        np.testing.assert_array_equal(getattr(host_path, field), getattr(device_path, field))
    assert host_path.group_nonfinite == device_path.group_nonfinite


def test_fp16_gradients_are_normed_in_float32():
    model = nn.Sequential(OrderedDict(lin=nn.Linear(256, 256, bias=False))).half()
    probe = GradNormProbe(model)
    x = torch.full((1, 256), 20.0, dtype=torch.float16)
    # d/dW sum(15 * W x) = 15 * x for every row: 256 * 256 entries of 300, norm 76800 > fp16's 65504.
    run_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [(x, None)], [probe], step=1,
             loss_fn=lambda m, x, y: (m(x) * 15).sum())
    assert torch.isinf(torch.linalg.vector_norm(model.lin.weight.grad))
    exact = torch.linalg.vector_norm(model.lin.weight.grad.double()).item()
    assert exact == 76800.0  # float32 accumulation of 65536 equal squares is only good to about 1e-4
    assert probe.latest.param_norm[0] == pytest.approx(exact, rel=1e-4)
    assert probe.latest.global_norm == pytest.approx(exact, rel=1e-4)
    assert probe.latest.param_nonfinite[0] == 0


def test_one_host_copy_per_step_and_no_item():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(6, 8), b=nn.LSTM(8, 3, batch_first=True)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = GradNormProbe(model, update_ratio=True)
    coverage = OptimizerCoverage(model, probe=probe)
    acts = ActivationStats(model)

    def loss_fn(m, x, y):
        return m.b(m.a(x))[0].square().mean()

    before = host.HOST_COPIES
    with HostReads() as reads:  # every read from workbench code but the one sanctioned copy
        for step in (1, 2, 3):
            run_step(model, optimizer, [batch(step)], [coverage, probe], step, loss_fn=loss_fn)
        assert host.HOST_COPIES - before == 3  # probe + coverage: one combined copy per step
        with acts:
            for step in (4, 5):
                run_step(model, optimizer, [batch(step)], [coverage, probe, acts], step, loss_fn=loss_fn)
        assert host.HOST_COPIES - before == 3 + 2 * 2  # activations add their own copy: one each
    assert reads.outside == []
    assert [s.step for s in probe.history] == [1, 2, 3, 4, 5] and coverage.findings == []
    assert set(acts.latest) == {"a", "b"}


def test_the_history_keeps_the_last_history_size_steps():
    """A long run's statistics live in its record and log; the probe keeps only the newest few in memory."""
    model = mlp()
    probe = GradNormProbe(model, history_size=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        run_step(model, optimizer, [batch(step)], [probe], step)
    assert [s.step for s in probe.history] == [3, 4, 5] and probe.latest.step == 5
    with pytest.raises(ValueError, match="history_size"):
        GradNormProbe(model, history_size=0)


def test_every_k_packs_k_steps_into_one_copy():
    model = mlp()
    probe = GradNormProbe(model, every=3)
    expected = Expected(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = host.HOST_COPIES
    for step in (1, 2):
        run_step(model, optimizer, [batch(step)], [expected, probe], step)
    assert host.HOST_COPIES == before and not probe.history and probe.latest is None
    run_step(model, optimizer, [batch(3)], [expected, probe], 3)
    assert host.HOST_COPIES == before + 1
    assert [s.step for s in probe.history] == [1, 2, 3] and probe.latest.step == 3
    for stats in probe.history:
        want = expected.steps[stats.step]
        assert stats.param_norm == pytest.approx([want[n] for n in stats.param_names], rel=REL)
    run_step(model, optimizer, [batch(4)], [expected, probe], 4)
    probe.detach()  # not attached: still flushes the pending step
    assert host.HOST_COPIES == before + 2 and probe.latest.step == 4


def test_update_ratio_and_records():
    model = mlp()
    model.mid.requires_grad_(False)
    lr = 0.1
    probe = GradNormProbe(model, update_ratio=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr), [batch(5)],
             [probe], step=1)
    stats = probe.latest
    assert set(stats.group_norm) == {"inp", "out"}  # mid has no gradient this step
    for group, members in default_groups(model).items():
        if group == "mid":
            continue
        delta = math.sqrt(sum(torch.sum((dict(model.named_parameters())[m] - before[m]) ** 2).item() for m in members))
        norm = math.sqrt(sum(torch.sum(before[m] ** 2).item() for m in members))
        assert stats.update_ratio[group] == pytest.approx(delta / norm, rel=1e-5)
    row = probe.records()
    assert row["grad_norm/global"] == stats.global_norm
    assert {k for k in row if k.startswith(("grad_norm/", "grad_max/", "grad_nonfinite/", "update_ratio/"))} == {
        f"{kind}/{g}" for kind in ("grad_norm", "grad_max", "grad_nonfinite", "update_ratio") for g in ("inp", "out")
    } | {"grad_norm/global"}
    vector = row["param_grad_norm"]
    assert len(vector) == len(probe.param_labels) == 6
    assert np.isnan(vector[[2, 3]]).all() and np.isfinite(vector[[0, 1, 4, 5]]).all()


def test_collect_without_trainstep():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    probe = GradNormProbe(model)
    x, y = batch(6)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    with pytest.raises(ValueError, match="unscale_"):
        probe.collect(optimizer, scaler)
    scaler.unscale_(optimizer)
    before = host.HOST_COPIES
    stats = probe.collect(optimizer, scaler)
    assert host.HOST_COPIES == before + 1 and stats is probe.latest and stats.step == 1
    assert_matches_grads(model, stats, default_groups(model))
    assert probe.collect(step=7).step == 7


def test_attach_is_idempotent():
    model = mlp()
    step = SimpleNamespace(observers=[])
    probe, coverage = GradNormProbe(model), OptimizerCoverage(model)
    probe.attach(step)
    probe.attach(step)
    with coverage.attached(step):
        with coverage.attached(step):
            assert step.observers == [probe, coverage]
        assert step.observers == [probe]
    probe.detach()
    assert step.observers == []


def _three_children():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(a=nn.Linear(6, 8), b=nn.Linear(8, 8), c=nn.Linear(8, 3)))


@pytest.mark.parametrize("with_probe", [True, False])
def test_coverage_flags_outside_and_frozen(with_probe):
    model = _three_children()
    model.c.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([*model.a.parameters(), *model.c.parameters()], lr=0.1)  # b left out
    probe = GradNormProbe(model) if with_probe else None
    coverage = OptimizerCoverage(model, probe=probe)
    before = host.HOST_COPIES
    run_step(model, optimizer, [batch(7)], [coverage, *([probe] if probe else [])], step=1)
    assert host.HOST_COPIES == before + 1  # the probe's copy, or coverage's own on a step with a problem
    finding = coverage.latest
    assert not finding.ok and coverage.findings == [finding]
    want = {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.b.named_parameters()}
    assert sorted(name for name, _ in finding.outside_optimizer) == ["b.bias", "b.weight"]
    for name, norm in finding.outside_optimizer:
        assert norm == pytest.approx(want[name.split(".")[1]], rel=REL)
    norms = [norm for _, norm in finding.outside_optimizer]
    assert norms == sorted(norms, reverse=True)
    assert finding.frozen_in_optimizer == ["c.weight"]
    line = coverage.one_line()
    assert line.startswith(f"step 1: 2 trainable tensors outside the optimizer ({finding.outside_optimizer[0][0]} |g|=")
    assert line.endswith("; 1 frozen tensors in the optimizer (c.weight)")


def test_coverage_is_silent_when_everything_is_covered():
    model = _three_children()
    coverage = OptimizerCoverage(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = host.HOST_COPIES
    for step in (1, 2):
        run_step(model, optimizer, [batch(step)], [coverage], step)
    assert host.HOST_COPIES == before  # nothing to report, nothing copied
    assert coverage.latest.ok and coverage.findings == [] and coverage.latest.step == 2
    assert "holds every trainable tensor" in coverage.one_line()


def test_probe_rejects_foreign_groups_and_bad_every():
    with pytest.raises(ValueError, match="every"):
        GradNormProbe(mlp(), every=0)
    with pytest.raises(ValueError, match="not a parameter"):
        GradNormProbe(mlp(), ParamGroups({"x": ["nope.weight"]}))


def test_with_real_trainstep():
    train = pytest.importorskip("workbench.train")
    losses = pytest.importorskip("workbench.model.losses")
    model = _three_children()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(m, b, w, **kw):
        return {"total": nn.functional.mse_loss(m(b[0]), b[1])}

    step = train.TrainStep(model, optimizer, train.StepConfig(clip=None), torch.device("cpu"), loss_fn=loss_fn)
    probe = GradNormProbe(model)
    coverage = OptimizerCoverage(model, probe=probe)
    weights = losses.LossWeights(ctc=0.3, rnnt=1.0, mode=0.0)
    with probe.attached(step), coverage.attached(step):
        before = host.HOST_COPIES
        result = step([batch(8)], weights)
        assert host.HOST_COPIES == before + 1
    assert probe.latest.global_norm == pytest.approx(result.grad_norm, rel=REL)
    assert coverage.latest.ok and step.observers == []
