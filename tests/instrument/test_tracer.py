"""Non-finite tracer and replay bundles on small hand-built modules.

Every non-finite value here comes from the modules' own arithmetic on finite inputs: exp of a large activation,
log of a zero made by ReLU, float16 sums past 65504, a division by a zero made by sqrt, a float32 norm or SGD
update past 3.4e38.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.instrument.replay import ReplayBundle, capture, load_bundle, replica, save_bundle
from workbench.instrument.tracer import NonFiniteTracer, Verdict, localize
from workbench.train.step import SEMANTICS, StepConfig, TrainStep

CPU = torch.device("cpu")


@dataclass
class Toy:
    """x (B, F) inputs, y (B, O) targets."""

    x: torch.Tensor
    y: torch.Tensor

    def to(self, device: torch.device | str) -> Toy:
        return Toy(self.x.to(device), self.y.to(device))


@dataclass
class Weights:
    scale: float = 1.0


def mse(model: nn.Module, batch: Toy, weights: Weights, *, rnnt: bool, mode: bool,
        normalization: str) -> dict[str, torch.Tensor]:
    out = model(batch.x)
    return {"total": weights.scale * ((out.float() - batch.y) ** 2).mean()}


def mean_out(model: nn.Module, batch: Toy, weights: Weights, *, rnnt: bool, mode: bool,
             normalization: str) -> dict[str, torch.Tensor]:
    """Mean of the outputs: dL/dout = 1 / out.numel() everywhere."""
    return {"total": weights.scale * model(batch.x).float().mean()}


class Exp(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, F)."""
        return torch.exp(x * self.k)


class LogRelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, F); -inf wherever x <= 0."""
        return torch.log(torch.relu(x))


class RowNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, 1) Euclidean norms written as sqrt(sum x^2): d sqrt/du is infinite at u = 0."""
        return torch.sqrt((x ** 2).sum(-1, keepdim=True))


def linear(n_in: int, n_out: int, value: float | None = None, *, bias: bool = True) -> nn.Linear:
    """A Linear with every weight = value (identity when value is None and the shapes agree), bias 0."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n_out, n_in) if value is None else torch.full((n_out, n_in), value))
        if bias:
            layer.bias.zero_()
    return layer


def chain(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def make_step(model: nn.Module, *, loss_fn=mse, precision: str = "fp32", lr: float = 1e-2,
              clip: float | None = 1.0, optimizer: str = "sgd", semantics: str = "corrected") -> TrainStep:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    config = StepConfig(precision=precision, clip=clip, semantics=SEMANTICS[semantics])
    return TrainStep(model, opt, config, CPU, loss_fn=loss_fn)


def trace(step: TrainStep, batch: Toy) -> Verdict | None:
    """Localize the step `step` would run next on `batch`."""
    return localize(step, capture(step, batch, Weights(), index=step.step_index + 1))


def toy(x: torch.Tensor, n_out: int) -> Toy:
    return Toy(x, torch.zeros(x.shape[0], n_out))


def test_forward_producer_is_exp_not_downstream_modules():
    model = chain(enc=linear(4, 4), boom=Exp(50.0), head=linear(4, 2, 0.5))
    v = trace(make_step(model), toy(torch.tensor([[3.0, -1.0, 2.0, -2.0], [1.0, 1.0, -1.0, 0.5]]), 2))
    assert v is not None
    assert (v.phase, v.module, v.role, v.op) == ("forward", "boom", "producer", "aten.exp.default")
    assert (v.tensor, v.dtype, v.nan, v.inf, v.numel) == ("output", "float32", 0, 2, 8)
    assert v.input_absmax == pytest.approx(150.0)  # exp(150) and exp(100) overflow float32; exp(50) does not
    assert "\n" not in v.line() and v.line().startswith("step 1 forward: producer boom output via aten.exp")


def test_forward_log_of_relu_zero_is_minus_inf_producer():
    model = chain(enc=linear(4, 4), act=LogRelu(), head=linear(4, 2, 0.5))
    v = trace(make_step(model), toy(torch.tensor([[-1.0, 2.0, 3.0, -4.0]]), 2))
    assert v is not None
    assert (v.phase, v.module, v.role, v.op, v.inf, v.numel) == ("forward", "act", "producer",
                                                                 "aten.log.default", 2, 4)


def test_forward_float16_linear_overflow_under_autocast():
    model = chain(big=linear(64, 2, 20.0), head=linear(2, 2, 0.5))
    step = make_step(model, precision="fp16")
    v = trace(step, toy(torch.full((3, 64), 100.0), 2))  # 64 * 100 * 20 = 128000 > 65504
    assert v is not None
    assert (v.phase, v.module, v.role, v.dtype) == ("forward", "big", "producer", "float16")
    assert v.op == "aten.addmm.default" and v.inf == 6
    assert v.input_absmax == pytest.approx(100.0)


def test_backward_float16_weight_gradient_overflow_names_parameter_and_gemm():
    # The GradScaler's 65536 times dL/dy = 1/1024 gives 64 per output; the fp16 weight-gradient GEMM sums
    # 256 rows of 64 * 8 = 512: 131072 > 65504, while the forward (32 per output) and bias grad stay finite.
    model = chain(joint=linear(8, 4, 0.5))
    step = make_step(model, loss_fn=mean_out, precision="fp16")
    v = trace(step, toy(torch.full((256, 8), 8.0), 4))
    assert v is not None
    assert (v.phase, v.role, v.module, v.tensor, v.param) == ("backward", "producer", "joint", "grad of weight",
                                                             "joint.weight")
    assert (v.op, v.dtype, v.inf, v.numel) == ("aten.mm.default", "float16", 32, 32)
    assert v.input_absmax == pytest.approx(64.0)
    assert v.line() == ("step 1 backward: producer joint grad of weight via aten.mm.default (float16): "
                        "32 inf / 32, input max|x| over finite entries 6.4e+01")


def test_backward_sqrt_at_zero_blames_sqrt_module_and_names_first_bad_gradient():
    model = chain(enc=linear(3, 3, bias=False), norm=RowNorm())
    step = make_step(model, loss_fn=mean_out)
    v = trace(step, toy(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), 1))
    assert v is not None
    assert (v.phase, v.role, v.module, v.tensor) == ("backward", "producer", "norm", "grad_input (SqrtBackward0)")
    assert v.op == "aten.div.Tensor" and v.inf == 1
    assert v.param == "enc.weight" and v.line().endswith("; first non-finite parameter: enc.weight")


def test_clip_phase_grad_norm_overflow():
    # Finite gradients of 1e20: their squares overflow float32 in the clip's norm.
    model = chain(lin=linear(4, 1, 1.0, bias=False))
    step = make_step(model, loss_fn=mean_out)
    v = trace(step, toy(torch.full((1, 4), 1e20), 1))
    assert v is not None
    assert (v.phase, v.role, v.module, v.param) == ("clip", "producer", "lin", "lin.weight")
    assert v.op == "aten._foreach_norm.Scalar" and v.tensor == "output for grad of weight"
    assert (v.inf, v.numel) == (1, 1)


def test_update_phase_sgd_step_past_float32_max():
    # SGD's lr * grad = 1e38 * 10 overflows float32: the update makes the weights -inf.
    model = chain(lin=linear(2, 1, 1.0, bias=False))
    step = make_step(model, loss_fn=mean_out, lr=1e38, clip=None)
    v = trace(step, toy(torch.full((1, 2), 10.0), 1))
    assert v is not None
    assert (v.phase, v.role, v.module, v.tensor, v.param) == ("update", "producer", "lin", "param weight",
                                                             "lin.weight")
    assert v.op == "aten.add_.Tensor" and (v.inf, v.numel) == (2, 2)


class CTCNet(nn.Module):
    """Frame classifier whose loss uses CTC and a masked attention pool: both hold -inf by design."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, 3) -> (B, T, 5) logits."""
        return self.proj(self.drop(x))


def ctc_and_pool(model: nn.Module, batch: Toy, weights: Weights, *, rnnt: bool, mode: bool,
                 normalization: str) -> dict[str, torch.Tensor]:
    """CTC + a masked attention pool + mean(exp(scale * logits)), which overflows for a large scale."""
    logits = model(batch.x)
    b, t, _ = logits.shape
    # Utterance 1 needs 5 frames for its 5 labels but has 4: an infeasible CTC path (zero_infinity zeroes it).
    targets = torch.tensor([[1, 2, 0, 0, 0], [1, 2, 3, 4, 1]])
    ctc = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, torch.tensor([t, 4]),
                     torch.tensor([2, 5]), zero_infinity=True)
    valid = torch.arange(t)[None, :] < torch.tensor([t, 4])[:, None]
    scores = logits.sum(-1).masked_fill(~valid, float("-inf")).softmax(-1)
    pooled = (scores[..., None] * logits).sum(1)
    return {"total": ctc + (pooled ** 2).mean() + torch.exp(weights.scale * logits).mean()}


def test_healthy_step_gives_none_and_leaves_live_run_untouched():
    model = CTCNet()
    step = make_step(model, loss_fn=ctc_and_pool, optimizer="adam")
    batch = Toy(torch.randn(2, 6, 3), torch.zeros(2))
    step(batch, Weights())  # Adam now holds state
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = [s.clone() for st in step.optimizer.state.values() for s in st.values()]
    rng, index, observers = torch.get_rng_state(), step.step_index, list(step.observers)

    assert trace(step, batch) is None

    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())
    after_opt = [s for st in step.optimizer.state.values() for s in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(before_opt, after_opt))
    assert torch.equal(torch.get_rng_state(), rng)
    assert step.step_index == index and step.observers == observers
    assert all(p.grad is not None for p in model.parameters())


def test_deliberate_minus_inf_is_not_blamed():
    # CTC's log-alpha table, its zero_infinity inf and the -inf mask all come first; exp(1e4 * logits) is blamed.
    step = make_step(CTCNet(), loss_fn=ctc_and_pool)
    bundle = capture(step, Toy(torch.randn(2, 6, 3), torch.zeros(2)), Weights(1e4), index=1)
    v = localize(step, bundle)
    assert v is not None
    assert (v.phase, v.module, v.role, v.op) == ("forward", "<loss_fn>", "producer", "aten.exp.default")


class Surge(Exp):
    """exp(x * k) whose gain falls back to 0.1 once it ran: state in a Python attribute, which no bundle holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, F)."""
        out = super().forward(x)
        self.k = 0.1
        return out


def test_a_step_whose_replay_stays_finite_is_logged_untraced_with_why():
    model = chain(enc=linear(4, 4), boom=Surge(100.0), head=linear(4, 2, 0.5))
    step = make_step(model)
    tracer = NonFiniteTracer()
    tracer.attach(step)
    step(toy(torch.full((2, 4), 10.0), 2), Weights())  # exp(1000) overflows live; the replay runs at gain 0.1
    step.settle()
    assert tracer.traces == [] and tracer.unreproduced == [1]
    (table, row), = tracer.events(1)
    assert table == "tracer_unreproduced" and row["step"] == 1 and "stayed finite" in row["why"]


def test_tracer_records_exactly_one_verdict_and_saves_its_bundle(tmp_path):
    model = chain(enc=linear(4, 4), boom=Exp(10.0), head=linear(4, 2, 0.5))
    step = make_step(model)
    tracer = NonFiniteTracer(max_traces=1, save_dir=str(tmp_path))
    tracer.attach(step)
    tracer.attach(step)
    assert step.observers == [tracer]
    good, bad = toy(torch.full((2, 4), 0.1), 2), toy(torch.full((2, 4), 20.0), 2)
    events = []
    for batch in (good, bad, bad):
        step(batch, Weights())
        step.settle()  # the parameters' check of a skip_step run ends its step at the next read, or here
        events += tracer.events(step.step_index)

    assert len(tracer.verdicts) == 1 and tracer.unreproduced == []
    assert events == [("tracer", {**tracer.traces[0].to_dict(), "line": tracer.verdicts[0].line()})]
    assert tracer.traces[0].skipped and not tracer.traces[0].escaped  # caught: the chain is complete
    v = tracer.verdicts[0]
    assert (v.step, v.phase, v.module, v.role) == (2, "forward", "boom", "producer")
    assert "\n" not in v.line() and v.to_dict()["module"] == "boom"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2.pt"]
    assert tracer.bundle is None  # no more captures once the replays are used up
    tracer.detach(step)
    assert step.observers == []


def test_tracer_requires_attach():
    model = chain(lin=linear(2, 2))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), StepConfig(), CPU, loss_fn=mse,
                     observers=[NonFiniteTracer()])
    with pytest.raises(RuntimeError, match="attach"):
        step(toy(torch.ones(1, 2), 2), Weights())


def test_bundle_round_trip_replays_to_the_same_verdict(tmp_path):
    model = chain(enc=linear(3, 3, bias=False), drop=nn.Dropout(0.3), norm=RowNorm())
    step = make_step(model, loss_fn=mean_out, optimizer="adam")
    step(toy(torch.ones(2, 3), 1), Weights())
    bundle = capture(step, toy(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), 1), Weights(2.0),
                     index=step.step_index + 1)
    save_bundle(tmp_path / "b.pt", bundle)
    loaded = load_bundle(tmp_path / "b.pt")

    assert isinstance(loaded, ReplayBundle) and isinstance(loaded.batches[0], Toy)
    assert loaded.weights == Weights(2.0) and loaded.step == 2
    assert all(torch.equal(loaded.model_state[k], v) for k, v in bundle.model_state.items())
    assert torch.equal(loaded.batches[0].x, bundle.batches[0].x) and torch.equal(loaded.cpu_rng, bundle.cpu_rng)
    first, again = localize(step, bundle), localize(step, loaded)
    assert first is not None and first.phase == "backward"
    assert first.to_dict() == again.to_dict()


def test_replica_restores_surviving_gradients_and_is_independent():
    # Seed-faithful zero_grad only clears the optimizer's parameters: `out`'s gradient survives the step.
    model = chain(enc=linear(2, 2), out=linear(2, 1, 0.5))
    opt = torch.optim.SGD(model.enc.parameters(), lr=0.1)
    step = TrainStep(model, opt, StepConfig(semantics=SEMANTICS["seed_faithful"]), CPU, loss_fn=mean_out)
    step(toy(torch.ones(3, 2), 1), Weights())
    bundle = capture(step, toy(torch.ones(3, 2), 1), Weights(), index=2)
    assert sorted(bundle.grads) == ["out.bias", "out.weight"]

    rep = replica(step, bundle)
    assert rep.observers == [] and rep.model is not model
    assert torch.equal(rep.model.out.weight.grad, model.out.weight.grad)
    assert rep.model.enc.weight.grad is None
    assert {id(p) for g in rep.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in rep.model.enc.parameters()}
    with torch.no_grad():
        rep.model.enc.weight.add_(1.0)
    assert not torch.equal(rep.model.enc.weight, model.enc.weight)


def test_seed_faithful_stale_optimizer_overflow_then_stale_nan_gradient():
    # modessm.md 7 A: `head` is trainable but outside the optimizer. Its fp16 weight-gradient GEMM overflows
    # (256 rows of 64 * 8); the seed's clip over all parameters turns that inf into NaN, which is never zeroed,
    # so step 2 starts from a NaN gradient and its clip spreads NaN past the GradScaler's check into `enc`.
    model = chain(enc=linear(8, 8, 2.0), head=linear(8, 4, 0.5))
    opt = torch.optim.SGD(model.enc.parameters(), lr=1e-3)
    step = TrainStep(model, opt, StepConfig(precision="fp16", semantics=SEMANTICS["seed_faithful"]), CPU,
                     loss_fn=mean_out)
    tracer = NonFiniteTracer(max_traces=2)
    tracer.attach(step)
    batch = toy(torch.full((256, 8), 0.5), 4)
    step(batch, Weights())
    step(batch, Weights())

    first, second = tracer.verdicts
    assert (first.step, first.phase, first.role, first.module, first.tensor, first.op, first.dtype) == (
        1, "backward", "producer", "head", "grad of weight", "aten.mm.default", "float16")
    assert (second.step, second.role, second.module, second.tensor, second.param, second.op) == (
        2, "propagator", "head", "grad of weight", "head.weight", "")
    assert second.nan == second.numel == 32
    assert not torch.isfinite(model.enc.weight).any()
