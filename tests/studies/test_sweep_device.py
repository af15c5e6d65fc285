"""The sweep's `device`: "auto" resolves once, in the sweep, to CUDA where torch sees one (mocked here: no GPU on
the test machine), and the resolved device reaches every run and Ray's GPU request."""

from pathlib import Path

import pytest
import torch

from workbench.studies.sweep import Sweep, SweepGrid
from workbench.studies.sweep import runner

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
GRID = SweepGrid(freeze_steps=[0, 1], lr=(1e-3,), policy="freeze_params", precision="fp32", semantics="corrected",
                 clip=1.0, rnnt_normalization="seed_sqrt_tu", optimizer="adamw", steps=2, controls=False)


class _Stop(Exception):
    pass


def _devices_reaching_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda: bool,
                           **kwargs: str) -> tuple[Sweep, list[str]]:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(runner, "check_checkpoint", lambda path: None)   # no training needed to see the device
    checkpoint = tmp_path / "ctc.pt"
    checkpoint.write_bytes(b"not read")
    seen: list[str] = []

    def run_joint(*args: object, device: str, **rest: object) -> None:
        seen.append(device)
        raise _Stop("the device is all this test needs")

    monkeypatch.setattr(runner, "run_joint", run_joint)
    sweep = Sweep(tmp_path / "sw", checkpoint, SAMPLE, GRID, **kwargs)
    outcome = sweep.run(workers=1, progress=False)
    assert sorted(outcome.failed) == sorted(sweep.plan.runs)   # every run was started (and stopped by the mock)
    return sweep, seen


def test_auto_is_cuda_where_torch_sees_a_gpu(tmp_path, monkeypatch):
    sweep, seen = _devices_reaching_runs(tmp_path, monkeypatch, cuda=True)
    assert sweep.device == "cuda" and seen == ["cuda"] * len(sweep.plan.runs)
    assert sweep.resources["num_gpus"] == 1.0


def test_an_explicit_cuda_reaches_the_runs(tmp_path, monkeypatch):
    sweep, seen = _devices_reaching_runs(tmp_path, monkeypatch, cuda=True, device="cuda:0")
    assert seen == ["cuda:0"] * len(sweep.plan.runs)


@pytest.mark.parametrize("kwargs", [{}, {"device": "cpu"}])
def test_on_a_cpu_machine_runs_stay_on_the_cpu(tmp_path, monkeypatch, kwargs):
    sweep, seen = _devices_reaching_runs(tmp_path, monkeypatch, cuda=False, **kwargs)
    assert seen == ["cpu"] * len(sweep.plan.runs) and sweep.resources["num_gpus"] == 0.0
