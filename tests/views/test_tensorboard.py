"""`workbench export --tensorboard`: every scalar series of a run log comes back from TensorBoard's own event reader
with the log's values (as float32, what TensorBoard stores) at the log's steps, vectors as one tag per column, the
outcome, the causal chain and the event rows as text; runs that share a name get folders of their own; a log still
being written is refused unless --partial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.records import RunLog, RunLogWriter, read_record, summarize  # noqa: E402
from workbench.run.byo import instrument  # noqa: E402


def _run(path: Path, *, nan_at: int | None = None, steps: int = 12) -> None:
    """A small instrumented fp16 run; with `nan_at`, that step's features are 1e5 times larger (finite), so the
    cast of the first layer's output to float16 overflows there (a real overflow, nothing injected)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_fn(model, batch):
        x, y = batch
        return {"ce": F.cross_entropy(model(x).float(), y), "l2": 1e-4 * model[2].weight.float().square().sum()}

    g = torch.Generator().manual_seed(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with instrument(model, optimizer, loss_fn, log_path=path, semantics="seed_faithful",
                    precision="fp16") as session:
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        for step in range(1, steps + 1):
            session.step((x * (1e5 if step == nan_at else 1.0), y))


def _accumulator(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_export_reads_back_with_tensorboards_event_reader(tmp_path, capsys):
    healthy, diverged = tmp_path / "a" / "run.h5", tmp_path / "b" / "run.h5"  # both runs are called "run"
    _run(healthy)
    _run(diverged, nan_at=6)
    rc = main(["export", str(healthy), str(diverged), "--tensorboard", str(tmp_path / "tb")])
    out = capsys.readouterr().out
    assert rc == 0 and f"tensorboard --logdir {tmp_path / 'tb'}" in out
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["run__a_run", "run__b_run"]

    for log, folder in ((healthy, "run__a_run"), (diverged, "run__b_run")):
        record = read_record(log)
        acc = _accumulator(tmp_path / "tb" / folder)
        scalars = set(acc.Tags()["scalars"])
        compared = 0
        for key, values in record.series.items():
            expected = [(s, v) for s, v in zip(record.steps, values) if v is not None]
            got = [(e.step, e.value) for e in acc.Scalars(key)]
            assert [s for s, _ in got] == [s for s, _ in expected], key
            want = np.array([float(v) for _, v in expected], dtype=np.float32)
            assert np.array_equal(np.array([v for _, v in got], dtype=np.float32), want, equal_nan=True), key
            compared += 1
        with RunLog(log) as runlog:
            steps, vectors = runlog.series("param_grad_norm")
            labels = runlog.labels("param_grad_norm")
        for column, label in enumerate(labels):
            got = acc.Scalars(f"param_grad_norm/{label}")
            assert [e.step for e in got] == steps.tolist()
            assert np.array_equal(np.array([e.value for e in got], dtype=np.float32),
                                  vectors[:, column].astype(np.float32), equal_nan=True)
        assert scalars == set(record.series) | {f"param_grad_norm/{label}" for label in labels}
        assert compared == len(record.series) >= 20

        (outcome,) = _text(acc, "outcome")
        (chain,) = _text(acc, "causal_chain")
        assert outcome[0] == record.steps[-1]
        if log == diverged:
            # the loop skipped the overflowing step and every parameter stayed finite
            assert outcome[1].startswith("**overflow_skipped**") and "(first at step 6)" in outcome[1]
            assert chain[1].splitlines() == [f"- {link['line']}" for link in summarize(record)["causal_chain"]]
            assert chain[1].startswith("- step 6 forward: producer") and "step 6 loss: the loss became non-finite" \
                in chain[1]
            tracer = _text(acc, "events/tracer")
            assert tracer and tracer[0][0] == 6 and tracer[0][1] == record.tables["tracer"][0]["line"]
        else:
            assert outcome[1].startswith("**healthy**") and chain[1] == "nothing was ever non-finite"
        assert "status finished" in _text(acc, "run")[0][1]


def test_a_log_still_being_written_is_refused_unless_partial(tmp_path, capsys):
    path = tmp_path / "live.h5"
    writer = RunLogWriter(path, attrs={"settings": {"name": "live"}})
    try:
        for step in range(1, 4):
            writer.log_step(step, {"loss/total": 1.0 / step, "skipped": False})
        rc = main(["export", str(path), "--tensorboard", str(tmp_path / "tb")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1
        assert err.startswith(f"error: {path}: a run log still being written (status 'running', modified ")
        assert "pass --partial to export the steps flushed so far" in err and not (tmp_path / "tb").exists()

        assert main(["export", str(path), "--tensorboard", str(tmp_path / "tb"), "--partial"]) == 0
        acc = _accumulator(tmp_path / "tb" / "live")
        assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss/total")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
        assert "still being written or killed" in _text(acc, "run")[0][1]
    finally:
        writer.close()
    # once again: the first export is there and is replaced only with --overwrite
    rc = main(["export", str(path), "--tensorboard", str(tmp_path / "tb")])
    assert rc == 2 and "already holds an export; choose another folder, or pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(path), "--tensorboard", str(tmp_path / "tb"), "--overwrite"]) == 0
    assert len(list((tmp_path / "tb" / "live").iterdir())) == 1


def test_bad_export_input_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.h5").write_text("not hdf5")
    for args, message in (
        ([str(tmp_path / "none.h5")], f"error: {tmp_path / 'none.h5'}: no such run log"),
        ([str(tmp_path / "notes.h5")], f"error: {tmp_path / 'notes.h5'}: expected a run log"),
    ):
        rc = main(["export", *args, "--tensorboard", str(tmp_path / "tb")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "tb").exists()
