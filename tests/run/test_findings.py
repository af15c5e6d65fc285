"""The findings the notebooks report, guarded on the reference model at the tiny preset: the seed's loop diverges
through a guard it bypasses, the rebuilt optimizer trains, and a decoder left outside the optimizer is not healthy
even where nothing goes non-finite."""

from pathlib import Path

import pytest

from workbench.records import classify, summarize
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
STEPS = 20


@pytest.fixture(scope="module")
def runs(ctc_checkpoint):
    settings = {
        "seed": RunSettings(name="seed", steps=STEPS, lr=1e-3),
        "rebuilt": RunSettings(name="rebuilt", steps=STEPS, lr=1e-3, rebuild_at_stage_change=True),
        "outside_fp32": RunSettings(name="outside_fp32", steps=STEPS, lr=1e-3, precision="fp32"),
    }
    return {name: run_joint(ctc_checkpoint, SAMPLE, s) for name, s in settings.items()}


def test_the_seed_loop_diverges_through_an_escape(runs):
    s = summarize(runs["seed"])
    kinds = [link["kind"] for link in s["causal_chain"]]
    assert s["outcome"] == "diverged"
    assert kinds[0] == "producer" and "escape" in kinds and "contamination" in kinds and kinds[-1] == "loss"
    escape = next(k for k in s["causal_chain"] if k["kind"] == "escape")
    assert escape["step"] <= next(k["step"] for k in s["causal_chain"] if k["kind"] == "contamination")
    assert s["tracer_verdict"].startswith("step") and "escape" in s["tracer_verdict"]


def test_the_rebuilt_optimizer_trains(runs):
    s = summarize(runs["rebuilt"])
    assert s["outcome"] == "healthy", s["outcome_reasons"]
    assert all(link["kind"] in ("producer", "caught") for link in s["causal_chain"])


def test_a_decoder_outside_the_optimizer_is_not_healthy_even_when_finite(runs):
    outcome = classify(runs["outside_fp32"])
    assert runs["outside_fp32"].first_nonfinite_step() is None
    assert outcome.kind == "stalled"
    assert any(r.startswith("rnnt_decoder.") and "outside the optimizer" in r for r in outcome.reasons)
