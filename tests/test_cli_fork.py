"""The fork server the CLI tests start their commands through (tests/cli_fork.py) ends a command as a fresh
interpreter does (same exit status, stdout and stderr), and goes with its client."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import cli_fork  # tests/cli_fork.py

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples"
pytestmark = pytest.mark.skipif(os.environ.get("WORKBENCH_TEST_EXEC") == "1",
                                reason="WORKBENCH_TEST_EXEC=1: every command is a fresh interpreter, no server")


@pytest.mark.parametrize("args", [["--help"], ["run", "--policy", "gradual"], ["trace", "missing.h5"]])
def test_a_forked_command_ends_as_a_fresh_interpreter_does(args, tmp_path):
    fresh = subprocess.run([*cli_fork.EXEC, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    forked = subprocess.run(cli_fork.command(*args), capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_client_takes_its_command_along(ctc_checkpoint, tmp_path):
    """SIGKILL cannot be passed on: the server kills the command when its client is gone. (SIGTERM and SIGINT,
    which are passed on, are the fault suite's run-sigterm and run-ctrl-c cases.)"""
    cmd = cli_fork.command("run", "--checkpoint", str(ctc_checkpoint), "--data", str(SAMPLE), "--out", "r.h5",
                           "--steps", "400", "--no-trace", "--precision", "fp32")
    server = cli_fork.server_pid()
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "Batch 1/" in line:
            break
    [child] = [c for c in _children(server) if Path(f"/proc/{c}/cwd").resolve() == tmp_path.resolve()]
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 5   # the run has ~400 steps to go: it only ends this soon when killed
    while child in _children(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child not in _children(server)
    proc.communicate(timeout=60)   # its pipes stay open until now, so a closed stdout cannot end it either
