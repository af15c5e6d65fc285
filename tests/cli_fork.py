"""`python -m workbench ARGS` as its own process, without paying the imports every time.

Each command a test starts spends ~2-3 s importing torch, h5py and (at its first optimizer) torch._dynamo before it
reads its first argument, and the fault suite alone starts ~70. `command(*args)` is the command line to give
subprocess instead of `[sys.executable, "-m", "workbench", *args]`: this file run as a small client (`python -I -S`,
stdlib only, ~20 ms) that asks a server to fork the command. The server (one per test process, started at the first
call) did those imports once and waits on a Unix socket; a forked child takes the client's stdin, stdout and stderr
(passed as file descriptors), working directory, environment and argv, and runs `workbench` as `python -m` does
(runpy), ending as that interpreter would (exit status, uncaught exception, SIGINT's KeyboardInterrupt). The client
waits for it and ends the same way (a child killed by a signal: the client kills itself with that signal), and
passes SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 on. A client killed outright (SIGKILL) cannot pass that on: the
server then kills the child at once, but a test that must know the command is gone when its process is (SIGKILL,
a Ctrl-C to a whole process group) uses `EXEC`, the plain command line.

What differs from a fresh interpreter: the environment variables read only at interpreter or torch start-up
(PYTHON*, OMP_NUM_THREADS) are the server's. `WORKBENCH_TEST_EXEC=1` makes `command` return the plain command line
for every test (a fresh interpreter per command).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

EXEC = [sys.executable, "-m", "workbench"]
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_server: tuple | None = None   # the server's Popen and socket path, once started


def command(*args: str) -> list[str]:
    """The command line running `workbench *args` through this test process's fork server."""
    if os.environ.get("WORKBENCH_TEST_EXEC") == "1":
        return [*EXEC, *args]
    return [sys.executable, "-I", "-S", __file__, _start(), *args]


def server_pid() -> int:
    """The pid of this process's server (started if it is not yet): the commands are its children."""
    _start()
    return _server[0].pid


def _start() -> str:
    """The socket path of this process's server, started (and waited for) at the first call."""
    global _server
    if _server is None:
        import atexit
        import shutil
        import subprocess
        import tempfile

        folder = tempfile.mkdtemp(prefix="wb-fork-")
        path = os.path.join(folder, "socket")
        proc = subprocess.Popen([sys.executable, __file__, "--serve", path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", "the fork server did not start"

        def stop() -> None:
            proc.kill()
            proc.wait()
            shutil.rmtree(folder, ignore_errors=True)
        atexit.register(stop)
        _server = (proc, path)
    return _server[1]


# ----------------------------------------------------------------------------------------------------- server

def _serve(path: str) -> dict:
    """Fork a child per request until stdin closes; returns only in a child, with its request."""
    # what the commands import, so that no child does (torch._dynamo: torch's first optimizer step)
    import h5py  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torchaudio  # noqa: F401

    import workbench.cli  # noqa: F401
    import workbench.run.joint  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    clients: dict[int, socket.socket] = {}   # child pid -> its client's connection
    while True:
        ready, _, _ = select.select([listener, sys.stdin, *clients.values()], [], [], 0.02)
        if sys.stdin in ready:
            for pid in clients:
                os.kill(pid, signal.SIGKILL)
            sys.exit(0)
        for pid, conn in list(clients.items()):
            if conn in ready:   # a client sends nothing after its request: it is gone before its child
                os.kill(pid, signal.SIGKILL)
        while clients:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = clients.pop(pid)
            try:
                conn.send(b"exit %d" % status)
            except OSError:
                pass
            conn.close()
        if listener in ready:
            conn, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in clients.values():
                    other.close()
                conn.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return json.loads(data)
            for fd in fds:
                os.close(fd)
            conn.send(b"pid %d" % pid)
            clients[pid] = conn


def _run_command(request: dict) -> None:
    """In the forked child: become `python -m workbench ARGS` run in the client's folder and environment, and end
    as that interpreter ends: non-daemon threads joined, atexit functions run, standard streams flushed, the exit
    status of its SystemExit, 1 after an uncaught exception's traceback, killed by SIGINT after an uncaught
    KeyboardInterrupt. Then it leaves at once: tearing down modules after torch and torch._dynamo takes ~1.5 s and
    is all a fresh interpreter would do besides."""
    import atexit
    import runpy
    import threading

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["workbench", *request["argv"]]
    sys.path[0] = request["cwd"]   # as `python -m` has it
    code, interrupted = 0, False
    try:
        runpy.run_module("workbench", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:  # what the interpreter would print, and how it would end
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code, interrupted = 1, isinstance(exc, KeyboardInterrupt)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


# ----------------------------------------------------------------------------------------------------- client

def _client(path: str, argv: list[str]) -> None:
    child: list[int] = []
    pending: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        if child:
            os.kill(child[0], sig)
        else:
            pending.append(sig)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
    status = None
    while status is None:
        message = sock.recv(64)
        if not message:
            sys.exit("workbench fork server: connection lost")
        word, number = message.split()
        if word == b"pid":
            child.append(int(number))
            for sig in pending:
                os.kill(child[0], sig)
        else:
            status = int(number)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _run_command(_serve(sys.argv[2]))   # returns only in a forked child, which then ends as the command
    else:
        _client(sys.argv[1], sys.argv[2:])
