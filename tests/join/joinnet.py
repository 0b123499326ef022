"""Helpers for `meshwg join` tests: a signal server and nodes in plain namespaces on one bridge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scenarios.netns import Netns, unique_name, veth, wait_for

REPO = str(Path(__file__).resolve().parents[2])
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")


class Node:
    def __init__(self, net: "BridgeNet", ns: Netns, ip: str, name: str):
        self.net, self.ns, self.ip, self.name = net, ns, ip, name
        self.iface = unique_name("mj")
        self.state = Path(net.dir) / f"state-{name}"
        self.log = Path(net.dir) / f"join-{name}.log"
        self.proc = None

    def start(self, invite: str, *extra: str) -> None:
        with open(self.log, "ab") as log:
            self.proc = self.ns.popen(PY, "-m", "meshwg", "join", invite, "--name", self.name, "--state-dir",
                                      str(self.state), "--interface", self.iface, *extra, env=ENV, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=REPO)

    def meshwg(self, *args: str) -> subprocess.CompletedProcess:
        """`meshwg ARGS --interface IFACE` in the node's namespace (e.g. `set ...`)."""
        return subprocess.run(self.ns.argv(PY, "-m", "meshwg", *args, "--interface", self.iface),
                              capture_output=True, text=True, env=ENV, cwd=REPO, timeout=20)

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc)
            self.proc = None

    def status(self) -> dict | None:
        res = subprocess.run(self.ns.argv(PY, "-m", "meshwg", "status", "--json", "--interface", self.iface),
                             capture_output=True, env=ENV, cwd=REPO, timeout=10)
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)

    def peer(self, name: str) -> dict | None:
        st = self.status()
        for p in (st or {}).get("peers", []):
            if p["name"] == name:
                return p
        return None

    def mesh_ip(self) -> str | None:
        st = self.status()
        for a in (st or {}).get("addresses", []):
            if ":" not in a:
                return a.split("/")[0]
        return None

    def ping(self, ip: str, count: int = 1, wait: float = 1) -> bool:
        return self.ns.run("ping", "-c", str(count), "-W", str(wait), ip, check=False).find(" 0% packet loss") >= 0

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class BridgeNet:
    """A server namespace holding a bridge (10.N.0.1/24); nodes plug in as 10.N.0.k."""

    def __init__(self, n: int):
        self.n = n
        self.dir = tempfile.mkdtemp(prefix="meshwg-join-")
        self.spaces: list[Netns] = []
        self.srv = self._ns("mjs")
        self.srv.run("ip", "link", "add", "br0", "type", "bridge")
        self.srv.run("ip", "addr", "add", f"10.{n}.0.1/24", "dev", "br0")
        self.srv.run("ip", "addr", "add", f"10.{n}.0.254/24", "dev", "br0")
        self.srv.run("ip", "link", "set", "br0", "up")
        self.nodes: list[Node] = []
        self.server = None
        self.invite = None
        self._k = 2

    def _ns(self, prefix: str) -> Netns:
        ns = Netns(prefix)
        self.spaces.append(ns)
        return ns

    def node(self, name: str) -> Node:
        ns = self._ns("mjn")
        ip = f"10.{self.n}.0.{self._k}"
        self._k += 1
        port = unique_name("p")
        veth(self.srv, port, [], ns, "eth0", [f"{ip}/24"])
        self.srv.run("ip", "link", "set", port, "master", "br0")
        node = Node(self, ns, ip, name)
        self.nodes.append(node)
        return node

    @property
    def db(self) -> str:
        return os.path.join(self.dir, "signal.db")

    def signal(self, *args: str) -> subprocess.CompletedProcess:
        """`meshwg-signal ARGS --db DB` in the server's namespace."""
        return subprocess.run(self.srv.argv(PY, "-m", "signal_server", *args, "--db", self.db), capture_output=True,
                              text=True, env=ENV, cwd=REPO, timeout=30)

    def start_server(self, *extra: str) -> str:
        """Serve (extra: more `serve` flags, e.g. --policy FILE); returns the reusable invite."""
        db = self.db
        ip1, ip2 = f"10.{self.n}.0.1", f"10.{self.n}.0.254"
        with open(os.path.join(self.dir, "signal.log"), "ab") as log:
            self.server = self.srv.popen(PY, "-m", "signal_server", "serve", "--init", "--db", db, "--listen", f"{ip1}:7300",
                                         "--udp", f"{ip1}:3478", "--udp", f"{ip2}:3478", "--relay-tcp",
                                         f"{ip1}:7301", *extra, env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: ":7300" in self.srv.run("ss", "-tln"), timeout=15, what="signal server listening")
        if self.invite is None:
            out = subprocess.run(self.srv.argv(PY, "-m", "signal_server", "invite", "create", "--reusable", "--db", db,
                                               "--addr", f"{ip1}:7300"), capture_output=True, env=ENV, cwd=REPO,
                                 check=True)
            self.invite = out.stdout.decode().strip().splitlines()[-1]
        return self.invite

    def stop_server(self) -> None:
        if self.server is not None:
            self.srv.stop(self.server)
            self.server = None

    def print_logs(self) -> None:
        """Every node's log tail (a failed test's output)."""
        for n in self.nodes:
            print(f"---- {n.name}\n{n.log_text()}")

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.stop_server()
        for ns in reversed(self.spaces):
            ns.close()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)
