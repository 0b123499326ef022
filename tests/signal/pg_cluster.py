"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl from the Debian package (/usr/lib/postgresql/*/bin) in a
temporary directory, listening only on a unix socket there (no TCP port, nothing system-wide), run as the postgres
user when we are root (initdb refuses root). Stopped with `pg_ctl stop -m immediate` (its own PID file, never a
process name) and removed at the end, also when a test failed.

A missing PostgreSQL or psycopg fails the test (never skips), as require_real_components does: scripts/setup
installs both, and a skip would let CI pass without testing the backend."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

PG_GLOB = "/usr/lib/postgresql/*/bin"
USER = "postgres"


def pg_bindir() -> str:
    """The newest installed server's bin directory; fails the test when there is none."""
    found = sorted((d for d in glob.glob(PG_GLOB) if os.path.exists(os.path.join(d, "initdb"))),
                   key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    if not found:
        pytest.fail(f"missing real component: PostgreSQL ({PG_GLOB}/initdb; scripts/setup installs the "
                    "postgresql package)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("missing psycopg (scripts/setup installs the `postgres` extra: pip install -e '.[postgres]')")
    return found[-1]


class Cluster:
    """One running cluster; url(db) names a database on it (created by create_db)."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.dir = tempfile.mkdtemp(prefix="meshwg-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "log")
        self._names = itertools.count(1)
        self.started = False
        self._as_user: dict = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam(USER)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        res = subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]], capture_output=True, text=True,
                             timeout=timeout, cwd=self.dir, **self._as_user)
        if res.returncode != 0:
            log = open(self.log).read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): {res.stderr.strip()}\n{log}")

    def start(self) -> "Cluster":
        self._run("initdb", "-D", self.data, "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync")
        # Unix socket in our directory only; fsync off: a test cluster need not survive power loss.
        self.started = True  # from here on stop() must run pg_ctl stop, even if start fails half-way
        self.resume()
        return self

    def resume(self) -> None:
        """Start the initialised cluster (again, after halt())."""
        opts = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c max_connections=60"
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", opts, "start", timeout=90.0)

    def halt(self, mode: str = "fast") -> None:
        """Stop the server under its clients (an outage); resume() starts it again on the same data."""
        self._run("pg_ctl", "-D", self.data, "-w", "-t", "30", "stop", "-m", mode)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@/{db}?host={self.dir}"

    def create_db(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started and os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._run("pg_ctl", "-D", self.data, "-w", "-t", "30", "stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)



@pytest.fixture(scope="session")
def pg_cluster():
    """The session's cluster (started on first use; stopped and removed when the session ends)."""
    cluster = Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh empty database on the session's cluster."""
    return pg_cluster.create_db()
