"""Staged training: determinism, exact component freezing, stale-optimizer semantics, checkpoints, resume."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import cli_fork  # tests/cli_fork.py: `python -m workbench` without its imports each time

from workbench.data import B2TDataset, collate
from workbench.model.losses import LossWeights
from workbench.model import HybridModel, get_config
from workbench.run.settings import TrainSettings
from workbench.run.staged import run_training
from workbench.train import (
    StepConfig, TrainStep, build_optimizer, load_checkpoint, model_from_checkpoint, seed_stages, set_trainable,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data_samples"


def _cfg(tmp_path, **kw):
    base = dict(preset="tiny", data=str(DATA), out=str(tmp_path), seed=3, ctc_steps=6, joint_steps=4,
                ctc_lr=3e-3, joint_lr=1e-4, device="cpu")
    base.update(kw)
    return TrainSettings(**base)


def _losses(summary):
    return [[step for step in st["losses"]] for st in summary["stages"]]


def test_same_seed_gives_bitwise_identical_losses(tmp_path):
    a = run_training(_cfg(tmp_path / "a"), log=lambda s: None)
    b = run_training(_cfg(tmp_path / "b"), log=lambda s: None)
    assert _losses(a) == _losses(b)
    c = run_training(_cfg(tmp_path / "c", seed=4), log=lambda s: None)
    assert _losses(a) != _losses(c)


def test_joint_stage_resumed_from_checkpoint_equals_full_run(tmp_path):
    full = run_training(_cfg(tmp_path / "full"), log=lambda s: None)
    resumed = run_training(_cfg(tmp_path / "resumed", resume_from=str(tmp_path / "full" / "ctc_warmup.pt")),
                           log=lambda s: None)
    assert [s["name"] for s in resumed["stages"]] == ["joint"]
    assert resumed["stages"][0]["losses"] == full["stages"][1]["losses"]


def test_set_trainable_matches_components_exactly():
    model = HybridModel(get_config("tiny"))
    names = set_trainable(model, ("preprocessor", "encoder", "ctc_head"))
    assert names and all(n.split(".")[0] in ("preprocessor", "encoder", "ctc_head") for n in names)
    # the seed's substring match made rnnt_decoder...encoder_proj trainable here
    assert not any("encoder_proj" in n for n in names)
    with pytest.raises(ValueError, match="unknown component"):
        set_trainable(model, ("decoder",))


def test_seed_stages_weights():
    stages = seed_stages(5, 5, 5)
    assert [s.name for s in stages] == ["ctc_warmup", "joint", "mode"]
    assert (stages[1].weights.ctc, stages[1].weights.rnnt) == (0.3, 1.0)
    assert stages[2].weights.mode == 0.1
    assert [s.name for s in seed_stages(5, 0)] == ["ctc_warmup"]


def test_seed_faithful_keeps_the_stale_optimizer(tmp_path):
    lines = []
    run_training(_cfg(tmp_path, semantics="seed_faithful", joint_steps=1), log=lines.append)
    kept = [ln for ln in lines if ln.startswith("Kept the optimizer")]
    assert len(kept) == 1
    n_decoder = sum(1 for n, _ in HybridModel(get_config("tiny")).named_parameters() if n.startswith("rnnt_decoder"))
    # the seed's substring match put rnnt_decoder.joint.encoder_proj (weight, bias) in the CTC stage's optimizer
    assert f"{n_decoder - 2} of" in kept[0]


def test_checkpoint_round_trip(tmp_path):
    run_training(_cfg(tmp_path, joint_steps=0), log=lambda s: None)
    state = load_checkpoint(tmp_path / "ctc_warmup.pt")
    assert state["stage"] == "ctc_warmup" and state["seed"] == 3
    model, _ = model_from_checkpoint(tmp_path / "ctc_warmup.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_step_runs_at_every_precision(precision):
    torch.manual_seed(0)
    model = HybridModel(get_config("tiny"))
    ds = B2TDataset(DATA, "train")
    batch = collate([ds[i] for i in range(2)])
    opt = build_optimizer(model.parameters(), 1e-4)
    step = TrainStep(model, opt, StepConfig(precision=precision), torch.device("cpu"))
    result = step(batch, LossWeights(ctc=0.3, rnnt=1.0, mode=0.0))
    assert set(result.losses) >= {"ctc", "rnnt", "total"}
    assert (result.scale is not None) == (precision == "fp16")
    assert result.grad_norm is not None


@pytest.mark.slow
def test_cli_train_writes_summary(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        cli_fork.command("train", "--preset", "tiny", "--data", str(DATA), "--out", str(out),
                         "--ctc-steps", "3", "--joint-steps", "2", "--device", "cpu"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Batch 1/3 (33%) | Loss" in proc.stdout
    assert "Created optimizer for" in proc.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["ctc_warmup", "joint"]
    assert (out / "joint.pt").is_file()


@pytest.mark.slow
def test_cli_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(cli_fork.command("train", "--ctc-lr", "-1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "positive" in proc.stderr


def test_mode_stage_trains_the_mode_head_on_synthetic_mode_labels(tmp_path):
    summary = run_training(_cfg(tmp_path, ctc_steps=2, joint_steps=1, mode_steps=2, mode_lr=1e-3),
                           log=lambda s: None)
    mode_stage = summary["stages"][-1]
    assert mode_stage["name"] == "mode"
    assert all("mode" in step for step in mode_stage["losses"])
