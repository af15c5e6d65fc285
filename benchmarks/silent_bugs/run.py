"""Run every silent-bug case under `workbench.watch`, its bug and its fixed variant, and print the table.

    python benchmarks/silent_bugs/run.py

Columns: case, source, expected finding, found (kind@step, the first finding of the expected kind), the step the
bug first acts, the outcome of the bug and of the fixed run, and the findings on the fixed run (false findings).
A case is detected when the expected kind is found no later than one step after the bug first acts. Cases that need
what this machine lacks are listed as skipped with their reason. Last line:
`silent bugs: D/N detected within one step, F false findings on N fixed runs`.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

CASES = ["forum_84911", "so_60335387", "mmpretrain_702", "seed_stale_optimizer", "amp_clip_scaled",
         "log_of_softmax", "forum_153740", "sprompts_2", "layer_in_forward"]
SKIPPED = [
    ("pytorch_115607", "pytorch 115607", "not_updated",
     "needs torch._dynamo compiling the optimizer step (a frozen-then-unfrozen group's step count); not run here"),
    ("pytorch_104336", "pytorch 104336", "-", "needs several GPUs (DDP after moving parameters between devices)"),
    ("deepspeed_1801", "DeepSpeed 1801", "-", "needs several GPUs (BF16_Optimizer clip with tensor parallelism)"),
    ("ddp_out_of_sync", "x.com/jxmnop (TrainCheck)", "-", "needs several GPUs (a model re-wrapped in DDP per run)"),
]


def evaluate(name: str) -> dict:
    case = importlib.import_module(name)
    bug, fixed = case.run("bug"), case.run("fixed")
    hit = next((f for f in bug.findings if f["kind"] == case.EXPECTED), None)
    return {"case": name, "source": case.SOURCE, "expected": case.EXPECTED, "acts": case.ACTS,
            "found": None if hit is None else (hit["kind"], hit["step"]),
            "detected": hit is not None and hit["step"] <= case.ACTS + 1,
            "bug_outcome": bug.summary()["outcome"], "fixed_outcome": fixed.summary()["outcome"],
            "false": [(f["kind"], f["step"]) for f in fixed.findings]}


def main() -> list[dict]:
    rows = [evaluate(name) for name in CASES]
    header = ("case", "source", "expected", "found", "acts", "bug outcome", "fixed outcome", "false on fixed")
    lines = [header]
    for r in rows:
        found = "-" if r["found"] is None else f"{r['found'][0]}@{r['found'][1]}"
        false = ", ".join(f"{k}@{s}" for k, s in r["false"]) or "0"
        lines.append((r["case"], r["source"], r["expected"], found, str(r["acts"]), r["bug_outcome"],
                      r["fixed_outcome"], false))
    for name, source, expected, why in SKIPPED:
        lines.append((name, source, expected, f"skipped: {why}", "", "", "", ""))
    widths = [max(len(line[k]) for line in lines if k < 3 or not line[3].startswith("skipped"))
              for k in range(len(header))]
    for line in lines:
        if line[3].startswith("skipped"):
            print("  ".join(c.ljust(w) for c, w in zip(line[:3], widths)) + "  " + line[3])
        else:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    detected = sum(r["detected"] for r in rows)
    false = sum(len(r["false"]) for r in rows)
    print(f"silent bugs: {detected}/{len(rows)} detected within one step, {false} false findings on {len(rows)} "
          f"fixed runs ({len(SKIPPED)} cases skipped)")
    return rows


if __name__ == "__main__":
    main()
