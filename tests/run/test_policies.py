"""Unfreezing policies: requires_grad, loss weights and optimizer groups at every joint step."""

import pytest
import torch

from workbench.losses import LossWeights
from workbench.model import HybridModel, get_config
from workbench.train import StepConfig, TrainStep, build_optimizer, get_semantics, seed_stages, set_trainable
from workbench.train.optim import component_groups, optimizer_params
from workbench.train.unfreeze import POLICIES, UnfreezePolicy

JOINT = seed_stages(1, 1)[1]
LR = 1e-4


def _setup(kind: str, n: int, rebuild: bool = True):
    model = HybridModel(get_config("tiny"))
    set_trainable(model, JOINT.trainable)
    policy = UnfreezePolicy(kind, n, rebuild=rebuild)
    policy.start(model)
    step = TrainStep(model, build_optimizer(component_groups(model), LR), StepConfig(), torch.device("cpu"))
    return model, policy, step


def _decoder_state(model, step):
    params = list(model.rnnt_decoder.parameters())
    held = {id(p) for p in optimizer_params(step.optimizer)}
    return (all(p.requires_grad for p in params), all(id(p) in held for p in params))


def _walk(kind, n, steps, rebuild=True):
    """(trainable, in optimizer, rnnt weight, rnnt computed, decoder lr) before each step's forward."""
    model, policy, step = _setup(kind, n, rebuild)
    trace = []
    for i in range(1, steps + 1):
        plan = policy.plan(i, JOINT.weights)
        policy.apply(plan, step, LR)
        trainable, held = _decoder_state(model, step)
        lr = [g["lr"] for g in step.optimizer.param_groups if g.get("name") == "rnnt_decoder"]
        trace.append((trainable, held, plan.weights.rnnt, plan.rnnt, lr[0] if lr else None))
    return trace


def test_none_trains_the_decoder_from_step_one():
    assert _walk("none", 3, 2) == [(True, True, 1.0, True, LR)] * 2


def test_freeze_params_keeps_rnnt_in_the_loss_then_rebuilds():
    trace = _walk("freeze_params", 2, 4)
    assert trace[:2] == [(False, False, 1.0, True, None)] * 2
    assert trace[2:] == [(True, True, 1.0, True, LR)] * 2


def test_freeze_params_without_rebuild_leaves_the_decoder_outside_the_optimizer():
    trace = _walk("freeze_params", 2, 3, rebuild=False)
    assert trace[2] == (True, False, 1.0, True, None)


def test_freeze_and_mute_drops_the_rnnt_term_while_frozen():
    trace = _walk("freeze_and_mute", 2, 3)
    assert trace[:2] == [(False, False, 0.0, False, None)] * 2
    assert trace[2] == (True, True, 1.0, True, LR)


def test_add_param_group_keeps_the_encoder_adam_state():
    model, policy, step = _setup("add_param_group", 1)
    encoder_param = next(model.encoder.parameters())
    step.optimizer.state[encoder_param]["marker"] = torch.tensor(1.0)
    old_optimizer = step.optimizer
    policy.apply(policy.plan(2, JOINT.weights), step, LR)
    assert step.optimizer is old_optimizer and "marker" in step.optimizer.state[encoder_param]
    assert [g.get("name") for g in step.optimizer.param_groups][-1] == "rnnt_decoder"
    assert _decoder_state(model, step) == (True, True)


def test_loss_ramp_weights():
    assert [t[2] for t in _walk("loss_ramp", 4, 6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_lr_warmup_ramps_only_the_decoder_group():
    model, policy, step = _setup("lr_warmup", 4)
    lrs = []
    for i in range(1, 6):
        policy.apply(policy.plan(i, JOINT.weights), step, LR)
        lrs.append({g["name"]: g["lr"] for g in step.optimizer.param_groups})
    assert [d["rnnt_decoder"] for d in lrs] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR, LR])
    assert all(d["encoder"] == LR for d in lrs)


@pytest.mark.parametrize("kind", POLICIES)
def test_length_zero_means_no_freeze(kind):
    trace = _walk(kind, 0, 1)
    assert trace[0][:2] == (True, True) and trace[0][2] == 1.0


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="unfreezing policy"):
        UnfreezePolicy("gradual", 3)
    with pytest.raises(ValueError, match="non-negative"):
        UnfreezePolicy("freeze_params", -1)


def test_frozen_decoder_still_passes_rnnt_gradient_to_the_encoder(tiny_batch):
    """freeze_params (the seed's code) vs freeze_and_mute (its stated intent), measured by attribution."""
    from workbench.instrument import LossAttribution, default_groups

    for kind, expect_rnnt in (("freeze_params", True), ("freeze_and_mute", False)):
        torch.manual_seed(0)
        model, policy, step = _setup(kind, 3)
        attribution = LossAttribution(default_groups(model))
        step.observers.append(attribution)
        attribution.request(1, "test")
        plan = policy.plan(1, JOINT.weights)
        step(tiny_batch, plan.weights, rnnt=plan.rnnt)
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
