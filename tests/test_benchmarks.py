"""The benchmark and device-check scripts still run: each at its smallest size on the CPU (the figures they print
are measured by running them at full size, not here)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.records import OUTCOMES

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_instrumentation_benchmark_prints_its_ratio():
    out = _script("bench_instrumentation.py", "--preset", "tiny", "--rounds", "1", "--steps", "1")
    assert re.search(r"grad-norm instrumentation overhead ratio: \d+\.\d{3}$", out.strip())
    assert "data data_samples" in out


@pytest.mark.slow
def test_tracer_benchmark_prints_its_ratio():
    out = _script("bench_tracer.py", "--preset", "tiny", "--rounds", "1", "--warmup", "0")
    assert re.search(r"tracer replay ratio: \d+\.\d{2}$", out.strip())
    assert "finding: step 1 backward: producer" in out


@pytest.mark.slow
def test_device_check_reports_both_loops_on_cpu(tmp_path):
    out = _script("check_cuda.py", "--device", "cpu", "--presets", "tiny", "--steps", "4", "--ctc-steps", "5",
                  "--rounds", "1", "--timing-steps", "1", "--cache", str(tmp_path))
    assert re.search(r"overhead ratio \d+\.\d{3}", out)
    seed = next(line for line in out.splitlines() if line.strip().startswith("seed_faithful:"))
    corrected = next(line for line in out.splitlines() if line.strip().startswith("corrected:"))
    assert seed.split()[1] in OUTCOMES and corrected.split()[1] in OUTCOMES
    assert "chain: step" in out


@pytest.mark.slow
def test_lightning_benchmark_times_every_callbacks_batch_hooks():
    """Its step window opens before and closes after every other callback's batch hooks (the tracer's capture
    runs in `on_train_batch_start`), and the script prints its ratio."""
    pytest.importorskip("lightning")
    import time

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_lightning
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from workbench.data import B2TDataset, collate
    from workbench.model import HybridModel, get_config

    class Slow(pl.Callback):
        def on_train_batch_start(self, *args):
            time.sleep(0.05)

        def on_train_batch_end(self, *args):
            time.sleep(0.05)

    dataset = B2TDataset(ROOT / "data_samples", "train")
    loader = DataLoader([dataset[i] for i in range(8)], batch_size=2, collate_fn=collate)
    assert min(bench_lightning.fit(HybridModel(get_config("tiny")), loader, 3, [Slow()])) >= 0.1
    out = _script("bench_lightning.py", "--preset", "tiny", "--rounds", "1", "--steps", "3")
    assert re.search(r"lightning callback overhead ratio: \d+\.\d{3} \(traced \d+\.\d{3}\)$", out.strip())
