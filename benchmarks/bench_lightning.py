"""Overhead of `WorkbenchCallback` on a real `lightning.Trainer`, against a plain Trainer on the same model.

The model is the workbench's reference model (`HybridModel` at `--preset`, CTC + RNN-T loss) wrapped in a
LightningModule; every fit starts from the same weights and sees the same batches (data_samples/, fixed order).
Three configurations, fitted round by round in rotating order so drift in machine load hits all alike:

    plain    Trainer with no workbench callback
    probe    + WorkbenchCallback(trace=False): probe, coverage, outcome rules, HDF5 run log, logger values
    traced   + WorkbenchCallback(): the same and the non-finite tracer armed (the model and optimizer state
             copied every CAPTURE_EVERY steps, each step's inputs noted, while the run has no causal chain yet)

Each fit's step time is measured inside the fit, from `on_train_batch_start` to `on_train_batch_end` of every
optimizer step after the first (which holds lazy initialisation), before and after every other callback's hook
(the tracer's capture runs in the callback's `on_train_batch_start`), so Trainer start-up is outside the figure. A fit
runs CAPTURE_EVERY + 1 steps by default, so the steps timed hold one capture, as often as a run captures, and the
run log's flushes (one a second). Prints each configuration's mean and median ms/step and the median per-round
ratios of both: the mean is what a run pays (captures and flushes included), the median a typical step without
them. The last line, `lightning callback overhead ratio: X.XXX (traced X.XXX)`, is the mean's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lightning.py [--preset small] [--rounds 5] [--steps 17]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from workbench.data import B2TDataset, Batch, collate
from workbench.instrument.tracer import CAPTURE_EVERY
from workbench.model import HybridModel, get_config
from workbench.model.losses import LossWeights
from workbench.run.lightning import WorkbenchCallback
from workbench.train.device import seed_everything
from workbench.train.step import hybrid_losses

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = LossWeights(ctc=0.3, rnnt=1.0, mode=0.0)


class Hybrid(pl.LightningModule):
    """The reference model's joint-stage step (CTC + RNN-T) as a LightningModule."""

    def __init__(self, model: HybridModel) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        terms = hybrid_losses(self.model, batch, WEIGHTS, rnnt=True, mode=False, normalization="seed_sqrt_tu")
        return {"loss": terms["total"], **{k: v.detach() for k, v in terms.items() if k != "total"}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepTimer(pl.Callback):
    """Wall time of each optimizer step, from its batch start to its batch end, around every other callback's work:
    Lightning calls callbacks in list order, so `start` goes first in the list and the timer itself last."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0
        self.start = _Start(self)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


class _Start(pl.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.timer._t0 = time.perf_counter()


def fit(model: HybridModel, loader: DataLoader, steps: int, extra: list[pl.Callback]) -> list[float]:
    """Seconds of each optimizer step after the first of one fit of a copy of `model`."""
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                         callbacks=[timer.start, *extra, timer], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, gradient_clip_val=1.0)
    trainer.fit(Hybrid(copy.deepcopy(model)), loader)
    return timer.seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=CAPTURE_EVERY + 1, help="optimizer steps per fit")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    seed_everything(0)
    dataset = B2TDataset(ROOT / "data_samples", "train")
    trials = [dataset[i % len(dataset)] for i in range(args.steps * args.batch_size)]
    loader = DataLoader(trials, batch_size=args.batch_size, shuffle=False, collate_fn=collate)
    model = HybridModel(get_config(args.preset))
    times: dict[str, list[list[float]]] = {"plain": [], "probe": [], "traced": []}
    with tempfile.TemporaryDirectory() as tmp:

        def callbacks(name: str, k: int) -> list[pl.Callback]:
            if name == "plain":
                return []
            return [WorkbenchCallback(Path(tmp) / f"{name}_{k}.h5", trace=name == "traced", log=lambda s: None)]

        names = list(times)
        for name in names:  # warm-up: allocator, lazy imports, first-layout masks
            fit(model, loader, 3, callbacks(name, -1))
        for k in range(args.rounds):
            for name in names[k % 3:] + names[:k % 3]:
                times[name].append(fit(model, loader, args.steps, callbacks(name, k)))
    n = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset} ({n:,} parameters), data_samples, batch {args.batch_size}, fp32, CPU "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.steps} steps per configuration "
          f"(the first step of each fit untimed)")
    ratio = {}
    for label, stat in (("median", statistics.median), ("mean", statistics.fmean)):
        per_fit = {name: [stat(fit_times) for fit_times in values] for name, values in times.items()}
        ratio = {name: statistics.median(t / p for t, p in zip(per_fit[name], per_fit["plain"]))
                 for name in ("probe", "traced")}
        print(f"  per-step {label}: " + ", ".join(f"{name} {1000 * statistics.median(v):.2f} ms"
                                                  for name, v in per_fit.items())
              + f"; per-round ratio probe {ratio['probe']:.3f}, traced {ratio['traced']:.3f}")
    print(f"lightning callback overhead ratio: {ratio['probe']:.3f} (traced {ratio['traced']:.3f})")


if __name__ == "__main__":
    main()
