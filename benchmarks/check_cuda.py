"""Device check (run on a CUDA machine): the seed's joint stage and the corrected loop on the GPU.

On CPU the predictor LSTM must run in float32 (oneDNN has no fp16 LSTM); on CUDA cuDNN runs it in fp16, which is
the seed's real configuration. This prints, per preset, what the seed_faithful run and the corrected run did.
Usage: python benchmarks/check_cuda.py [--presets tiny,small] [--steps 6]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from workbench.records import summarize
from workbench.run.cache import ctc_warm_checkpoint
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ctc-steps", type=int, default=100)
    parser.add_argument("--cache", default="/tmp/wb_cache")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for preset in args.presets.split(","):
        ckpt, _ = ctc_warm_checkpoint(ROOT / "data_samples", preset, steps=args.ctc_steps, cache_dir=args.cache,
                                      log=lambda s: None)
        for semantics in ("seed_faithful", "corrected"):
            t0 = time.perf_counter()
            record = run_joint(ckpt, ROOT / "data_samples", RunSettings(name=semantics, steps=args.steps,
                                                                       semantics=semantics), device="cuda")
            r = summarize(record)
            print(f"{preset} {semantics}: losses {[round(v, 3) for v in record.losses['total']]}; first non-finite "
                  f"loss step {r['first_nonfinite_loss_step']}; params non-finite after step "
                  f"{r['first_nonfinite_param_step']}; overflow steps {r['overflow_steps']}; outside optimizer "
                  f"{len(r['outside_optimizer'])}; {time.perf_counter() - t0:.1f} s")
            print(f"    tracer: {r['tracer_verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
