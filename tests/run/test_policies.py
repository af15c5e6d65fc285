"""Unfreezing policies, as the run engine applies them: requires_grad, loss weights and optimizer groups at every
joint step, and adding a policy in one class."""

import dataclasses

import pytest
import torch

from workbench.instrument import LossAttribution, StepObserver, default_groups
from workbench.model import HybridModel, get_config
from workbench.model.losses import LossWeights
from workbench.run.engine import RunEngine
from workbench.train import (
    StepConfig, TrainStep, UnfreezePolicy, build_optimizer, get_semantics, make_policy, seed_stages, set_trainable,
)
from workbench.train.optim import component_groups, optimizer_params
from workbench.train.policies import POLICIES, StepPlan

LR = 1e-4
JOINT = dataclasses.replace(seed_stages(1, 1, joint_lr=LR)[1])


class BeforeForward(StepObserver):
    """Records, at each step's start, (trainable, in optimizer, rnnt weight, rnnt computed, decoder lr)."""

    def __init__(self):
        self.trace = []

    def on_step_start(self, ctx):
        params = list(ctx.model.rnnt_decoder.parameters())
        held = {id(p) for p in optimizer_params(ctx.optimizer)}
        lr = [g["lr"] for g in ctx.optimizer.param_groups if g.get("name") == "rnnt_decoder"]
        self.trace.append((all(p.requires_grad for p in params), all(id(p) in held for p in params),
                           ctx.weights.rnnt, ctx.rnnt, lr[0] if lr else None))


def _engine(kind: str, n: int, rebuild: bool = True, *, observers=()):
    torch.manual_seed(0)
    model = HybridModel(get_config("tiny"))
    step = TrainStep(model, build_optimizer(model.parameters(), LR), StepConfig(), torch.device("cpu"))
    engine = RunEngine(step, instruments=list(observers))
    engine.enter_stage(JOINT, seed=0, rebuild=True, policy=make_policy(kind, n, rebuild_at_unfreeze=rebuild))
    return engine


def _walk(kind, n, steps, batch, rebuild=True):
    probe = BeforeForward()
    engine = _engine(kind, n, rebuild, observers=[probe])
    for _ in range(steps):
        engine.step(batch)
    return probe.trace


def test_none_trains_the_decoder_from_step_one(tiny_batch):
    assert _walk("none", 3, 2, tiny_batch) == [(True, True, 1.0, True, LR)] * 2


def test_freeze_params_keeps_rnnt_in_the_loss_then_rebuilds(tiny_batch):
    trace = _walk("freeze_params", 2, 4, tiny_batch)
    assert trace[:2] == [(False, False, 1.0, True, None)] * 2
    assert trace[2:] == [(True, True, 1.0, True, LR)] * 2


def test_freeze_params_without_rebuild_leaves_the_decoder_outside_the_optimizer(tiny_batch):
    trace = _walk("freeze_params", 2, 3, tiny_batch, rebuild=False)
    assert trace[2] == (True, False, 1.0, True, None)


def test_freeze_and_mute_drops_the_rnnt_term_while_frozen(tiny_batch):
    trace = _walk("freeze_and_mute", 2, 3, tiny_batch)
    assert trace[:2] == [(False, False, 0.0, False, None)] * 2
    assert trace[2] == (True, True, 1.0, True, LR)


def test_add_param_group_keeps_the_encoder_adam_state(tiny_batch):
    engine = _engine("add_param_group", 1)
    engine.step(tiny_batch)
    optimizer = engine.train_step.optimizer
    encoder_param = next(engine.model.encoder.parameters())
    state = {k: v.clone() for k, v in optimizer.state[encoder_param].items()}
    engine.step(tiny_batch)
    assert engine.train_step.optimizer is optimizer and optimizer.state[encoder_param]["step"] == state["step"] + 1
    assert [g.get("name") for g in optimizer.param_groups][-1] == "rnnt_decoder"
    assert all(p.requires_grad for p in engine.model.rnnt_decoder.parameters())


def test_a_rebuild_keeps_the_optimizer_kind_and_settings(tiny_batch):
    torch.manual_seed(0)
    model = HybridModel(get_config("tiny"))
    set_trainable(model, seed_stages(1, 0)[0].trainable)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.7)
    engine = RunEngine(TrainStep(model, sgd, StepConfig(), torch.device("cpu")))
    engine.enter_stage(JOINT, seed=0, rebuild=False, policy=make_policy("freeze_params", 1))
    engine.step(tiny_batch)
    engine.step(tiny_batch)
    rebuilt = engine.train_step.optimizer
    assert rebuilt is not sgd and type(rebuilt) is torch.optim.SGD and rebuilt.defaults["momentum"] == 0.7


def test_loss_ramp_weights(tiny_batch):
    assert [t[2] for t in _walk("loss_ramp", 4, 6, tiny_batch)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_lr_warmup_ramps_only_the_decoder_group(tiny_batch):
    trace = _walk("lr_warmup", 4, 5, tiny_batch)
    assert [t[4] for t in trace] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR, LR])


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_length_zero_means_no_freeze(kind, tiny_batch):
    trace = _walk(kind, 0, 1, tiny_batch)
    assert trace[0][:2] == (True, True) and trace[0][2] == 1.0


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="unfreezing policy"):
        make_policy("gradual", 3)
    with pytest.raises(ValueError, match="non-negative"):
        make_policy("freeze_params", -1)
    with pytest.raises(ValueError, match="already registered"):
        class Clash(UnfreezePolicy, name="freeze_params"):
            pass


def test_a_new_policy_is_one_registered_class(tiny_batch):
    class HalfRnnt(UnfreezePolicy, name="half_rnnt_test", freezes=True):
        """Frozen for N steps with half the RNN-T weight, then unfrozen into a rebuilt optimizer."""

        def plan(self, i: int, weights: LossWeights) -> StepPlan:
            plan = super().plan(i, weights)
            return dataclasses.replace(plan, weights=dataclasses.replace(weights, rnnt=weights.rnnt / 2))

    try:
        trace = _walk("half_rnnt_test", 1, 2, tiny_batch)
        assert trace == [(False, False, 0.5, True, None), (True, True, 0.5, True, LR)]
    finally:
        del POLICIES["half_rnnt_test"]


def test_frozen_decoder_still_passes_rnnt_gradient_to_the_encoder(tiny_batch):
    """freeze_params (the seed's code) vs freeze_and_mute (its stated intent), measured by attribution."""
    for kind, expect_rnnt in (("freeze_params", True), ("freeze_and_mute", False)):
        model = HybridModel(get_config("tiny"))
        attribution = LossAttribution(default_groups(model), after_change=1)
        step = TrainStep(model, build_optimizer(model.parameters(), LR), StepConfig(), torch.device("cpu"))
        engine = RunEngine(step, instruments=[attribution])
        engine.enter_stage(JOINT, seed=0, rebuild=True, policy=make_policy(kind, 3))
        engine.step(tiny_batch)
        result = attribution.results[0]
        assert result.norms["ctc"]["encoder"] > 0
        assert (result.norms.get("rnnt", {}).get("encoder", 0.0) > 0) == expect_rnnt
        assert result.norms.get("rnnt", {}).get("rnnt_decoder.joint", 0.0) == 0.0


def test_seed_faithful_semantics_clip_all_model_parameters(tiny_batch):
    model = HybridModel(get_config("tiny"))
    set_trainable(model, JOINT.trainable)
    ctc_only = [g for g in component_groups(model) if g["name"] != "rnnt_decoder"]
    step = TrainStep(model, build_optimizer(ctc_only, LR), StepConfig(semantics=get_semantics("seed_faithful")),
                     torch.device("cpu"))
    step(tiny_batch, LossWeights(ctc=0.3, rnnt=1.0, mode=0.0))
    assert any(p.grad is not None for p in model.rnnt_decoder.parameters())
    assert len(step.clip_params()) > len(optimizer_params(step.optimizer))
