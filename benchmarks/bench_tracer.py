"""Cost of the tracer's replay of a non-finite step against the plain step it replays.

The reference model at a preset, fresh from its initialisation, takes one fp16 step with a GradScaler at its
default initial scale (65536) on one batch: the scaled backward overflows a float16 gradient (in the joint network
on data_samples/, in the CTC head at the real trial lengths), a real non-finite step that the GradScaler catches
(the mechanism of notebook 01's first caught step). With `--encoder-gain 4` the encoder's Linear weights start 4
times too large and its fp16 forward overflows (the seed-size run's first overflow was in an encoder projection):
the loss is NaN and the whole backward carries non-finite values, so the replay checks it to the end. Per round, after one
untimed warm-up round:

    plain   the step on a replica of the model restored to the bundle (`TrainStep` on the same state and RNG)
    replay  `trace_step` on that bundle: the replica's construction plus the whole step replayed under the
            tracer's checks (what `NonFiniteTracer` runs when a step goes non-finite)

Prints both times per round (wall and this process's CPU time), the replay's findings, and last `tracer replay
ratio: X.XX`: the median over rounds of replay / plain in CPU time on the CPU (run with OMP_NUM_THREADS=1; other
work on a loaded machine moves it less than the wall time), in wall time on a GPU.

    python benchmarks/bench_tracer.py --preset small --rounds 3
    python benchmarks/bench_tracer.py --preset seed --rounds 1 --warmup 0
    python benchmarks/bench_tracer.py --preset seed --rounds 1 --warmup 0 --encoder-gain 4

`--lengths b2t` (the default at `seed`) runs on a synthetic set with the real Brain-to-Text '25 trial lengths
(generated once into runs/data/), `sample` (the default otherwise) on data_samples/.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from bench_instrumentation import load_batches
from workbench.data import real_length_dataset
from workbench.instrument.replay import bundle_rng, capture, replica
from workbench.instrument.tracer import StepTrace, trace_step
from workbench.model import HybridModel, get_config
from workbench.model.losses import LossWeights
from workbench.train import StepConfig, StepResult, TrainStep, build_optimizer
from workbench.train.device import pick_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]
_R = TypeVar("_R")


def timed_call(run: Callable[[], _R], device: torch.device) -> tuple[float, float, _R]:
    """(wall seconds, this process's CPU seconds, result) of `run()`, synchronising a GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def nonfinite(result: StepResult) -> bool:
    """The step went non-finite: a non-finite loss or gradient norm, or an update the GradScaler skipped."""
    norm = result.grad_norm
    return (not all(math.isfinite(v) for v in result.losses.values()) or (norm is not None and not math.isfinite(norm))
            or result.reason == "nonfinite_grad")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of (plain step, replay)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lengths", choices=("sample", "b2t"), default=None,
                        help="trial lengths: data_samples/ or the real B2T lengths (default: b2t at seed)")
    parser.add_argument("--encoder-gain", type=float, default=1.0,
                        help="multiplies the encoder's Linear weights at initialisation; 4 overflows the fp16 forward")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    lengths = args.lengths or ("b2t" if args.preset == "seed" else "sample")

    seed_everything(0)
    device = pick_device(args.device)
    data = real_length_dataset(ROOT / "runs" / "data") if lengths == "b2t" else ROOT / "data_samples"
    with tempfile.TemporaryDirectory() as scratch:
        [batch] = load_batches(data, 1, args.batch_size, device, Path(scratch))
    model = HybridModel(get_config(args.preset)).to(device)
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(args.encoder_gain)
    step = TrainStep(model, build_optimizer(model.parameters(), lr=1e-4), StepConfig(precision="fp16"), device)
    weights = LossWeights(ctc=0.3, rnnt=1.0, mode=0.0)
    bundle = capture(step, batch, weights, index=1)
    print(f"device {device}, preset {args.preset}, data {data.name} (padded T {batch.features.shape[1]}, batch "
          f"{args.batch_size}), {sum(p.numel() for p in model.parameters())} parameters, fp16 with a GradScaler "
          f"at scale {step.config.init_scale:g}, encoder Linear weights x{args.encoder_gain:g} at init, {args.warmup} warm-up + {args.rounds} timed rounds")

    # On the CPU the measure is the process's CPU time (one thread with OMP_NUM_THREADS=1): other work on a loaded
    # machine moves it less than the wall time. On a GPU it is the wall time.
    measure = "wall" if device.type == "cuda" else "CPU"
    plain_s, replay_s = [], []
    trace: StepTrace | None = None
    for k in range(args.warmup + args.rounds):
        rep = replica(step, bundle)
        with bundle_rng(bundle):
            wall, cpu, result = timed_call(functools.partial(rep, batch, weights), device)
        if not nonfinite(result):
            raise SystemExit(f"the step stayed finite ({result}): nothing to replay at this preset and batch")
        replay_wall, replay_cpu, trace = timed_call(functools.partial(trace_step, step, bundle), device)
        timed_round = k >= args.warmup
        if timed_round:
            plain_s.append(wall if measure == "wall" else cpu)
            replay_s.append(replay_wall if measure == "wall" else replay_cpu)
        print(f"  {'round' if timed_round else 'warm-up'} {k + 1}: plain step {wall:.2f} s wall, {cpu:.2f} s CPU; "
              f"replay {replay_wall:.2f} s wall, {replay_cpu:.2f} s CPU", flush=True)
    assert trace is not None
    if not trace.findings:
        raise SystemExit("the replay stayed finite: the step did not reproduce")
    for finding in trace.findings:
        print(f"  finding: {finding.line()}")
    print(f"  {measure} time: plain step median {statistics.median(plain_s):.2f} s, replay median "
          f"{statistics.median(replay_s):.2f} s")
    print(f"tracer replay ratio: {statistics.median(r / p for r, p in zip(replay_s, plain_s)):.2f}")


if __name__ == "__main__":
    main()
