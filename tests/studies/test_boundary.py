"""Boundary search: the bisection's brackets and answers on hand-made probes, and a real search on the tiny
checkpoint that resumes from its own finished runs."""

from pathlib import Path

import pytest

from workbench.studies.boundary import (
    Cell, CellState, Search, answers, compare, grid, midpoint, probe_verdict, search_boundaries,
)
from workbench.studies.sweep import make_plan

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"


def _runs(*outcomes):
    return [{"seed": k, "outcome": o, "first_nonfinite_step": None, "decisive_link": None}
            for k, o in enumerate(outcomes)]


def test_midpoint_is_the_rounded_geometric_mean():
    assert midpoint(1e-4, 1.0) == 0.01
    assert midpoint(1e-2, 1.0) == 0.1
    assert midpoint(1e-3, 1e-2) == pytest.approx(0.0032)


def test_probe_verdict_needs_every_seed_healthy_and_any_seed_diverged():
    assert probe_verdict(_runs("healthy", "healthy", "healthy")) == "healthy"
    assert probe_verdict(_runs("healthy", "inconclusive", "healthy")) == "not_healthy"
    assert probe_verdict(_runs("healthy", "overflow_skipped", "diverged")) == "diverged"


def test_bisection_brackets_between_healthy_and_not_healthy():
    search = Search(lo=1e-4, hi=1.0, rounds=3, seeds=(0, 1, 2))
    state = CellState(Cell("freeze_params", 10))
    assert state.next_lr(search) == 1e-4
    state.probes[1e-4] = _runs("healthy", "healthy", "healthy")
    assert state.next_lr(search) == 1.0
    state.probes[1.0] = _runs("diverged", "diverged", "overflow_skipped")
    assert state.next_lr(search) == 0.01
    state.probes[0.01] = _runs("healthy", "stalled", "healthy")  # one seed not healthy: the boundary is below
    assert state.next_lr(search) == 0.001
    state.probes[0.001] = _runs("healthy", "healthy", "healthy")
    assert state.next_lr(search) == 0.0032
    state.probes[0.0032] = _runs("diverged", "healthy", "healthy")
    assert state.next_lr(search) is None and "after 3 bisection round(s)" in state.ended
    del state.probes[0.0032]
    result = state.result()
    assert (result["lr_healthy_max"], result["lr_unhealthy_min"], result["lr_diverged_min"]) == (0.001, 0.01, 1.0)
    assert result["first_failure"]["lr"] == 0.01 and result["first_failure"]["outcome"] == "stalled"
    assert [p["lr"] for p in result["probes"]] == [1e-4, 0.001, 0.01, 1.0]
    assert result["probes"][-1]["outcomes"] == {"diverged": 2, "overflow_skipped": 1}


def test_a_cell_not_healthy_at_the_lowest_lr_never_probes_the_ceiling():
    search = Search(lo=1e-3, hi=0.1)
    state = CellState(Cell("freeze_params", 0, "seed_faithful"))
    state.probes = {1e-3: _runs("diverged", "diverged")}
    assert state.next_lr(search) is None and "already at the lowest lr 0.001" in state.ended
    assert state.result()["lr_diverged_min"] == 1e-3 and state.result()["lr_healthy_max"] is None


def test_search_ends_and_says_why_when_nothing_fails_up_to_the_ceiling():
    search = Search(lo=1e-3, hi=0.1)
    state = CellState(Cell("freeze_params", 0))
    state.probes = {1e-3: _runs("healthy"), 0.1: _runs("healthy")}
    assert state.next_lr(search) is None and "up to the ceiling lr 0.1" in state.ended
    result = state.result()
    assert result["lr_diverged_min"] is None and result["lr_max"] == 0.1
    lines = answers([result], "test scope")
    assert "nothing diverged up to lr 0.1" in lines[1]


def test_answers_count_only_intervals_that_do_not_overlap():
    def result(n, lo, hi, policy="freeze_params", diverged=None):
        state = CellState(Cell(policy, n))
        state.probes = {lo: _runs("healthy"), hi: _runs("diverged" if diverged else "stalled")}
        return state.result()

    results = [result(0, 1e-3, 1e-2, diverged=True), result(10, 1e-3, 1e-2), result(100, 1e-2, 1e-1)]
    cmp = compare(results, "freeze_steps", 0)
    assert [(c["freeze_steps"], c["moved"]) for c in cmp] == [(10, "within spread"), (100, "higher")]
    line = answers(results, "scope")[1]
    assert "in 1 of 2 comparisons with N=0 (N=100 higher)" in line
    assert "some seed diverged in 1 of 3 cells, from lr 0.01" in line


def test_equal_total_budget_gives_every_n_the_same_number_of_joint_steps():
    search = Search(steps=12, total_steps=18, seeds=(0,))
    lengths = set()
    for n in (0, 6):
        plan = make_plan(grid(search, Cell("freeze_params", n, budget="total"), 1e-3))
        lengths |= {s.steps for s in plan.runs.values()}
    assert lengths == {18}
    after = {s.steps for n in (0, 6) for s in make_plan(grid(search, Cell("freeze_params", n), 1e-3)).runs.values()}
    assert after == {12, 18}
    with pytest.raises(ValueError, match="leaves none after N=20"):
        grid(search, Cell("freeze_params", 20, budget="total"), 1e-3)


def test_real_search_on_tiny_resumes_from_its_finished_runs(ctc_checkpoint, tmp_path):
    search = Search(lo=1e-3, hi=1.0, rounds=1, seeds=(0, 1), steps=4)
    cells = [Cell("freeze_params", 0, precision="fp32"), Cell("freeze_and_mute", 0, precision="fp32"),
             Cell("freeze_params", 2, precision="fp32")]
    first = search_boundaries(tmp_path / "b", ctc_checkpoint, SAMPLE, search, cells, workers=1)
    # N = 0 is the same run under every policy: 2 distinct cells' runs, 2 seeds, at most 3 probes each
    assert len(first["cells"]) == 3
    ids = {r["run"] for c in first["cells"] for p in c["probes"] for r in p["runs"]}
    assert len(ids) <= 2 * 2 * 3
    for c in first["cells"]:
        healthy_lo = c["probes"][0]["verdict"] == "healthy"
        assert c["probes"][0]["lr"] == 1e-3 and c["lr_max"] == (1.0 if healthy_lo else 1e-3)
        assert all(r["status"] == "finished" for p in c["probes"] for r in p["runs"])
    logs = sorted((tmp_path / "b" / "runs").glob("*.h5"))
    stamps = {p: p.stat().st_mtime_ns for p in logs}
    again = search_boundaries(tmp_path / "b", ctc_checkpoint, SAMPLE, search, cells, workers=1)
    assert again["cells"] == first["cells"]
    assert {p: p.stat().st_mtime_ns for p in logs} == stamps  # nothing recomputed


def test_seed_faithful_cells_keep_the_optimizer_at_the_unfreeze():
    search = Search(steps=4, seeds=(0,))
    kept = make_plan(grid(search, Cell("freeze_params", 2, "seed_faithful"), 1e-3)).runs.values()
    rebuilt = make_plan(grid(search, Cell("freeze_params", 2, "corrected"), 1e-3)).runs.values()
    assert [s.rebuild_at_unfreeze for s in kept] == [False] and [s.rebuild_at_unfreeze for s in rebuilt] == [True]
    assert "optimizer kept" in Cell("freeze_params", 2, "seed_faithful").label


def test_the_frontier_figure_has_one_panel_per_semantics_precision_and_budget():
    from workbench.views.plots import boundary_figure

    results = []
    for cell in (Cell("freeze_params", 0), Cell("freeze_and_mute", 6), Cell("freeze_params", 6, "seed_faithful"),
                 Cell("freeze_params", 0, precision="fp32")):
        state = CellState(cell)
        state.probes = {1e-3: _runs("healthy", "healthy", "healthy"), 1.0: _runs("diverged", "stalled", "healthy")}
        results.append(state.result())
    fig = boundary_figure(results, title="t")
    assert len(fig.axes) == 3
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
