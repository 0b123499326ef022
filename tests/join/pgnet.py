"""A BridgeNet with several `meshwg-signal serve` processes on one throwaway PostgreSQL cluster (issue 14 item 2):
the cluster listens on a unix socket in its temporary directory (reachable from every namespace: a path, not a
network address), each server in the server namespace on its own address of the bridge."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
from pathlib import Path

from joinnet import ENV, PY, REPO, BridgeNet
from scenarios.netns import wait_for


def _pg_cluster_module():
    path = Path(__file__).resolve().parents[1] / "signal" / "pg_cluster.py"
    spec = importlib.util.spec_from_file_location("_meshwg_pg_cluster", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class PgBridgeNet(BridgeNet):
    """Servers on 10.N.0.1, 10.N.0.254 (the bridge's two addresses), each with its own admin socket."""

    def __init__(self, n: int):
        super().__init__(n)
        self.cluster = _pg_cluster_module().Cluster()
        self.servers: dict[str, subprocess.Popen] = {}
        try:
            self.cluster.start()
            self.url = self.cluster.create_db()
        except BaseException:
            self.close()
            raise

    @property
    def db(self) -> str:
        return self.url

    def start_pg_server(self, ip: str, init: bool = False) -> str:
        """`serve` on ip (control 7300, STUN/relay 3478, relay TCP 7301); returns its control address."""
        log = open(os.path.join(self.dir, f"signal-{ip}.log"), "ab")
        with log:
            self.servers[ip] = self.srv.popen(
                PY, "-m", "signal_server", "serve", *(["--init"] if init else []), "--db", self.url,
                "--listen", f"{ip}:7300", "--udp", f"{ip}:3478", "--relay-tcp", f"{ip}:7301", "--plain-udp", "none",
                "--admin-socket", os.path.join(self.dir, f"admin-{ip}.sock"),
                env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: f"{ip}:7300" in self.srv.run("ss", "-tln"), timeout=15, what=f"signal server on {ip}")
        return f"{ip}:7300"

    def kill_server(self, ip: str) -> None:
        """kill -9 by PID (no clean shutdown: its record stays in the database until it goes stale)."""
        proc = self.servers.pop(ip)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.srv.stop(proc)  # forgets it (already dead)

    def invite_for(self, *addrs: str) -> str:
        """A reusable invite through the CLI on the database (no admin socket): --addr each of addrs, or none
        given: the default, every running server."""
        args = [a for addr in addrs for a in ("--addr", addr)]
        out = subprocess.run(self.srv.argv(PY, "-m", "signal_server", "invite", "create", "--reusable", "--db", self.url,
                                           "--admin-socket", "none", *args),
                             capture_output=True, env=ENV, cwd=REPO, check=True, timeout=30)
        return out.stdout.decode().strip().splitlines()[-1]

    def node_records(self) -> list[dict]:
        import json

        out = subprocess.run(self.srv.argv(PY, "-m", "signal_server", "nodes", "list", "--json", "--db", self.url,
                                           "--admin-socket", "none"),
                             capture_output=True, env=ENV, cwd=REPO, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else []

    def print_logs(self) -> None:
        super().print_logs()
        for name in sorted(os.listdir(self.dir)):
            if name.startswith("signal-"):
                print(f"---- {name}\n{Path(self.dir, name).read_text(errors='replace')[-3000:]}")

    def close(self) -> None:
        for node in self.nodes:  # before their servers: a node's leave-on-exit has no server to hear it anyway
            node.stop()
        for proc in list(self.servers.values()):
            self.srv.stop(proc)
        self.servers.clear()
        try:
            super().close()
        finally:
            self.cluster.stop()
