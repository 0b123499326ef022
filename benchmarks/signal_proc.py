"""A real `meshwg-signal serve` process on loopback for the benchmarks: started, waited for, invited, removed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ENV = dict(os.environ, PYTHONPATH=REPO)


def free_port(kind=socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SignalProcess:
    """`with SignalProcess([...serve args...]) as srv:` srv.proc, srv.db, srv.invite_text, srv.log_path.

    The control address (`--listen`) is chosen here; `args` adds the rest. `nofile`: the server's
    descriptor limit, soft and hard (so it stays a limit: `serve` raises its soft limit to the hard one).
    """

    def __init__(self, args: list[str], *, host: str = "127.0.0.1", nofile: int | None = None,
                 log_level: str = "info", db: str | None = None, init: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="meshwg-bench-")
        # `db`: a PostgreSQL URL (several servers on one database: each its own admin socket); default a SQLite file
        self.db = db or os.path.join(self.dir, "signal.db")
        self.sock = ["--admin-socket", os.path.join(self.dir, "admin.sock")] if db else []
        self.log_path = os.path.join(self.dir, "signal.log")
        self.control = (host, free_port(host=host))
        self.argv = [sys.executable, "-m", "signal_server", "serve", *(["--init"] if init else []), "--db", self.db,
                     *self.sock, "--listen", f"{host}:{self.control[1]}", "--log-level", log_level, *args]
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        self.invite_text = ""

    def __enter__(self) -> "SignalProcess":
        import resource

        limit = self.nofile
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO,
                preexec_fn=None if limit is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
        try:
            self._wait_listening(15.0)
            self.invite_text = self.admin("invite", "create", "--reusable", "--addr",
                                          f"{self.control[0]}:{self.control[1]}").strip().splitlines()[-1]
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(self.control, timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the signal server did not start; see {self.log_path}") from None
                time.sleep(0.05)

    def admin(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "signal_server", *args, "--db", self.db, *self.sock],
                              capture_output=True,
                              text=True, check=True, env=ENV, cwd=REPO).stdout

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
