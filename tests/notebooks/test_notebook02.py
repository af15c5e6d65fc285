"""Notebook 02 runs headless with a tiny grid; its 02_summary.json covers the grid and agrees with the run logs."""

import json
import math
import time
from pathlib import Path

import numpy as np
import papermill as pm
import pytest

from workbench.studies.criteria import CRITERIA
from workbench.records import RunLog

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "02_compare_freeze_lengths.ipynb"
GRID = dict(freeze_steps=[0, 2], lr=[1e-5, 1e-3], semantics=["seed_faithful", "corrected"], precision=["fp32"],
            rebuild_at_unfreeze=[True],
            regimes=[{"optimizer": "adamw", "clip": 1.0, "rnnt_normalization": "seed_sqrt_tu"}],
            steps=4, k_after=3, workers=2)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, ctc_cache, ctc_warmup):
    out = tmp_path_factory.mktemp("nb02")
    t0 = time.perf_counter()
    pm.execute_notebook(str(NOTEBOOK), str(out / "02_executed.ipynb"), kernel_name="rnnt-workbench", cwd=str(ROOT),
                        parameters=dict(preset="tiny", seed=0, output_dir=str(out), cache_dir=str(ctc_cache),
                                        ctc_steps=ctc_warmup["steps"], ctc_lr=ctc_warmup["lr"], **GRID),
                        progress_bar=False)
    return json.loads((out / "02_summary.json").read_text()), out, time.perf_counter() - t0


def _number(value):
    return math.nan if value == "nan" else value


def test_headless_run_is_fast_and_leaves_static_images(executed):
    _, out, seconds = executed
    assert seconds < 120
    nb = json.loads((out / "02_executed.ipynb").read_text())
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the live family figure and stability map (final state), the saved map, families
    assert (out / "02_stability_map.png").stat().st_size > 0


def test_grid_is_complete_and_every_run_has_a_verdict(executed):
    data, _, _ = executed
    runs = {r["id"]: r for r in data["runs"]}
    assert not data["missing"]
    points = {(c["axes"]["freeze_steps"], c["axes"]["lr"], c["axes"]["semantics"]) for c in data["cells"]}
    assert points == {(n, lr, s) for n in GRID["freeze_steps"] for lr in GRID["lr"] for s in GRID["semantics"]}
    for cell in data["cells"]:
        assert cell["run"] in runs and cell["control"] in runs
        assert runs[cell["control"]]["settings"]["ctc_only"] is True
        assert runs[cell["control"]]["settings"]["lr"] == cell["axes"]["lr"]
    for run in runs.values():
        assert set(CRITERIA) <= set(run["verdict"])
        applicable = [run["verdict"][k] for k in CRITERIA if run["verdict"][k] is not None]
        assert run["verdict"]["all"] == all(applicable)
        if run["kind"] == "control":
            assert run["verdict"]["clean_unfreeze"] is None and run["verdict"]["per_vs_control"] is None
    assert len({r["settings"]["steps"] for r in runs.values()}) == 1  # max(N) + steps for every run
    assert data["conclusions"] and all(isinstance(line, str) for line in data["conclusions"])


def test_table_numbers_match_the_run_logs(executed):
    data, _, _ = executed
    for run in data["runs"]:
        s = run["summary"]
        with RunLog(run["log"]) as log:
            assert log.status == "finished"
            steps, total = log.series("loss/total")
            assert steps.tolist() == list(range(1, run["settings"]["steps"] + 1))
            _, finite = log.series("params_finite")
            bad = [int(st) for st, v in zip(steps, total) if not np.isfinite(v)]
            bad += [i + 1 for i, ok in enumerate(finite) if not ok]
            assert s["first_nonfinite_step"] == min(bad, default=None), run["id"]
            _, skipped = log.series("skipped")
            assert s["steps_skipped"] == int(skipped.sum())
            _, norms = log.series("grad_norm/global")
            finite_norms = norms[np.isfinite(norms)]
            assert s["max_grad_norm"] == (pytest.approx(float(finite_norms.max())) if finite_norms.size else None)
            assert s["val_per"] == log.attrs["val_per"]
            assert s["wall_s"] == log.attrs["wall_s"]
            a = s["attach_step"]
            assert a == (run["settings"]["freeze_steps"] + 1 if run["settings"]["policy"] == "freeze_params" else 1)
            k = data["rule"]["k_after"]
            if a + k <= len(total):
                assert _number(s["loss_ratio_k_after"]) == pytest.approx(total[a - 1 + k] / total[a - 1])
            events = [e for e in log.table("events") if e["event"] == "unfreeze"]
            if run["verdict"]["clean_unfreeze"] and run["settings"]["freeze_steps"] > 0:
                assert [e["step"] for e in events] == [a]
