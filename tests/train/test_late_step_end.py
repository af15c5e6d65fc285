"""A `skip_step` step without a GradScaler takes its one host copy before the update; what observers measure after
the update (the parameters' non-finite check, the size of the update) crosses in the next step's copy. These tests
hold that the late rows are the same rows, under the same steps, with the same outcome, as a run whose copy is
taken at the end of the step (`nonfinite_policy="continue"`, which decides nothing before the update), and that a
run ending right after a bad step still records it."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from host_reads import HostReads  # tests/host_reads.py (tests/ is on the path through its conftest)
from workbench.instrument import GradNormProbe, OptimizerCoverage
from workbench.records import Recorder, RunRecord
from workbench.records.outcome import classify
from workbench.run.byo import Session, UserBatch, _LossAdapter, instrument
from workbench.run.engine import RunEngine
from workbench.train.step import StepConfig, TrainStep, get_semantics


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def user_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def big_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return 1e3 * user_loss(model, batch)


def run(policy: str, steps: int, *, lrs: dict[int, float] | None = None, optimizer: str = "adamw",
        clip: float | None = 1.0, settle_each: bool = False, loss: Any = user_loss) -> tuple[Session, list[RunRecord]]:
    """`steps` steps of the MLP under `policy`; `lrs[k]`: the lr the user sets right before step k. Returns the
    closed session and, per step, a copy of the record as it stood right after that step (settled when asked)."""
    model = mlp()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2))
    seen = []
    with instrument(model, opt, loss, clip=clip, semantics=get_semantics("corrected", nonfinite_policy=policy),
                    ) as session:
        for k, batch in enumerate(batches(steps), start=1):
            for group in opt.param_groups:
                group["lr"] = (lrs or {}).get(k, group["lr"])
            session.step(batch)
            if settle_each:
                session.train_step.settle()
            seen.append(list(session.record.steps))
    return session, seen


def rows(record: RunRecord) -> dict[str, list[Any]]:
    return {k: v for k, v in record.series.items() if k != "step_ms"}


def same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
                                    for x, y in zip(a, b))


def test_late_rows_equal_a_run_copied_at_the_end_of_each_step():
    late, seen = run("skip_step", 6, lrs={4: 3e-2})
    on_time, _ = run("continue", 6, lrs={4: 3e-2})
    assert late.record.steps == on_time.record.steps == [1, 2, 3, 4, 5, 6]
    # The row of step k is written during step k+1 (after the lr of step 4 was set), or when the run ends.
    assert seen == [[], [1], [1, 2], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5]]
    a, b = rows(late.record), rows(on_time.record)
    assert sorted(a) == sorted(b) and "update_ratio/0" in a and "params_finite" in a
    assert all(same(a[k], b[k]) for k in a), [k for k in a if not same(a[k], b[k])]
    assert a["lr/group0"] == [1e-2, 1e-2, 1e-2, 3e-2, 3e-2, 3e-2]
    assert classify(late.record).kind == classify(on_time.record).kind


def test_settle_between_steps_writes_each_row_at_its_step():
    _, seen = run("skip_step", 3, settle_each=True)
    assert seen == [[1], [1, 2], [1, 2, 3]]


@pytest.mark.parametrize("steps", [3, 5])
def test_an_update_that_overflows_the_parameters_is_recorded_at_its_step(steps):
    # SGD at lr 1e38 on finite, unclipped gradients (of 1e3 x the cross-entropy): step 3's update itself overflows
    # the parameters to inf (no value injected: float32 arithmetic). The gradient norm of step 3 is finite, so skip_step applies the update;
    # only the check after it sees the damage. A run that ends right there (steps=3) must still see it.
    session, _ = run("skip_step", steps, lrs={3: 1e38}, optimizer="sgd", clip=None, loss=big_loss)
    record = session.record
    assert record.steps == list(range(1, steps + 1))
    finite = record.values("params_finite")
    assert finite[:2] == [True, True] and finite[2] is False
    assert record.first_nonfinite_param_step() == 3
    assert math.isfinite(record.values("clip/total_norm")[2])
    outcome = classify(record)
    assert outcome.kind == "diverged" and any("step 3" in reason for reason in outcome.reasons), outcome
    verdict = session.verdicts[0]
    assert verdict.step == 3 and verdict.phase == "update", verdict.line()


def test_the_overflow_run_matches_the_run_copied_at_the_end_of_each_step():
    late, _ = run("skip_step", 3, lrs={3: 1e38}, optimizer="sgd", clip=None, loss=big_loss)
    on_time, _ = run("continue", 3, lrs={3: 1e38}, optimizer="sgd", clip=None, loss=big_loss)
    a, b = rows(late.record), rows(on_time.record)
    assert sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a), [k for k in a if not same(a[k], b[k])]
    assert classify(late.record) == classify(on_time.record)
    assert [v.line() for v in late.verdicts] == [v.line() for v in on_time.verdicts]


def engine_run(policy: str, steps: int) -> tuple[RunRecord, int]:
    """A RunEngine over a TrainStep with the probe's own update ratio (as `run.joint` builds it), its coverage and a
    recorder; returns the record and the host copies made during the steps."""
    model = mlp()
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                     StepConfig(semantics=get_semantics("corrected", nonfinite_policy=policy)), torch.device("cpu"),
                     loss_fn=_LossAdapter(user_loss))
    probe = GradNormProbe(model, {"first": "0", "last": "2"}, update_ratio=True)
    record = RunRecord({})
    instruments = [probe, OptimizerCoverage(model, probe=probe)]
    engine = RunEngine(step, instruments=instruments, recorder=Recorder(record, sources=instruments))
    with HostReads() as reads:
        for batch in batches(steps):
            engine.step(UserBatch(batch))
    engine.close()
    assert reads.outside == []
    return record, reads.transfers


def test_the_probes_own_update_ratio_crosses_late_with_the_same_rows():
    late, late_copies = engine_run("skip_step", 5)
    on_time, on_time_copies = engine_run("continue", 5)
    assert late_copies == on_time_copies == 5  # the last step's ratio crosses at close, outside the count
    a, b = rows(late), rows(on_time)
    assert "update_ratio/first" in a and late.steps == [1, 2, 3, 4, 5]
    assert sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a), [k for k in a if not same(a[k], b[k])]


def test_a_summary_taken_before_close_sees_the_last_steps_parameter_check():
    # The user asks for the summary inside the `with` block, right after the step whose update overflowed.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with instrument(model, opt, big_loss, clip=None, semantics=get_semantics("corrected")) as session:
        for k, batch in enumerate(batches(3), start=1):
            if k == 3:
                opt.param_groups[0]["lr"] = 1e38
            session.step(batch)
        summary = session.summary()
        assert session.record.steps == [1, 2, 3]
        assert session.record.first_nonfinite_param_step() == 3, summary
