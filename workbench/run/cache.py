"""The cached CTC-warm checkpoint every joint-stage run forks from, keyed by the settings that made it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from workbench.records import json_safe
from workbench.run.settings import TrainSettings
from workbench.run.staged import run_training
from workbench.train.checkpoint import CheckpointError, load_checkpoint


def checkpoint_key(**settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _damage(path: Path, summary_path: Path) -> str | None:
    """What is wrong with a cache entry (its checkpoint or its summary), or None when both read back intact."""
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        return str(exc).removeprefix(f"{path}: ")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{summary_path.name}: {type(exc).__name__}: {exc}"
    return None if isinstance(summary, dict) else f"{summary_path.name}: expected a JSON object"


def ctc_warm_checkpoint(data: str | Path, preset: str, *, seed: int = 0, steps: int = 300, lr: float = 1e-3,
                        batch_size: int = 4, precision: str = "fp32", cache_dir: str | Path = "runs/cache",
                        device: str = "cpu", log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Train (or load from a cache keyed by its settings) the CTC-warm checkpoint; returns (path, summary).

    `precision` "fp16" trains the warmup as the seed does, with a GradScaler whose state the checkpoint keeps
    (a joint run with `carry_scaler` starts from it). `device` trains it there; it is part of the key, because
    the same seed gives different numbers on different devices.

    The training summary (losses per step, validation PER at ten points of the warmup) is cached beside it. Each
    process trains in a temporary folder of its own and moves the finished pair into place (summary first, the
    checkpoint last), so a reader never sees half a cache entry and two processes building the same entry at
    once both end with a complete one. An entry is verified before reuse (the checkpoint as every reader checks it,
    the summary as JSON); a damaged one is rebuilt, and `log` says so in one line.
    """
    key = checkpoint_key(data=str(Path(data).resolve()), preset=preset, seed=seed, steps=steps, lr=lr,
                         batch_size=batch_size, precision=precision, device=device)
    cache = Path(cache_dir)
    path = cache / f"ctc_warm_{preset}_{precision}_{key}.pt"
    summary_path = path.with_suffix(".json")
    if path.is_file() and summary_path.is_file():
        damage = _damage(path, summary_path)
        if damage is None:
            log(f"Loaded CTC-warm checkpoint from cache: {path}")
            return path, json.loads(summary_path.read_text())
        log(f"CTC-warm cache entry {path} is damaged ({damage}); rebuilding it")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp_{key}_", dir=cache))
    try:
        cfg = TrainSettings(preset=preset, data=str(data), out=str(work), seed=seed, batch_size=batch_size,
                            ctc_steps=steps, joint_steps=0, ctc_lr=lr, precision=precision, device=device,
                            eval_every=max(1, steps // 10))
        summary = run_training(cfg, log=log)
        (work / "summary.json").write_text(json.dumps(json_safe(summary)))
        os.replace(work / "summary.json", summary_path)
        os.replace(work / "ctc_warmup.pt", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path, json.loads(summary_path.read_text())
