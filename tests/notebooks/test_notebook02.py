"""Notebook 02 runs headless with the tiny preset alone; its 02_summary.json covers the grid (N x lr x policy x
seed), gives every N the same steps after its unfreeze, and its measures agree with the run logs."""

import json
import math
import time
from pathlib import Path

import numpy as np
import papermill as pm
import pytest

from workbench.records import OUTCOMES, RunLog, read_record
from workbench.studies import boundary
from workbench.studies.criteria import CRITERIA, attach_step
from workbench.studies.freeze_lengths import SIZES, measure

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "02_compare_freeze_lengths.ipynb"
TINY = SIZES["tiny"]


@pytest.fixture(scope="module")
def executed(tmp_path_factory, ctc_cache):
    out = tmp_path_factory.mktemp("nb02")
    t0 = time.perf_counter()
    pm.execute_notebook(str(NOTEBOOK), str(out / "02_executed.ipynb"), kernel_name="rnnt-workbench", cwd=str(ROOT),
                        parameters=dict(preset="tiny", seed=0, output_dir=str(out), cache_dir=str(ctc_cache)),
                        progress_bar=False)
    return json.loads((out / "02_summary.json").read_text()), out, time.perf_counter() - t0


def _number(value):
    return math.nan if value == "nan" else value


def test_headless_run_leaves_static_images(executed):
    _, out, _ = executed  # its time is a benchmark figure (the summary's wall_s), not a test: load varies
    nb = json.loads((out / "02_executed.ipynb").read_text())
    images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the live family figure and stability map (final state), the saved map, families
    assert (out / "02_stability_map.png").stat().st_size > 0


def test_grid_is_complete_and_every_n_trains_equally_long_after_its_unfreeze(executed):
    data, _, _ = executed
    runs = {r["id"]: r for r in data["runs"]}
    assert not data["missing"]
    points = {(c["axes"]["freeze_steps"], c["axes"]["lr"], c["axes"]["policy"], c["axes"]["seed"])
              for c in data["cells"]}
    assert points == {(n, lr, p, s) for n in TINY["freeze_steps"] for lr in TINY["lr"]
                      for p in ("freeze_params", "freeze_and_mute") for s in TINY["seed"]}
    for cell in data["cells"]:
        assert cell["run"] in runs and runs[cell["control"]]["settings"]["ctc_only"] is True
        # step-matched: the control trains as many steps as its run
        assert runs[cell["control"]]["settings"]["steps"] == runs[cell["run"]]["settings"]["steps"]
    for run in runs.values():
        s = run["settings"]
        if not s["ctc_only"]:
            assert s["steps"] - attach_step(s) + 1 == TINY["steps"]
        assert set(CRITERIA) <= set(run["verdict"])
        assert run["summary"]["outcome"] in OUTCOMES
    assert data["conclusions"] and all(isinstance(line, str) for line in data["conclusions"])
    assert any(line.startswith("Scope: preset tiny") for line in data["conclusions"])


def test_n_is_compared_in_errors_and_only_functional_decoders_are_ranked(executed):
    data, _, _ = executed
    for row in data["measures"]:
        assert 0 <= row["rnnt_functional"] <= row["rnnt_scored"] <= len(row["runs"])
    for e in data["effects"]:
        if e["measure"] == "rnnt_errors" and e["effect"] is not None:
            assert all(s["rnnt_functional"] for r in data["measures"] if r["policy"] == e["policy"]
                       and r["lr"] == e["lr"] and r["freeze_steps"] in (e["a"], e["b"]) for s in r["per_seed"].values())
    assert data["comparisons"]["comparisons"] == sum(e["effect"] is not None for e in data["effects"])


def test_measures_match_the_run_logs(executed):
    data, _, _ = executed
    runs = {r["id"]: r for r in data["runs"]}
    by_point = {(r["policy"], r["lr"], r["freeze_steps"]): r for r in data["measures"]}
    for row in by_point.values():
        measured = [measure(read_record(runs[rid]["log"])) for rid in row["runs"]]
        pers = [m["ctc_per_after_attach"] for m in measured if m["ctc_per_after_attach"] is not None]
        assert row["ctc_per_after_attach"]["n"] == len(pers)
        if pers:
            assert row["ctc_per_after_attach"]["median"] == pytest.approx(float(np.median(pers)))
        assert row["diverged"] == sum(m["diverged"] for m in measured)


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
            assert s["val_per"] == log.attrs["val_per"]
            a = s["attach_step"]
            k = data["rule"]["k_after"]
            if a + k <= len(total):
                assert _number(s["loss_ratio_k_after"]) == pytest.approx(total[a - 1 + k] / total[a - 1])
            events = [e for e in log.table("events") if e["event"] == "unfreeze"]
            if run["verdict"]["clean_unfreeze"] and run["settings"]["freeze_steps"] > 0:
                assert [e["step"] for e in events] == [a]


def test_the_boundary_cells_hold_their_ends_probes_and_first_failure(executed):
    data, out, _ = executed
    found = data["boundary"]
    size = boundary.SIZES["tiny"]
    main = {(c["policy"], c["freeze_steps"], c["semantics"]) for c in found["cells"]
            if c["precision"] == "fp16" and c["budget"] == "after_unfreeze"}
    assert main == {(p, n, s) for p in size["policies"] for n in size["freeze_steps"] for s in size["semantics"]}
    assert {c["precision"] for c in found["cells"]} == {"fp16", *size["precisions"]}
    assert {c["budget"] for c in found["cells"]} == {"after_unfreeze", "total"}
    diverged = 0
    for cell in found["cells"]:
        assert {"lr_healthy_max", "lr_diverged_min", "lr_unhealthy_min", "first_failure"} <= set(cell)
        lrs = [p["lr"] for p in cell["probes"]]
        assert lrs == sorted(lrs) and lrs[0] == size["lo"]
        for probe in cell["probes"]:
            assert [r["seed"] for r in probe["runs"]] == data["seeds"]
            assert all(r["outcome"] in OUTCOMES for r in probe["runs"])
            # the ends follow from the seeds' outcomes
            healthy = all(r["outcome"] == "healthy" for r in probe["runs"])
            if healthy:
                assert cell["lr_healthy_max"] >= probe["lr"]
            else:
                assert cell["lr_unhealthy_min"] <= probe["lr"]
            if any(r["outcome"] == "diverged" for r in probe["runs"]):
                assert cell["lr_diverged_min"] <= probe["lr"]
                diverged += 1
        if cell["first_failure"] is not None and cell["first_failure"]["outcome"] == "diverged":
            assert cell["first_failure"]["decisive_link"]
    assert diverged >= 1  # the tiny search finds at least one diverged run
    assert found["answers"] and found["answers"][0].startswith("Scope: preset tiny")
    assert any("equal total" in line or "the budget" in line for line in found["answers"])
    assert (out / "02_boundary.png").stat().st_size > 0
