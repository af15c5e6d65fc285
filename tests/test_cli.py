"""Command-line contract: --help on every subcommand, one clear line and a non-zero exit on bad input, one line for
a failure during a run, --debug, and checkpoint errors. The fault-injection cases are in test_faults.py."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cli_fork  # tests/cli_fork.py: `python -m workbench` without its imports each time

from workbench.cli import CliError, _parameter, build_parser, check_device, main
from workbench.model import get_config
from workbench.records.runlog import RunLogError
from workbench.train.checkpoint import CheckpointError, check_checkpoint, load_checkpoint

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples"
SUBCOMMANDS = ["synth", "validate", "train", "pretrain", "run", "sweep", "trace", "report", "notebooks", "diagnose"]


def _run(*args, timeout=120):
    return subprocess.run(cli_fork.command(*args), capture_output=True, text=True,
                          timeout=timeout)


def test_every_subcommand_is_registered_with_help():
    parser = build_parser()
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


@pytest.mark.slow
def test_validate_summarises_the_sample():
    proc = _run("validate", str(SAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 6


@pytest.mark.slow
def test_validate_names_the_bad_file(tmp_path):
    bad = tmp_path / "t15.2023.08.11" / "data_train.hdf5"
    bad.parent.mkdir()
    bad.write_text("not hdf5")
    proc = _run("validate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["notebooks", "--out", "x", "--only", "99"], "no notebook matches"),
    (["run", "--checkpoint", "missing.pt", "--out", "{tmp}/r.h5"], "missing.pt"),
    (["run", "--checkpoint", "x.pt", "--out", "r.h5", "--freeze-steps", "-1"],
     "--freeze-steps: expected an integer >= 0"),
    (["run", "--checkpoint", "x.pt", "--out", "r.h5", "--policy", "gradual"], "--policy: expected one of none,"),
    (["run", "--checkpoint", "x.pt", "--out", "r.h5", "--precision", "fp8"], "--precision: expected one of fp32,"),
    (["trace", "{tmp}/nothing.h5"], "nothing.h5"),
])
def test_bad_arguments_get_one_clear_line(tmp_path, args, message):
    proc = _run(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2
    assert message in proc.stderr


def test_parameter_parsing():
    assert _parameter("warmup_lengths=[1, 3]") == ("warmup_lengths", [1, 3])
    assert _parameter("preset=tiny") == ("preset", "tiny")
    assert _parameter("lr=1e-4") == ("lr", 1e-4)


def test_check_device():
    assert check_device("--device", "auto") == "auto" and check_device("--device", "cpu") == "cpu"
    with pytest.raises(CliError, match="--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        check_device("--device", "gpu")
    with pytest.raises(CliError, match="'cuda:99'"):
        check_device("--device", "cuda:99")


def _record():
    """What the run command's progress line reads from a record after step 1."""
    return SimpleNamespace(losses={"total": [1.0], "ctc": [1.0]}, values=lambda key: [False])


def _run_args(checkpoint, out, *extra):
    return ["run", "--checkpoint", str(checkpoint), "--data", str(SAMPLE), "--out", str(out), "--steps", "2",
            "--precision", "fp32", *extra]


@pytest.mark.parametrize("raised, code, line", [
    (RuntimeError("boom\nsecond line"), 1, "error: run failed at step 1 of 2: RuntimeError: boom second line; "),
    (KeyboardInterrupt(), 130, "error: run interrupted by Ctrl-C at step 1 of 2; "),
    (signal.SIGTERM, 143, "error: run interrupted by SIGTERM at step 1 of 2; "),
])
def test_a_failure_during_a_run_is_one_line_and_overwrite_keeps_the_old_file(
        ctc_checkpoint, tmp_path, monkeypatch, capsys, raised, code, line):
    out = tmp_path / "r.h5"
    out.write_text("the old log")
    seen = []

    def failing_run(checkpoint, data, settings, *, log_path, on_step, **kwargs):
        seen.append(Path(log_path))
        Path(log_path).write_text("a new log")
        on_step(1, _record())
        if raised is signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)
        raise raised

    monkeypatch.setattr("workbench.run.joint.run_joint", failing_run)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(_run_args(ctc_checkpoint, out, "--overwrite")) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line) and err.endswith(f"{out} left as it was\n")
    assert out.read_text() == "the old log" and seen[0] != out and not seen[0].exists()
    assert signal.getsignal(signal.SIGTERM) is handler


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "text.h5").write_text("not a run log")
    with pytest.raises(RunLogError):
        main(["--debug", "trace", str(tmp_path / "text.h5")])


def test_checkpoint_errors_name_the_file_in_one_line(ctc_checkpoint, tmp_path):
    (tmp_path / "text.pt").write_text("notes")
    (tmp_path / "cut.pt").write_bytes(ctc_checkpoint.read_bytes()[:2000])
    torch.save([1, 2], tmp_path / "list.pt")
    for name, got in [("text.pt", "not a torch zip archive"), ("cut.pt", "truncated"),
                      ("list.pt", "a torch file holding a list")]:
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(tmp_path / name)
        assert str(exc.value).startswith(f"{tmp_path / name}: expected a workbench checkpoint")
        assert got in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CheckpointError, match="model_config: expected the 'small' preset, got the 'tiny' preset"):
        check_checkpoint(ctc_checkpoint, get_config("small"))
    with pytest.raises(CheckpointError, match="stage: expected one of joint, got 'ctc_warmup'"):
        check_checkpoint(ctc_checkpoint, stages=("joint",))


@pytest.mark.slow
def test_notebooks_run_from_a_wheel_outside_the_repository(tmp_path):
    """The wheel route as far as this machine allows: `pip wheel . --no-deps` from a copy of the checkout (the
    wheel holds the notebooks, the sample data and py.typed), installed into a fresh venv whose dependencies are
    seen through a .pth line that puts .venv's site-packages on the path (torch is not downloaded again; .venv's
    own .pth hooks, its editable install among them, are not run), then `workbench notebooks --only 03` in an
    empty folder outside the checkout, on the venv's own interpreter (no kernel registered for it)."""
    import sysconfig
    import zipfile

    root = Path(__file__).resolve().parents[1]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        (checkout / name).write_bytes((root / name).read_bytes())
    for name in ("workbench", "notebooks", "data_samples"):
        shutil.copytree(root / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # ahead of the venv's own packages, whose bundled setuptools is too old to build a wheel (no network here)
    (Path(site) / "dot_venv.pth").write_text(f"import sys; sys.path.insert(1, {sysconfig.get_paths()['purelib']!r})\n")
    # the data files pip would have put in the venv's share/jupyter (nbconvert's templates), but not .venv's
    # kernels: the rnnt-workbench kernel stays unregistered here
    (venv / "share" / "jupyter").mkdir(parents=True)
    (venv / "share" / "jupyter" / "nbconvert").symlink_to(Path(sys.prefix) / "share" / "jupyter" / "nbconvert")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1"}
    build = subprocess.run([str(python), "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist")], cwd=checkout, capture_output=True, text=True, timeout=300,
                           env=env)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("rnnt_workbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"workbench/shipped/{p.relative_to(root).as_posix()}" for folder in ("notebooks", "data_samples")
                for p in (root / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert expected <= names, sorted(expected - names)
    assert "workbench/py.typed" in names
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", str(wheel)], capture_output=True,
                             text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import workbench; print(workbench.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=120, env=env).stdout
    assert where.startswith(site), where
    proc = subprocess.run([str(venv / "bin" / "workbench"), "notebooks", "--only", "03", "--preset", "tiny",
                           "--out", "nb"], cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"kernel: this interpreter, {python}" in proc.stdout, proc.stdout
    assert (elsewhere / "nb" / "03_interactive_explorer.ipynb").is_file()
    summary = elsewhere / "nb" / "03_interactive_explorer" / "03_summary.json"
    assert summary.is_file(), sorted(p.name for p in (elsewhere / "nb").rglob("*"))
    assert not (elsewhere / "data_samples").exists()   # the notebook read the wheel's sample data


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_parameters_accept_their_defaults_and_refuse_wrong_types(notebook):
    from workbench.views.notebook import NotebookError, check_parameters, declared_parameters

    declared = declared_parameters(notebook)
    check_parameters(notebook, declared)  # every default passes its own check
    check_parameters(notebook, {"preset": "tiny", "seed": 3, "output_dir": "runs/x"})
    for wrong in ({"nosuchparam": 3}, {"seed": "zero"}, {"seed": -1}, {"preset": "huge"}, {"overwrite": 1},
                  {"preset": ["tiny"]}):
        with pytest.raises(NotebookError, match=f"^{next(iter(wrong))}"):
            check_parameters(notebook, wrong)
    if "seeds" in declared:
        check_parameters(notebook, {"seeds": 2})
        with pytest.raises(NotebookError, match=r"^seeds \(.*\): expected a number of seeds >= 1, got 'zero'"):
            check_parameters(notebook, {"seeds": "zero"})
    if declared.get("freeze_steps", 0) is None:  # a list of freeze lengths
        check_parameters(notebook, {"freeze_steps": [0, 2]})
        with pytest.raises(NotebookError, match="freeze_steps .*expected a non-empty JSON list"):
            check_parameters(notebook, {"freeze_steps": "[1,2"})


def test_malformed_json_parameter_is_refused():
    import argparse

    assert _parameter("freeze_steps=[1, 2]") == ("freeze_steps", [1, 2])
    assert _parameter("data=/some/path") == ("data", "/some/path")
    with pytest.raises(argparse.ArgumentTypeError, match="freeze_steps: expected a JSON value, got '\\[1,2'"):
        _parameter("freeze_steps=[1,2")
