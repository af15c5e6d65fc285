"""ActivationStats: values against an independent forward, tuple outputs, hook lifecycle, one copy per step."""

import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from workbench.instrument import ActivationStats, leaf_modules_with_params
from workbench.train import host
from host_reads import HostReads  # tests/host_reads.py (tests/ is on the path through its conftest)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(inp=nn.Linear(6, 8), act=nn.Tanh(), out=nn.Linear(8, 3)))


class TwoBranch(nn.Module):
    """A trunk feeding an MLP branch and an LSTM branch (whose output is a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 8)
        self.left = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        self.right = nn.LSTM(8, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return self.left(h).sum() + self.right(h)[0].sum()


def stats_of(*outputs: torch.Tensor) -> tuple[float, float, int]:
    flat = torch.cat([o.detach().double().flatten() for o in outputs])
    finite = flat[torch.isfinite(flat)]
    amax = flat.abs().max().item() if finite.numel() == flat.numel() else math.inf
    return amax, math.sqrt(flat.square().mean().item()), int((~torch.isfinite(flat)).sum())


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) for m in model.modules()]


def test_values_match_an_independent_forward_over_two_calls():
    model = mlp()
    x1, x2 = torch.randn(4, 6), torch.randn(3, 6)
    with ActivationStats(model) as acts:
        model(x1)
        model(x2)  # two micro-batches in one step
        latest = acts.collect(step=1)
    assert acts.modules == ["inp", "out"] and acts.step == 1
    inp = [model.inp(x) for x in (x1, x2)]
    out = [model.out(torch.tanh(h)) for h in inp]
    for name, outputs in (("inp", inp), ("out", out)):
        amax, rms, nonfinite = latest[name]
        want = stats_of(*outputs)
        assert amax == pytest.approx(want[0], rel=1e-6) and rms == pytest.approx(want[1], rel=1e-6)
        assert nonfinite == 0
    assert acts.records() == {f"act_{k}/{m}": v for m in ("inp", "out")
                              for k, v in zip(("max", "rms", "nonfinite"), latest[m])}


def test_lstm_tuple_output_and_module_selection():
    model = TwoBranch()
    x = torch.randn(2, 7, 5)
    with ActivationStats(model, modules=["right", "left"]) as acts:
        model(x)
        latest = acts.collect()
    want = stats_of(model.right(torch.tanh(model.trunk(x)))[0])
    assert set(latest) == {"right", "left"}
    assert latest["right"][:2] == pytest.approx(want[:2], rel=1e-6)
    assert leaf_modules_with_params(model) == ["trunk", "left.0", "left.2", "right"]
    with pytest.raises(ValueError, match="'middle'"):
        ActivationStats(model, modules=["middle"])


def test_fp16_overflow_is_counted():
    model = nn.Sequential(OrderedDict(big=nn.Linear(4, 4, bias=False), small=nn.Linear(4, 2))).half()
    nn.init.constant_(model.big.weight, 200.0)
    x = torch.full((3, 4), 100.0, dtype=torch.float16)  # 4 * 200 * 100 = 80000 > 65504
    with ActivationStats(model) as acts:
        model(x)
        latest = acts.collect()
    h = model.big(x)
    assert torch.isinf(h).all()
    assert latest["big"] == (math.inf, math.inf, 12)
    small = model.small(h)  # inf times weights of both signs: NaN
    assert torch.isnan(small).all()
    assert math.isnan(latest["small"][0]) and latest["small"][2] == small.numel()


@pytest.mark.parametrize("on_device", [False, True])
def test_counts_with_and_without_the_host_shortcut(on_device, monkeypatch):
    """On the CPU a finite norm skips the count (`surely_finite`); forced off, the device path counts every call.
    Both count exactly: none under a finite norm, none under a norm that overflows from finite values, and
    every NaN and inf."""
    if on_device:
        monkeypatch.setattr("workbench.instrument.activations.host.surely_finite", lambda t: False)
    model = nn.Sequential(OrderedDict(big=nn.Linear(2, 2, bias=False), tail=nn.Linear(2, 2)))
    nn.init.constant_(model.big.weight, 1e20)
    with ActivationStats(model) as acts:
        model(torch.ones(1, 2))  # big: 2e20 each, finite; its float32 2-norm overflows
        finite = acts.collect()
        model(torch.full((1, 2), 1e19))  # big: 2e39 overflows float32, then tail: inf * weights
        overflow = acts.collect()
    assert math.isinf(finite["big"][1]) and finite["big"][2] == 0
    assert overflow["big"][2] == 2 and overflow["tail"][2] == 2


def test_hooks_removed_on_exit_and_never_doubled():
    model = TwoBranch()
    x = torch.randn(2, 7, 5)
    first = ActivationStats(model)
    first.__enter__()
    first.__enter__()
    second = ActivationStats(model)  # a re-run notebook cell: replaces the first one's hooks
    with second:
        assert max(hook_counts(model)) == 1 and sum(hook_counts(model)) == 4
        model(x)
        once = second.collect()
        assert first.collect() == {}
    assert hook_counts(model) == [0] * len(hook_counts(model))
    with second, second:
        model(x)
        again = second.collect()
    assert again == once and sum(hook_counts(model)) == 0


def test_no_grad_forwards_are_not_recorded_unless_asked():
    model = mlp()
    with ActivationStats(model) as acts:
        with torch.no_grad():
            model(torch.randn(2, 6))
        assert acts.collect() == {}
    with ActivationStats(model, include_no_grad=True) as acts, torch.no_grad():
        model(torch.randn(2, 6))
        assert set(acts.collect()) == {"inp", "out"}


def test_one_copy_per_step_as_observer():
    model = mlp()
    step = SimpleNamespace(observers=[])
    acts = ActivationStats(model)
    before = host.HOST_COPIES
    with HostReads() as reads, acts.attached(step):  # every read from workbench code but the sanctioned copy
        acts.attach(step)
        assert step.observers == [acts] and sum(hook_counts(model)) == 2
        for i in (1, 2, 3):
            model(torch.randn(2, 6)).sum().backward()
            for obs in step.observers:
                obs.on_step_end(SimpleNamespace(step=i))
            assert host.HOST_COPIES == before + i and acts.step == i
    assert step.observers == [] and sum(hook_counts(model)) == 0 and reads.outside == []


def test_many_calls_between_copies_are_folded_and_equal_the_whole(monkeypatch):
    from workbench.instrument import activations

    monkeypatch.setattr(activations, "_HELD", 3)  # folded on the host at every fourth call
    model = mlp()
    xs = [torch.randn(2, 6) for _ in range(9)]
    xs[1][0, 0] = math.nan  # a NaN in a call that is folded early: its max and count must survive the fold
    before = host.HOST_COPIES
    with ActivationStats(model) as acts:
        for x in xs:
            model(x)
            assert len(acts._calls) <= 3  # held on the device: bounded
        latest = acts.collect()
    assert host.HOST_COPIES - before == 18 // 4 + 1  # 18 calls (2 modules x 9 forwards): 4 folds, then the collect
    inp = [model.inp(x) for x in xs]
    out = [model.out(torch.tanh(h)) for h in inp]
    for name, outputs in (("inp", inp), ("out", out)):
        amax, rms, nonfinite = latest[name]
        want = stats_of(*outputs)
        assert math.isnan(amax) and math.isnan(rms)
        assert nonfinite == want[2] > 0
    clean = [x for k, x in enumerate(xs) if k != 1]
    with ActivationStats(model) as acts:
        for x in clean:
            model(x)
        latest = acts.collect()
    want = stats_of(*[model.inp(x) for x in clean])
    assert latest["inp"] == pytest.approx((want[0], want[1], 0), rel=1e-6)
