"""Log N steps to a new run log at PATH, printing each step once log_step returns, then hold the file open.

Usage: runlog_writer.py PATH N [FLUSH_EVERY]. The tests SIGKILL it mid-run or while it holds the file.
"""

import sys
import time

from workbench.records import RunLogWriter


def step_values(step: int) -> dict[str, float | list[float]]:
    """The values logged at ``step``: scalar "loss" and 3-vector "grad_norm/encoder"."""
    return {"loss": 0.5 * step, "grad_norm/encoder": [step, step + 0.25, -step]}


def main() -> None:
    path, n_steps = sys.argv[1], int(sys.argv[2])
    flush_every = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    writer = RunLogWriter(path, attrs={"run": "killed"}, flush_every=flush_every)
    for step in range(n_steps):
        writer.log_step(step, step_values(step))
        print(step, flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
