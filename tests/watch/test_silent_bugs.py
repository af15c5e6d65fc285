"""benchmarks/silent_bugs/run.py: every case's bug found within one step of acting, nothing on its fixed twin, and
the README's table of it as measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "silent_bugs"


def test_every_case_detected_and_no_false_finding(capsys):
    sys.path.insert(0, str(SUITE))
    try:
        spec = importlib.util.spec_from_file_location("silent_bugs_run", SUITE / "run.py")
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        rows = suite.main()
    finally:
        sys.path.remove(str(SUITE))
    assert len(rows) >= 8  # runnable cases; the skipped ones come on top
    for row in rows:
        assert row["detected"], row
        assert row["false"] == [], row
        assert row["fixed_outcome"] in ("healthy", "inconclusive"), row
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"silent bugs: {len(rows)}/{len(rows)} detected within one step, 0 false findings")
    # the README's table ("Watch your own loop") states what this run measures, row by row
    table = {cells[0]: cells for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| ")
             for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for row in rows:
        found = f"{row['found'][0]}@{row['found'][1]}"
        false = ", ".join(f"{k}@{s}" for k, s in row["false"]) or "0"
        assert table[row["case"]][3:] == [found, str(row["acts"]), row["bug_outcome"], row["fixed_outcome"], false], \
            row
