"""The README's Python examples run as written, from a folder that has the repository's data_samples."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"the README should show one Python example with {containing!r}"
    return found[0]


def _run(code: str, folder: Path) -> subprocess.CompletedProcess:
    (folder / "data_samples").symlink_to(ROOT / "data_samples")
    script = folder / "example.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bring_your_own_model_example_runs(tmp_path):
    proc = _run(_example("from workbench.run.byo import instrument"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "'steps': 20" in proc.stdout and (tmp_path / "runs" / "byo_mlp.h5").is_file()


@pytest.mark.slow
def test_a_new_policy_in_one_class_example_runs(tmp_path):
    proc = _run(_example("class HalfRnntWhileFrozen(UnfreezePolicy"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[(1, 'stage'), (4, 'unfreeze')]"
