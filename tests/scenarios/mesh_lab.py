"""A live mesh in the NAT lab for scenario tests: the signal server and `meshwg join` nodes that a test
starts, stops and restarts one by one (scenarios.runner runs a whole scenario in one go instead).

Command lines come from scenarios/node_commands.py, so the tests run exactly what the runner runs.
Times are wall-clock (time.time()) so they compare with the nodes' log timestamps and `ping -D`.
Status is read from the agent's status socket (the same JSON `meshwg status --json` prints): it sits
in the host's private /run/wireguard directory, reachable from the test process without spawning a
Python per query, which keeps polling fine-grained on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from meshwg import logfmt
from meshwg.signaling import relay_wire
from meshwg.io.ipc import status_server
from meshwg.mesh import demux
from scenarios import node_commands as nc
from scenarios.nat import NatType
from scenarios.netns import wait_for
from scenarios.runner import create_invite, read_tail, start_signal_server
from scenarios.topology import Host, Lab
from signal_server.metrics import parse_text

LOG_LINES = 30             # of each log printed after a failed test
METRICS_PORT = 9300
_TS = re.compile(rf"^({logfmt.TIMESTAMP_PATTERN}) ")


def log_times(path: Path, pattern: str, after: float = 0.0) -> list[float]:
    """Wall times of the log lines matching `pattern` (meshwg.logfmt's timestamps), at or after `after`."""
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _TS.match(line)
        if m and re.search(pattern, line):
            t = logfmt.parse_timestamp(m.group(1))
            if t >= after:
                out.append(t)
    return out


def wait_until(predicate, timeout: float, interval: float = 0.02):
    """Poll until predicate() is truthy; return (value, wall time it became true) or (None, None)."""
    try:
        return wait_for(predicate, timeout, interval), time.time()
    except TimeoutError:
        return None, None


class Pinger:
    """`ping -D -i INTERVAL` from a host to an address in the background; keeps the reply times.

    ping exits at once while the host has no route to the address yet, so it is restarted until
    stopped: the first reply time is then precise to one interval.
    """

    _REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")

    def __init__(self, host: Host, ip: str, interval: float = 0.1):
        self.host, self.ip, self.interval = host, ip, interval
        self.replies: list[float] = []
        self.seqs: list[tuple[float, int, int]] = []    # (reply time, which ping process, icmp_seq)
        self.sent_since: float | None = None
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Pinger":
        self.sent_since = time.time()
        self._thread.start()
        return self

    def _run(self) -> None:
        run = 0
        while not self._stop.is_set():
            run += 1
            proc = self.host.popen("ping", "-D", "-n", "-i", str(self.interval), self.ip,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._proc = proc
            for line in proc.stdout:
                m = self._REPLY.match(line)
                if m:
                    self.replies.append(float(m.group(1)))
                    self.seqs.append((float(m.group(1)), run, int(m.group(2))))
            proc.wait()
            if not self._stop.is_set():
                self.host.stop(proc)
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self.host.stop(self._proc)
        self._thread.join(10)

    def first_reply(self, after: float = 0.0) -> float | None:
        return next((t for t in self.replies if t >= after), None)

    def count(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.replies if t0 <= t <= t1)

    def lost(self, t0: float, t1: float) -> tuple[int, int]:
        """(unanswered, sent) among the pings whose neighbours were answered within [t0, t1]: gaps in
        icmp_seq, so a pinger slower than its interval (a loaded machine) does not count as loss."""
        lost = sent = 0
        for run in {r for t, r, _ in self.seqs if t0 <= t <= t1}:
            seqs = [q for t, r, q in self.seqs if r == run and t0 <= t <= t1]
            sent += max(seqs) - min(seqs) + 1
            lost += max(seqs) - min(seqs) + 1 - len(set(seqs))
        return lost, sent

    def longest_gap(self, t0: float, t1: float) -> tuple[float, float]:
        """(start, end) of the longest stretch within [t0, t1] without a reply (the edges count)."""
        marks = [t0] + [t for t in self.replies if t0 < t < t1] + [t1]
        return max(zip(marks, marks[1:]), key=lambda span: span[1] - span[0])

    def max_gap(self, t0: float, t1: float) -> float:
        start, end = self.longest_gap(t0, t1)
        return end - start


def read_pcap(path: Path) -> list[tuple[float, str, int, str, int, bytes]]:
    """(time, src ip, src port, dst ip, dst port, UDP payload) of the IPv4/UDP frames in a pcap file
    (tcpdump -w on an Ethernet interface); anything else is skipped."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    endian = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    out, off = [], 24
    while off + 16 <= len(data):
        sec, usec, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        ip = frame[14:]
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        sport, dport, ulen = struct.unpack("!HHH", ip[ihl:ihl + 6])
        out.append((sec + usec / 1e6, src, sport, dst, dport, bytes(ip[ihl + 8:ihl + ulen])))
    return out


SEND_HEADER = len(relay_wire.MAGIC) + 1 + relay_wire.TOKEN_LEN + 32   # MAGIC, type, token, destination key


def relayed_kind(payload: bytes) -> str | None:
    """What a node asked the relay to forward, from a SEND frame seen on the wire: 'data' (a WireGuard
    transport message with a payload), 'keepalive', 'handshake', 'disco' or 'other'; None if not a SEND.
    The relay cannot read WireGuard payloads, but the message type and size are visible, as to any relay."""
    if not payload.startswith(relay_wire.MAGIC) or len(payload) <= SEND_HEADER or payload[4] != relay_wire.T_SEND:
        return None
    inner = payload[SEND_HEADER:]
    kind = demux.classify(inner)
    if kind == demux.WIREGUARD:
        if inner[0] == 4:
            return "keepalive" if len(inner) == 32 else "data"
        return "handshake"
    return "disco" if kind == demux.DISCO else "other"


class RelayCapture:
    """tcpdump on the signal host's interface, UDP to the relay port only; classifies what nodes relay."""

    def __init__(self, host: Host, port: int = nc.STUN_PORT):
        self.host, self.port = host, port
        self.path = host.dir / f"relay-{time.monotonic_ns()}.pcap"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RelayCapture":
        self.proc = self.host.popen("tcpdump", "-i", "eth0", "-U", "-n", "-s", "2048", "-w", str(self.path),
                                    "udp", "and", "dst", "port", str(self.port),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self.proc.stderr.readline().decode(errors="replace")   # "listening on eth0 ..." once capturing
        assert "listening" in line, f"tcpdump did not start: {line}"
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)   # let the last frames be written
        self.host.stop(self.proc)

    def sends(self, src_ips: set[str] | None = None) -> dict[str, int]:
        """Count of relayed messages by kind (see relayed_kind), optionally only from `src_ips`."""
        counts: dict[str, int] = {}
        for _, src, _, _, _, payload in read_pcap(self.path):
            kind = relayed_kind(payload)
            if kind and (src_ips is None or src in src_ips):
                counts[kind] = counts.get(kind, 0) + 1
        return counts


class MeshNode:
    """One `meshwg join` on its own host behind its own NAT router."""

    def __init__(self, mesh: "MeshLab", name: str, host: Host):
        self.mesh, self.name, self.host = mesh, name, host
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.log = host.dir / "join.log"
        self.run_dir = str(host.dir / "run" / "wireguard")

    @property
    def router(self):
        return self.host.router

    def start(self, *extra: str) -> None:
        values = nc.node_values(self.host, self.mesh.invite)
        with open(self.log, "ab") as log:
            self.started_at = time.time()
            self.proc = self.host.popen(*nc.command("join", **values), *extra, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None:
            self.host.stop(self.proc)
            self.proc = None

    def status(self) -> dict | None:
        """The agent's status (None while it does not answer)."""
        try:
            st = status_server.query(nc.MESH_IF, {"op": "status"}, run_dir=self.run_dir, timeout=5)
        except (OSError, ValueError):
            return None
        return None if "error" in st else st

    def status_cli(self) -> dict:
        """`meshwg status --json`, the command a user runs."""
        res = self.host.run_proc(*nc.command("status", **nc.node_values(self.host)), timeout=20)
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        return json.loads(res.stdout)

    def peer(self, name: str, st: dict | None = None) -> dict | None:
        st = st if st is not None else self.status()
        return next((p for p in (st or {}).get("peers", []) if p["name"] == name), None)

    def mesh_ip(self) -> str | None:
        st = self.status()
        return nc.bare_ipv4((st or {}).get("addresses") or [])

    def ping(self, ip: str, count: int = 1, wait: float = 1.0, interval: float = 0.2) -> bool:
        """True when every one of `count` pings was answered."""
        return self.host.run_proc("ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait), ip,
                                  timeout=count * interval + wait + 10).returncode == 0

    def log_times(self, pattern: str, after: float = 0.0) -> list[float]:
        return log_times(self.log, pattern, after)

    def joined_at(self, after: float = 0.0) -> float | None:
        times = self.log_times(r"joined as ", after)
        return times[0] if times else None

    def log_tail(self) -> str:
        return read_tail(self.log, LOG_LINES)


class MeshLab:
    """A signal host (server with /metrics) plus nodes, each behind its own NAT router, in `lab`."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.signal = lab.public_host("signal", extra_addrs=1)
        self.db = nc.signal_values(self.signal)["db"]
        self.server: subprocess.Popen | None = None
        self.invite: str | None = None
        self.nodes: dict[str, MeshNode] = {}

    def start_server(self) -> None:
        self.server = start_signal_server(self.signal, "--metrics", f"{self.signal.addr}:{METRICS_PORT}")
        if self.invite is None:
            self.invite = create_invite(self.signal)

    def stop_server(self) -> None:
        if self.server is not None:
            self.signal.stop(self.server)
            self.server = None

    def server_log(self) -> str:
        return read_tail(self.signal.dir / "signal.log", LOG_LINES)

    def metrics(self) -> dict[str, float]:
        out = self.signal.run("curl", "-sf", "--max-time", "5", f"http://{self.signal.addr}:{METRICS_PORT}/metrics")
        return parse_text(out)

    def forwarded_packets(self) -> int:
        return int(self.metrics().get("meshwg_signal_forwarded_packets_total", 0))

    def admin(self, *args: str) -> str:
        """`meshwg-signal ARGS --db DB` on the signal host (the admin CLI works on the server's DB file)."""
        return self.signal.run(nc.PY, "-m", "signal_server", *args, "--db", str(self.db))

    def add_node(self, name: str, nat: NatType, start: bool = True) -> MeshNode:
        host = self.lab.host(name, self.lab.router(f"r-{name}", nat))
        node = MeshNode(self, name, host)
        self.nodes[name] = node
        if start:
            node.start()
        return node

    def logs(self) -> str:
        parts = [f"---- signal\n{self.server_log()}"]
        parts += [f"---- {n.name}\n{n.log_tail()}" for n in self.nodes.values()]
        return "\n".join(parts)


# -- shared by the lab test modules ----------------------------------------------------------------

def key_tag(node: MeshNode, peer: MeshNode) -> str:
    """How `node` names `peer` in its log lines (its name, as a pattern)."""
    return re.escape(node.peer(peer.name)["name"])


def path_log(node: MeshNode, peer: MeshNode, after: float = 0.0) -> list[tuple[float, str]]:
    """(wall time, 'direct' | 'relay') of every path change `node` logged for `peer` after `after`."""
    t = key_tag(node, peer)
    out = [(x, "direct") for x in node.log_times(rf"peer {t}: path -> (?!relay)", after)]
    out += [(x, "relay") for x in node.log_times(rf"peer {t}: path -> relay", after)]
    return sorted(out)


def path_times(node: MeshNode, peer: MeshNode, to: str, after: float = 0.0) -> list[float]:
    """When `node` changed its path for `peer` to `to` ('direct' or 'relay'), after `after`."""
    return [t for t, kind in path_log(node, peer, after) if kind == to]


def paths(x: MeshNode, y: MeshNode) -> tuple:
    """(x's path to y, y's path to x): 'direct', 'relay' or None while unknown."""
    px, py = x.peer(y.name), y.peer(x.name)
    return (px and px["path"], py and py["path"])


def tunnel_report(x: MeshNode, y: MeshNode) -> str:
    """The WireGuard side of a pair for failure messages: handshakes, bytes, and each node's drops (its
    discovery's, then its device's: the WireGuard core's, the kernel's on its socket as socket, ...)."""
    parts = []
    for a, b in ((x, y), (y, x)):
        st = a.status() or {}
        p = a.peer(b.name, st) or {}
        parts.append(f"{a.name}->{b.name}: path {p.get('path')} last handshake {p.get('last_handshake_ago')} s ago, "
                     f"rx {p.get('rx_bytes')} tx {p.get('tx_bytes')}; {a.name} drops {st.get('drops')}")
    return "; ".join(parts)


@pytest.fixture(autouse=True)
def logs_on_failure(request, mesh):
    """Print every node's and the server's log after a failed test (modules import this fixture)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print(mesh.logs())
