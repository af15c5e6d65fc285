"""Device check (run on a CUDA machine): the seed's joint stage and the corrected loop on the GPU.

On CPU the predictor LSTM must run in float32 (oneDNN has no fp16 LSTM); on CUDA cuDNN runs it in fp16, which is
the seed's real configuration. Per preset (the `seed` preset on a synthetic set with the real Brain-to-Text '25
trial lengths, the others on data_samples/) this prints:

- the fp16 step time, plain and instrumented (GradNormProbe + OptimizerCoverage, one host copy per step), and
  their median ratio;
- the host syncs per instrumented step (probe, coverage and recorder, as a run has them), fp16 and fp32, seen by
  `torch.cuda.set_sync_debug_mode("warn")`, by source line: the step's one copy (`workbench/train/host.py`),
  torch's own (the GradScaler's found-inf read in `GradScaler.step`), the fp32 `skip_step` decision before the
  update, and the reference model's loss (its label check and RNN-T lengths);
- the seed_faithful run: first non-finite step, outcome and its causal chain;
- the corrected run: outcome and its reasons.

    python benchmarks/check_cuda.py --presets tiny,seed --steps 6 --ctc-steps 20

`--device cpu` runs the same checks on the CPU (the predictor then falls back to fp32), to try the script out.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from bench_instrumentation import load_batches, overhead
from workbench.instrument import GradNormProbe, OptimizerCoverage
from workbench.model import HybridModel, get_config
from workbench.model.losses import LossWeights
from workbench.records import Recorder, RunRecord, summarize
from workbench.run.cache import ctc_warm_checkpoint
from workbench.run.joint import run_joint
from workbench.studies import reproduce
from workbench.train.checkpoint import load_checkpoint, load_weights
from workbench.train import StepConfig, TrainStep, build_optimizer
from workbench.train.device import pick_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def _where(w: warnings.WarningMessage) -> str:
    """The warning's source line, from the package folder down (workbench/..., torch/...)."""
    parts = Path(w.filename).parts
    start = max((i for i, part in enumerate(parts) if part in ("workbench", "torch")), default=len(parts) - 1)
    return f"{'/'.join(parts[start:])}:{w.lineno}"


def syncs_per_step(model: HybridModel, batches: list, device: torch.device, precision: str) -> tuple[float, Counter]:
    """Host syncs per instrumented step (GradNormProbe with update ratios, OptimizerCoverage, Recorder; corrected
    loop) that `torch.cuda.set_sync_debug_mode("warn")` reports, in total and by source line (per step)."""
    step = TrainStep(model, build_optimizer(model.parameters(), lr=1e-4), StepConfig(precision=precision), device)
    probe = GradNormProbe(model, update_ratio=True)
    coverage = OptimizerCoverage(model, probe=probe)
    for observer in (probe, coverage, Recorder(RunRecord({}), sources=[probe, coverage])):
        observer.attach(step)
    weights = LossWeights(ctc=0.3, rnnt=1.0, mode=0.0)
    step(batches[0], weights)  # warm-up: the GradScaler's lazy scale tensor, the probe's layout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                step(batch, weights)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    seen = Counter(_where(w) for w in caught if "synchroniz" in str(w.message))
    return sum(seen.values()) / len(batches), Counter({k: v / len(batches) for k, v in seen.items()})


def check(preset: str, args: argparse.Namespace, device: torch.device) -> None:
    """Print the step times, the overhead ratio and the two runs' outcomes for one preset."""
    size = reproduce.SIZES[preset]
    data = reproduce.study_data(size, ROOT)
    t0 = time.perf_counter()
    ckpt, _ = ctc_warm_checkpoint(data, preset, steps=args.ctc_steps, cache_dir=args.cache, device=device.type,
                                  log=lambda line: None)
    print(f"{preset}: data {data.name}, CTC-warm checkpoint ({args.ctc_steps} steps) in "
          f"{time.perf_counter() - t0:.1f} s")

    seed_everything(0)
    model = HybridModel(get_config(preset))
    load_weights(model, load_checkpoint(ckpt)["model"], ckpt)
    batches = load_batches(data, args.timing_steps, 4, device, Path(args.cache))
    result = overhead(model.to(device), batches, device, args.rounds, precision="fp16")
    plain, probed = (result["median_s"][k] / len(batches) for k in ("plain", "a"))
    print(f"  fp16 step (padded T {[b.features.shape[1] for b in batches]}): plain {1000 * plain:.1f} ms, "
          f"instrumented {1000 * probed:.1f} ms; overhead ratio {result['ratio']['a']:.3f} "
          f"(median of {args.rounds} rounds)")
    if device.type == "cuda":
        for precision in ("fp16", "fp32"):
            total, by_line = syncs_per_step(model, batches, device, precision)
            print(f"  {precision} instrumented step: {total:g} host syncs per step seen by set_sync_debug_mode")
            for line, count in by_line.most_common():
                print(f"    {count:g}/step at {line}")
    else:
        print("  host syncs: set_sync_debug_mode is CUDA-only (counted on CPU by tests/instrument/test_host_reads.py)")

    base = reproduce.seed_run(args.steps)
    for settings in (base, replace(base, name="corrected", semantics="corrected", eval_at_start=False)):
        t0 = time.perf_counter()
        r = summarize(run_joint(ckpt, data, settings, device=device.type))
        print(f"  {settings.name}: {r['outcome']} after {args.steps} steps ({time.perf_counter() - t0:.1f} s); "
              f"first non-finite step {r['first_nonfinite_step']}, loss step {r['first_nonfinite_loss_step']}; "
              f"overflow steps {r['overflow_steps']}")
        for reason in r["outcome_reasons"]:
            print(f"    reason: {reason}")
        for link in r["causal_chain"]:
            print(f"    chain: {link['line']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,seed")
    parser.add_argument("--steps", type=int, default=6, help="joint steps of the seed_faithful and corrected runs")
    parser.add_argument("--ctc-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the plain / instrumented timing")
    parser.add_argument("--timing-steps", type=int, default=2, help="batches per timing round")
    parser.add_argument("--cache", default="/tmp/wb_cache")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu tries the script on the CPU)")
        return 1
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}")
    for preset in args.presets.split(","):
        check(preset, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
