"""examples/seed_trainer.py as the README runs it: the seed's stale optimizer is found at the joint stage's first
step, and the rebuilt optimizer gives no finding and trains."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_example():
    spec = importlib.util.spec_from_file_location("seed_trainer", ROOT / "examples" / "seed_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_seed_trainer_under_watch(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    example = load_example()
    bug = example.main(["--preset", "tiny", "--summary", str(tmp_path / "bug.json"),
                        "--log-path", str(tmp_path / "bug.h5")])
    assert [(f["kind"], f["step"]) for f in bug["findings"]] == [("outside_optimizer", 21)]  # joint step 1
    assert all(t.startswith("rnnt_decoder.") for t in bug["findings"][0]["tensors"])
    assert bug["outcome"] == "stalled"
    assert json.loads((tmp_path / "bug.json").read_text())["outcome"] == "stalled"
    fixed = example.main(["--preset", "tiny", "--fixed"])
    assert fixed["findings"] == [] and fixed["outcome"] == "healthy"
