"""The README's Lightning example runs as written, and so do its `workbench trace` and TensorBoard `export` commands
on what the examples wrote (run from a scratch folder, as a user would)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _example(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"the README should show one Python example with {containing!r}"
    return found[0]


def _command(containing: str) -> list[str]:
    lines = [line.split("  #")[0] for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
             for line in block.splitlines() if containing in line]
    assert len(lines) == 1, f"the README should show one command with {containing!r}"
    words = shlex.split(lines[0])
    assert words[0] == ".venv/bin/python"
    return [sys.executable, *words[1:]]


def _python(code: str, folder: Path) -> subprocess.CompletedProcess:
    script = folder / f"example_{abs(hash(code))}.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_lightning_example_and_its_commands_run(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    proc = _python(_example("from workbench.run.lightning import StepUnfreeze, WorkbenchCallback"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "healthy"
    assert "workbench: step 11: unfroze head after 10 steps (rebuild)" in proc.stdout
    assert (tmp_path / "runs" / "lightning_mlp.h5").is_file()

    trace = subprocess.run(_command("workbench trace runs/lightning_mlp.h5"), cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert trace.returncode == 0, trace.stderr
    assert "status finished, 60 steps" in trace.stdout and "outcome: healthy" in trace.stdout

    proc = _python(_example("from workbench.run.byo import instrument"), tmp_path)  # the other run to export
    assert proc.returncode == 0, proc.stderr
    export = subprocess.run(_command("workbench export"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "tb").iterdir()) == ["byo_mlp", "lightning_mlp"]
