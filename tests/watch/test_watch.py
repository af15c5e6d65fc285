"""watch's mechanics: importable from the package, every hook removed on leaving, one host copy per optimizer
step, the run log read back like any run's, one line per finding, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from loops import Net, batches, plain_step, run
from workbench.records import read_record
from workbench.train import host


def hook_count(model: nn.Module) -> int:
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return modules + sum(len(p._backward_hooks or {}) for p in model.parameters())


def test_import_workbench_stays_light_and_exports_watch():
    code = "import sys, workbench; assert 'torch' not in sys.modules; from workbench import watch; print(watch)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "function watch" in out.stdout


def test_leaving_the_block_removes_every_hook():
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e38)  # diverges, so the module hooks go on too
    from workbench import watch

    w = watch(model, optimizer, say=lambda line: None)
    with w:
        for i, batch in enumerate(batches(3)):
            plain_step(model, optimizer, batch, i, w)
            assert hook_count(model) > 0
    assert hook_count(model) == 0
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    assert not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks


def test_one_host_copy_per_optimizer_step_and_the_run_log(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from host_reads import HostReads  # tests/host_reads.py: every read from workbench code

    before = host.HOST_COPIES
    with HostReads() as reads:
        w = run(plain_step, steps=10, log_path=tmp_path / "mine.h5")
    assert host.HOST_COPIES - before == 10 and reads.outside == []
    record = read_record(tmp_path / "mine.h5")
    assert record.status == "finished" and record.steps == list(range(1, 11))
    assert record.values("loss/total") == pytest.approx(w.record.values("loss/total"))
    assert w.summary()["log_path"] == str(tmp_path / "mine.h5")


def test_findings_print_once_in_one_line():
    lines: list[str] = []
    run(plain_step, make_optimizer=lambda m: torch.optim.SGD(m.features.parameters(), lr=0.1), say=lines.append)
    assert lines == [line for line in lines if "\n" not in line] and len(lines) == 1
    assert lines[0].startswith("watch: step 1: outside_optimizer: 2 trainable tensors")


def test_same_seed_same_numbers():
    a, b = run(plain_step), run(plain_step)
    assert {k: v for k, v in a.record.series.items() if k != "step_ms"} == \
        {k: v for k, v in b.record.series.items() if k != "step_ms"}


def test_errors_name_what_was_wrong():
    from workbench import watch

    class Parameterless(nn.Module):
        pass

    with pytest.raises(ValueError, match="Parameterless has no parameters"):
        watch(Parameterless(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer, got list"):
        watch(Net(), [])
    with pytest.raises(AttributeError, match="nosuch"):
        watch(Net(), torch.optim.SGD(Net().parameters(), lr=0.1), frozen=["nosuch"])
    w = watch(Net(), torch.optim.SGD(Net().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="got int 3: expected a scalar tensor"):
        w.loss(3)


def test_the_workbench_commands_read_a_watch_log(tmp_path, capsys):
    from workbench.cli import main

    run(plain_step, make_optimizer=lambda m: torch.optim.SGD(m.features.parameters(), lr=0.1),
        log_path=tmp_path / "mine.h5")
    main(["trace", str(tmp_path / "mine.h5")])
    out = capsys.readouterr().out
    assert "outcome: stalled" in out
    assert "watch findings: 1\n  step 1: outside_optimizer: 2 trainable tensors received a gradient" in out
    main(["report", str(tmp_path / "mine.h5"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "summary.json").exists()
    table = read_record(tmp_path / "mine.h5").tables["watch"]
    assert [(r["kind"], r["step"]) for r in table] == [("outside_optimizer", 1)]


def test_the_readme_example_runs_as_written(tmp_path):
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from workbench import watch" in b]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("watch: step 1: outside_optimizer: 2 trainable tensors")
    assert "(2.weight, 2.bias)" in lines[0]
    assert lines[-1] == "stalled [('outside_optimizer', 1)]"
    assert (tmp_path / "runs" / "mine.h5").is_file()
