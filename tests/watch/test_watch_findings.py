"""Every finding kind of `watch` on a hand-made loop that has the bug, and none on its clean twin."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loops import kinds, plain_step, run


def test_a_clean_loop_has_no_finding_and_trains():
    w = run(plain_step, steps=30)
    assert w.findings == []
    assert w.summary()["outcome"] == "healthy"


def test_outside_optimizer_at_the_first_step():
    w = run(plain_step, make_optimizer=lambda m: torch.optim.SGD(m.features.parameters(), lr=0.1))
    assert kinds(w) == [("outside_optimizer", 1)]
    assert w.findings[0]["tensors"] == ["head.weight", "head.bias"]
    summary = w.summary()
    assert summary["outcome"] == "stalled" and any(r.startswith("head got gradients") for r in
                                                   summary["outcome_reasons"])


def test_not_updated_when_a_group_has_no_learning_rate():
    def zero_lr(m):
        return torch.optim.SGD([{"params": m.features.parameters()}, {"params": m.head.parameters(), "lr": 0.0}],
                               lr=0.1)

    w = run(plain_step, make_optimizer=zero_lr)
    assert kinds(w) == [("not_updated", 1)] and w.findings[0]["tensors"] == ["head.weight", "head.bias"]
    assert w.summary()["outcome"] == "stalled"


def test_frozen_changed_by_batchnorm_in_train_mode_and_not_in_eval():
    def freeze(m):
        m.features.requires_grad_(False)

    w = run(plain_step, setup=freeze)
    assert kinds(w) == [("frozen_changed", 1)]
    assert set(w.findings[0]["tensors"]) == {"features.1.running_mean", "features.1.running_var",
                                             "features.1.num_batches_tracked"}

    def train_head_only(model, optimizer, batch, i, watcher):
        model.features.eval()  # the fix: a frozen stage keeps its statistics
        plain_step(model, optimizer, batch, i, watcher)

    assert run(train_head_only, setup=freeze).findings == []


def test_stale_grad_without_zero_grad_but_not_for_deliberate_accumulation():
    def no_zero_grad(model, optimizer, batch, i, w):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        w.loss(loss)
        loss.backward()
        optimizer.step()

    w = run(no_zero_grad)
    assert kinds(w) == [("stale_grad", 2)]  # the first step that could see an uncleared gradient

    def accumulate(model, optimizer, batch, i, w):
        x, y = batch
        for half in (slice(0, 16), slice(16, 32)):
            loss = F.cross_entropy(model(x[half]), y[half]) / 2
            w.loss(loss)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert run(accumulate).findings == []


def test_nonfinite_names_the_first_module_at_the_next_forward():
    w = run(plain_step, make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1e38))
    first = next(f for f in w.findings if f["kind"] == "nonfinite")
    # Step 1's update leaves weights near 1e38: finite (though their float32 norm overflows), so nothing is
    # non-finite yet. Step 2's forward overflows (a NaN loss), its update writes NaN into every parameter, and the
    # next forward, the first one hooked, goes non-finite at the first module.
    assert w.record.values("params_finite")[:2] == [True, False]
    assert first["step"] == 2 and first["module"] == "features.0"
    assert "head.weight" in first["tensors"]
    assert w.summary()["outcome"] == "diverged"


def test_clip_collapse_when_the_clip_runs_over_scaled_gradients():
    def amp_step(unscale_first):
        def step(model, optimizer, batch, i, w):
            x, y = batch
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)
            SCALER.scale(loss).backward()
            if unscale_first:
                SCALER.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            SCALER.step(optimizer)
            SCALER.update()
        return step

    global SCALER
    SCALER = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    w = run(amp_step(False), scaler=SCALER)
    assert kinds(w) == [("clip_collapse", 1)]
    SCALER = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    w = run(amp_step(True), scaler=SCALER)
    assert w.findings == [] and max(w.record.values("clip/coefficient")) <= 1.0


def test_no_gradient_for_a_detached_branch():
    def detached(model, optimizer, batch, i, w):
        x, y = batch
        optimizer.zero_grad()
        loss = F.cross_entropy(model.head(model.features(x).detach()), y)
        w.loss(loss)
        loss.backward()
        optimizer.step()

    w = run(detached)
    assert kinds(w) == [("no_gradient", 1)]
    assert w.findings[0]["tensors"] == ["features.0.weight", "features.0.bias", "features.1.weight",
                                        "features.1.bias"]


def test_steps_the_gradscaler_skipped_are_rows_of_their_own():
    def amp_step(model, optimizer, batch, i, w):
        x, y = batch
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="sum")
        w.loss(loss)
        SCALER.scale(loss).backward()  # loss * 2**127 overflows float32: inf gradients, the step is skipped
        SCALER.step(optimizer)
        SCALER.update()

    global SCALER
    SCALER = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    w = run(amp_step, steps=12, scaler=SCALER)
    skipped, scales = w.record.values("skipped"), w.record.values("scaler/scale_before")
    assert w.step == 12 and w.record.steps == list(range(1, 13))
    # a row per iteration: each skip halves the scale, an applied step keeps it (growth after 2000 clean steps)
    assert skipped[0] and not all(skipped) and scales[0] == 2.0 ** 127
    assert scales[1:] == [scale * (0.5 if skip else 1.0) for scale, skip in zip(scales, skipped)][:-1]
    assert all(math.isfinite(x) for x in w.record.values("loss/total"))
    assert not any(f["kind"] == "nonfinite" for f in w.findings)  # a finite loss: an overflow, not a failure


def test_the_clip_coefficient_is_the_clips_own():
    import pytest

    totals: list[float] = []

    def clipped(model, optimizer, batch, i, w):
        x, y = batch
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        w.loss(loss)
        loss.backward()
        totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        optimizer.step()

    w = run(clipped)
    assert w.record.values("clip/coefficient") == pytest.approx([min(1.0, 0.05 / (t + 1e-6)) for t in totals],
                                                                rel=1e-4)
    assert w.record.values("clip/total_norm") == pytest.approx(totals, rel=1e-4)


def test_a_loop_whose_every_step_is_skipped_keeps_a_bounded_backlog():
    """70 iterations, every one skipped (a scale at 2**127 backing off by 0.999 stays too large): more than the
    64 held on the device are recorded in a copy of their own, in order, and none is lost at the detach."""
    import pytest

    def amp_step(model, optimizer, batch, i, w):
        x, y = batch
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="sum")
        w.loss(loss)
        SCALER.scale(loss).backward()
        SCALER.step(optimizer)
        SCALER.update()
        assert len(w._iterations) <= 65

    global SCALER
    SCALER = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=0.999)
    w = run(amp_step, steps=70, scaler=SCALER)
    assert w.record.steps == list(range(1, 71)) and all(w.record.values("skipped"))
    scales = w.record.values("scaler/scale_before")
    assert scales == pytest.approx([2.0 ** 127 * 0.999 ** k for k in range(70)], rel=1e-5)
    assert w.summary()["outcome"] == "stalled"  # every update was skipped
