"""Command-line contract: --help on every subcommand, one clear line and a non-zero exit on bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import _parameter, build_parser

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples"
SUBCOMMANDS = ["synth", "validate", "train", "pretrain", "run", "sweep", "trace", "report", "notebooks"]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True,
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
