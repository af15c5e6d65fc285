"""A JupyterLab server on loopback for one test, isolated from the user's Jupyter settings, and the pieces
needed to drive it from Debian's Chromium (never a browser downloaded by Playwright).

The server's config, runtime, lab user-settings, workspaces and IPython dirs all live under one temp folder,
so the user's `~/.jupyter` is neither read nor written. The data path is left alone, so the `rnnt-workbench`
kernel (`make install` registers it with --sys-prefix; --user works too) is found exactly as papermill finds it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nbformat
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

CHROMIUM = Path("/usr/bin/chromium")
# Flags Chromium needs on these machines: no sandbox as root, no GPU, and no background network traffic (the
# network is closed; without these it retries refused connections at every start).
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
# Lab user settings for a quiet, deterministic page: no news/update toasts over the screenshot, and every cell
# attached to the DOM (the default windowing mode may detach off-screen cells, which selectors then miss).
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the server is told not to try others)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parameterized_copy(source: Path, dest: Path, parameters: Mapping[str, Any]) -> Path:
    """Write `source` to `dest` with papermill's injected-parameters cell, without executing anything."""
    # papermill's loader adds the cell tags and notebook metadata its parameterizer expects.
    nb = parameterize_notebook(load_notebook_node(str(source)), dict(parameters))
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


@dataclass
class LabServer:
    """A running `jupyter lab` process: `url` (no trailing slash), `token`, its log file and its process."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: Any = field(repr=False, default=None)

    def api(self, path: str, method: str = "GET", timeout: float = 5.0) -> Any:
        """Call the server's REST API (token auth) and return the decoded JSON body (None when empty)."""
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"},
                                         data=b"" if method != "GET" else None)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def page_url(self, relative: str) -> str:
        """The /lab/tree URL that opens `relative` (a path under the server root), with the token."""
        return f"{self.url}/lab/tree/{relative}?token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /api/status until the server answers; fail with its log if it exits or never answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status", timeout=2.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut down kernels and server through the API, then SIGTERM, then SIGKILL; idempotent."""
        try:
            if self.process.poll() is None:
                try:
                    self.api("/api/shutdown", method="POST")
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                for stop, wait in ((None, 15.0), (self.process.terminate, 10.0), (self.process.kill, 5.0)):
                    if stop is not None:
                        stop()
                    try:
                        self.process.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def start_lab(root: Path, state_dir: Path) -> LabServer:
    """Start JupyterLab serving `root` on 127.0.0.1 with a fresh token; Jupyter state goes under `state_dir`.

    Returns once the server answers its REST API. The caller must call `stop()` (also on failure).
    """
    dirs = {name: state_dir / name for name in ("config", "runtime", "settings", "workspaces", "ipython")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    for name, values in LAB_SETTINGS.items():
        target = dirs["settings"] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
           "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]), "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
           "IPYTHONDIR": str(dirs["ipython"]), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    port, token = free_port(), secrets.token_hex(24)
    log_path = state_dir / "jupyterlab.log"
    log = log_path.open("wb")
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        # Nothing reaches out to the network: no extension-manager index, no update or news checks.
        "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root; the server refuses to start otherwise
    process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT)
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, process=process, log_path=log_path, _log=log)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
