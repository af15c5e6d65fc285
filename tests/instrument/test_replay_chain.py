"""Replay chains: a bundle rebuilt from a base and the inputs since equals the one captured at that step, new
bases where a re-run could not reproduce the run, and a tracer capturing every K steps finds what it finds
capturing every step."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from test_tracer import Exp, Weights, chain, linear, make_step, mean_out, toy  # tests/instrument/test_tracer.py
from workbench.instrument.replay import capture
from workbench.instrument.replay_chain import ReplayChain, ReplayMismatch
from workbench.instrument.tracer import NonFiniteTracer
from workbench.train.step import SEMANTICS, StepConfig, TrainStep


def dropout_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(a=nn.Linear(6, 8), drop=nn.Dropout(0.3), b=nn.Linear(8, 3)))


def batch(k: int):
    g = torch.Generator().manual_seed(k)
    return toy(torch.randn(4, 6, generator=g), 3)


def _assert_same_state(a, b) -> None:
    assert a.step == b.step and a.trainable == b.trainable and a.precision == b.precision
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
    for (pa, sa), (pb, sb) in zip(a.optimizer_state["state"].items(), b.optimizer_state["state"].items()):
        assert pa == pb and sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), (pa, k)
    assert a.optimizer_state["param_groups"] == b.optimizer_state["param_groups"]
    assert torch.equal(a.cpu_rng, b.cpu_rng)
    assert all(torch.equal(x.x, y.x) for x, y in zip(a.batches, b.batches))


def test_a_rebuilt_bundle_equals_the_one_captured_at_that_step():
    """Adam state, dropout draws and a learning rate changed between steps (a scheduler) are all reproduced."""
    model = dropout_model()
    step = make_step(model, optimizer="adam", lr=1e-2)
    live = ReplayChain(every=4)
    captured = {}
    for k in range(1, 8):
        for group in step.optimizer.param_groups:
            group["lr"] = 1e-2 / k
        index = step.step_index + 1
        captured[index] = capture(step, batch(k), Weights(), index=index)
        live.start(step, batch(k), Weights(), rnnt=True, mode=False, index=index)
        result = step(batch(k), Weights())
        step.settle()
        live.updated()
        live.ended(index, result.losses)
    # bases at steps 1 and 5; step 4's chain is gone once every step of it ended
    assert [live.covers(i) for i in range(1, 8)] == [False] * 4 + [True] * 3
    rng = torch.get_rng_state()
    for index in (5, 6, 7):
        _assert_same_state(live.bundle_at(step, index), captured[index])
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG state is kept


def test_new_bases_where_a_rerun_could_not_reproduce_the_run():
    model = dropout_model()
    step = make_step(model, optimizer="adam")
    live = ReplayChain(every=8)

    def run(k: int) -> int:
        index = step.step_index + 1
        live.start(step, batch(k), Weights(), rnnt=True, mode=False, index=index)
        result = step(batch(k), Weights())
        step.settle()
        live.updated()
        live.ended(index, result.losses)
        return live._chain.base.step

    assert [run(k) for k in range(3)] == [1, 1, 1]
    with torch.no_grad():
        model.a.weight.mul_(0.5)  # a write between steps, not by the optimizer
    assert run(3) == 4
    model.b.bias.requires_grad_(False)
    assert run(4) == 5
    step.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert run(5) == 6 and run(6) == 6
    step.config.clip = 0.5
    assert run(7) == 8 and run(8) == 8


def test_slow_steps_are_each_a_base(monkeypatch):
    """A chain never holds more than `max_rerun_s` of training to re-run: with slow steps every step is a base."""
    clock = [0.0]
    monkeypatch.setattr("workbench.instrument.replay_chain.time.perf_counter", lambda: clock[0])
    model = dropout_model()
    step = make_step(model)
    live = ReplayChain(every=8, max_rerun_s=2.0)
    bases = []
    for k, seconds in enumerate([0.5, 0.5, 0.5, 0.5, 3.0, 3.0, 0.5]):
        index = step.step_index + 1
        live.start(step, batch(k), Weights(), rnnt=True, mode=False, index=index)
        clock[0] += seconds  # the step's time
        result = step(batch(k), Weights())
        step.settle()
        live.updated()
        live.ended(index, result.losses)
        bases.append(live._chain.base.step)
    assert bases == [1, 1, 1, 1, 5, 6, 7]


def test_a_rerun_that_differs_from_the_live_loss_is_refused():
    model = chain(enc=linear(4, 4), boom=Exp(0.1), head=linear(4, 2, 0.5))
    step = make_step(model)
    live = ReplayChain(every=8)
    for k in range(3):
        index = step.step_index + 1
        live.start(step, toy(torch.full((2, 4), 0.1), 2), Weights(), rnnt=True, mode=False, index=index)
        result = step(toy(torch.full((2, 4), 0.1), 2), Weights())
        step.settle()
        live.updated()
        live.ended(index, result.losses)
        model.boom.k += 0.1  # changes the forward without writing a tensor: nothing the chain can see
    with pytest.raises(ReplayMismatch, match="step 1 re-run from the bundle of step 1"):
        live.bundle_at(step, 3)


@pytest.mark.parametrize("every", [1, 4])
def test_tracer_capturing_every_k_steps_finds_what_capturing_every_step_finds(every):
    def traced(every: int):
        model = chain(enc=linear(4, 4), boom=Exp(10.0), head=linear(4, 2, 0.5))
        step = make_step(model, optimizer="adam", lr=1e-3)
        tracer = NonFiniteTracer(max_traces=1, capture_every=every)
        tracer.attach(step)
        good = [toy(torch.full((2, 4), 0.1 * k), 2) for k in range(1, 6)]  # with every=4: a base at step 5
        for b in (*good, toy(torch.full((2, 4), 20.0), 2)):
            step(b, Weights())
            step.settle()
        return tracer

    reference, tracer = traced(1), traced(every)
    assert [t.to_dict() for t in tracer.traces] == [t.to_dict() for t in reference.traces]
    v = tracer.verdicts[0]
    assert (v.step, v.phase, v.module, v.role) == (6, "forward", "boom", "producer")
    assert tracer.untraced == []


def test_tracer_every_k_steps_follows_the_stale_optimizer_escape():
    """test_tracer's seed_faithful case, two traces: the second step's bundle is rebuilt from the first's."""
    def verdicts(every: int):
        model = chain(enc=linear(8, 8, 2.0), head=linear(8, 4, 0.5))
        opt = torch.optim.SGD(model.enc.parameters(), lr=1e-3)
        step = TrainStep(model, opt, StepConfig(precision="fp16", semantics=SEMANTICS["seed_faithful"]),
                         torch.device("cpu"), loss_fn=mean_out)
        tracer = NonFiniteTracer(max_traces=2, capture_every=every)
        tracer.attach(step)
        b = toy(torch.full((256, 8), 0.5), 4)
        step(b, Weights())
        step(b, Weights())
        return [v.to_dict() for v in tracer.verdicts]

    assert verdicts(4) == verdicts(1) and len(verdicts(1)) == 2


def test_a_tracer_whose_rerun_differs_reports_the_step_unreproduced():
    model = chain(enc=linear(4, 4), boom=Exp(0.1), head=linear(4, 2, 0.5))
    step = make_step(model)
    tracer = NonFiniteTracer(capture_every=8)
    tracer.attach(step)
    for k in range(3):
        step(toy(torch.full((2, 4), 0.1), 2), Weights())
        step.settle()
        model.boom.k += 0.1  # a forward changed without writing a tensor: the chain cannot see it
    step(toy(torch.full((2, 4), 1000.0), 2), Weights())  # exp overflows
    step.settle()
    assert tracer.traces == [] and tracer.unreproduced == [4]
    (table, row), = tracer.events(4)
    assert table == "tracer_unreproduced" and row["step"] == 4 and "step 1 re-run" in row["why"]


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every"):
        ReplayChain(every=0)


def test_the_tracer_reads_the_probes_gradient_norms_as_its_screen(monkeypatch):
    """With the probe attached first the step pays one reduction for the non-finite screens (the parameters'),
    not two: the tracer's gradient screen is the probe's norms."""
    from workbench.instrument import GradNormProbe
    from workbench.train import host

    calls = []
    original = host.nonfinite_flags
    monkeypatch.setattr(host, "nonfinite_flags", lambda tensors: calls.append(len(tensors)) or original(tensors))
    for with_probe in (False, True):
        model = dropout_model()
        step = make_step(model)
        if with_probe:
            GradNormProbe(model).attach(step)
        NonFiniteTracer(capture_every=4).attach(step)
        calls.clear()
        step(batch(1), Weights())
        step.settle()
        assert calls == ([4] if with_probe else [4, 4]), calls  # 4 parameters, each with a gradient
