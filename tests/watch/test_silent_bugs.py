"""benchmarks/silent_bugs/run.py: every case's bug found within one step of acting, nothing on its fixed twin."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "silent_bugs"


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
