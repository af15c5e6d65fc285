"""The seed's trainer as a user would have it, watched in two lines.

A plain-PyTorch trainer written the way the seed's `training_stages.py` is: a stage manager that sets which
components train, an optimizer factory, a CTC warm-up stage and a joint stage that attaches the RNN-T decoder
(frozen for `--freeze-batches` batches, then unfrozen), and one GradScaler. Its bug is the seed's: the joint stage
keeps the CTC stage's optimizer, which never held the decoder, so the unfrozen decoder gets gradients and never
trains. `--fixed` rebuilds the optimizer whenever the trainable set changes.

    python examples/seed_trainer.py --preset tiny                # watch: outside_optimizer at the joint stage
    python examples/seed_trainer.py --preset tiny --fixed        # no finding

The two lines that add watch are marked `# watch`. `--summary PATH` writes watch's summary as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

import torch

from workbench import watch
from workbench.data import B2TDataset, Batch, make_loader
from workbench.model import HybridModel, get_config
from workbench.model.losses import LossWeights, compute_losses

STAGES = {"ctc": (("preprocessor", "encoder", "ctc_head"), LossWeights(ctc=1.0, rnnt=0.0, mode=0.0)),
          "joint": (("preprocessor", "encoder", "ctc_head", "rnnt_decoder"), LossWeights(ctc=0.3, rnnt=1.0, mode=0.0))}


class StageManager:
    """Which components train: every parameter of the named components, nothing else."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def set_stage(self, components: tuple[str, ...], frozen: tuple[str, ...] = ()) -> None:
        for name, p in self.model.named_parameters():
            top = name.split(".")[0]
            p.requires_grad_(top in components and top not in frozen)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer factory: AdamW over what is trainable now."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)


def batches(dataset: B2TDataset, batch_size: int, seed: int) -> Iterator[Batch]:
    while True:
        yield from make_loader(dataset, batch_size, shuffle=True, seed=seed, drop_last=True)


def train(preset: str, data: str, ctc_steps: int, joint_steps: int, freeze_batches: int, fixed: bool,
          lr: float, seed: int, log_path: str | None = None) -> dict:
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    model = HybridModel(get_config(preset)).to(device)
    stages = StageManager(model)
    stages.set_stage(*STAGES["ctc"][:1])
    optimizer = make_optimizer(model, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    source = batches(B2TDataset(data, "train"), 8, seed)

    with watch(model, optimizer, scaler=scaler, log_path=log_path, overwrite=True) as w:  # watch
        for stage, steps in (("ctc", ctc_steps), ("joint", joint_steps)):
            components, weights = STAGES[stage]
            frozen = ("rnnt_decoder",) if stage == "joint" and freeze_batches else ()
            stages.set_stage(components, frozen)
            if fixed:
                optimizer = make_optimizer(model, lr)
            for i in range(steps):
                if stage == "joint" and frozen and i == freeze_batches:
                    stages.set_stage(components)  # unfreeze after N batches
                    if fixed:
                        optimizer = make_optimizer(model, lr)
                b = next(source).to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    out = model(b.features, b.feature_lengths, b.targets, b.target_lengths, rnnt=stage == "joint")
                losses = compute_losses(out, b.feature_lengths, b.targets, b.target_lengths, None, weights)
                w.loss(losses, weights=vars(weights))  # watch
                optimizer.zero_grad()
                scaler.scale(losses["total"]).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
    return w.summary()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--data", default="data_samples")
    parser.add_argument("--ctc-steps", type=int, default=20)
    parser.add_argument("--joint-steps", type=int, default=20)
    parser.add_argument("--freeze-batches", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixed", action="store_true", help="rebuild the optimizer when the trainable set changes")
    parser.add_argument("--log-path", default=None)
    parser.add_argument("--summary", default=None, help="write watch's summary here as JSON")
    args = parser.parse_args(argv)
    summary = train(args.preset, args.data, args.ctc_steps, args.joint_steps, args.freeze_batches, args.fixed,
                    args.lr, args.seed, args.log_path)
    print(f"outcome: {summary['outcome']} ({'; '.join(summary['outcome_reasons'])})")
    print(f"findings: {[(f['kind'], f['step']) for f in summary['findings']] or 'none'}")
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
