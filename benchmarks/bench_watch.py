"""Overhead of `workbench.watch` on a plain training loop over the reference model.

The same plain-PyTorch loop (forward, CTC loss, zero_grad, backward, clip, AdamW step) runs with and without
`watch` around it, on the same model, optimizer and batches, interleaved round by round (the order alternating) so
drift in machine load hits both alike. A round's watch is attached before its steps are timed and detached after
(a loop attaches once, however long it runs: the per-step cost is what the ratio measures; attach + detach is
timed on its own and printed). Prints the load average before and after, the median ms/step of each, by wall
clock and by this process's CPU time (less sensitive to other jobs on a shared machine), and per measure the median
per-round ratio with its quartiles and the ratio of the fastest rounds; the last line is
`watch overhead ratio: X.XXX` (wall clock, median per-round ratio).

    python benchmarks/bench_watch.py --preset small --rounds 10 --steps 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from workbench import watch
from workbench.data import B2TDataset, Batch, DataError, collate, write_dataset
from workbench.model import HybridModel, get_config
from workbench.model.losses import LossWeights, compute_losses
from workbench.train.device import pick_device, seed_everything

from bench_instrumentation import timed  # noqa: E402  (one timer for every benchmark; this folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = LossWeights(ctc=1.0, rnnt=0.0, mode=0.0)


def load_batches(root: Path, n: int, batch_size: int, device: torch.device, scratch: Path) -> list[Batch]:
    """n batches of the train split under `root`; a small synthetic set when `root` holds no data."""
    try:
        dataset = B2TDataset(root, "train")
    except DataError:
        write_dataset(scratch, sessions=1, trials=n * batch_size)
        dataset = B2TDataset(scratch, "train")
    trials = [dataset[i % len(dataset)] for i in range(n * batch_size)]
    return [collate(trials[i * batch_size:(i + 1) * batch_size]).to(device) for i in range(n)]


def loop(model: HybridModel, optimizer: torch.optim.Optimizer, batches: list[Batch], w=None) -> None:
    """The user's loop; `w` (a Watch) only receives the loss."""
    for b in batches:
        out = model(b.features, b.feature_lengths, b.targets, b.target_lengths, rnnt=False)
        losses = compute_losses(out, b.feature_lengths, b.targets, b.target_lengths, None, WEIGHTS)
        if w is not None:
            w.loss(losses["total"])
        optimizer.zero_grad()
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="training steps per configuration per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", default=str(ROOT / "data_samples"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    seed_everything(0)
    device = pick_device(args.device)
    model = HybridModel(get_config(args.preset)).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("rnnt_decoder", "mode_head")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with tempfile.TemporaryDirectory() as scratch:
        batches = load_batches(Path(args.data), args.steps, args.batch_size, device, Path(scratch))

    attach_s: list[float] = []

    def run(with_watch: bool) -> tuple[float, float]:
        """(wall, CPU) seconds per step of one round."""
        w = None
        if with_watch:
            start = time.process_time()
            w = watch(model, optimizer, say=lambda line: None).attach()
            attach_s.append(time.process_time() - start)
        wall, cpu = timed(lambda: loop(model, optimizer, batches, w), device)
        if w is not None:
            start = time.process_time()
            w.detach()
            attach_s[-1] += time.process_time() - start
        return wall / args.steps, cpu / args.steps

    load_before = os.getloadavg()
    run(False), run(True)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "watch": []}
    for r in range(args.rounds):
        for name in ("plain", "watch") if r % 2 == 0 else ("watch", "plain"):
            times[name].append(run(name == "watch"))
    wall_ratios = [w[0] / p[0] for w, p in zip(times["watch"], times["plain"])]
    cpu_ratios = [w[1] / p[1] for w, p in zip(times["watch"], times["plain"])]
    print(f"preset {args.preset} | device {device} | {args.rounds} rounds x {args.steps} steps | batch "
          f"{args.batch_size} | torch threads {torch.get_num_threads()} | load average (1, 5, 15 min) before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, values in times.items():
        print(f"{name:6s} median {statistics.median(v[0] for v in values) * 1e3:8.1f} ms/step wall, "
              f"{statistics.median(v[1] for v in values) * 1e3:8.1f} ms/step CPU")
    print(f"attach + detach median {statistics.median(attach_s) * 1e3:.2f} ms CPU (once per loop)")
    for label, k, ratios in (("CPU time", 1, cpu_ratios), ("wall", 0, wall_ratios)):
        # beside the median per-round ratio: its quartiles, and the ratio of each side's fastest round (the one
        # other jobs on the machine disturbed least), so a loaded run shows how far to trust it
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        fastest = min(v[k] for v in times["watch"]) / min(v[k] for v in times["plain"])
        print(f"{label:8s} per-round ratio median {statistics.median(ratios):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}, "
              f"fastest rounds {fastest:.3f}")
    print(f"watch overhead ratio (CPU time): {statistics.median(cpu_ratios):.3f}")
    print(f"watch overhead ratio: {statistics.median(wall_ratios):.3f}")


if __name__ == "__main__":
    main()
