"""Run a scenario: build its lab, start the signal server and a node on every host, check every pair.

For each pair of meshwg nodes the runner measures, from the moment the last node was started: the time to the
first ping over the mesh, the time until both sides report a direct path, the RTT, and a short TCP transfer;
it then checks the path against the scenario's expectation and prints a table (and a matrix for the
matrix scenario). The node command lines live in scenarios/node_commands.py.

Plain devices (scenarios/definitions.py) come up as a real phone would, after the meshwg pairs are measured: the
administrator approves the LAN routes the nodes advertise, `meshwg-signal plain add NAME --to NODE --qr-png`
writes the QR code, the device decodes it (zbarimg) and runs `wg-quick up` on nothing but that config. Their
pairs are timed from `wg-quick up`, and their path is "relay" only when the node lists the device as a plain
peer and every endpoint the device's WireGuard holds is the server's plain WireGuard port.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scenarios import node_commands as nc
from scenarios.definitions import LAN, PLAIN, NodeSpec, Scenario
from scenarios.netns import wait_for
from scenarios.services import PROBES, listening
from scenarios.topology import Host, Lab, Router

TCP_ECHO_PORT = 4100
TCP_BYTES = 256 * 1024


class NodeSoftwareError(RuntimeError):
    """The signal server or a node failed to start or exited (the message says which and shows its log)."""


@dataclass
class PairResult:
    a: str
    b: str
    nat_a: str
    nat_b: str
    expected: str
    path: str | None = None
    first_ping_s: float | None = None
    direct_s: float | None = None
    rtt_ms: float | None = None
    tcp_ok: bool = False
    note: str = ""
    plain: bool = False      # a plain WireGuard device's pair (path column: "relay (plain WireGuard)")
    b_where: str = ""        # b is a device on this node's LAN ("home LAN"), reached through its subnet route

    @property
    def ok(self) -> bool:
        path_ok = self.expected == "either" and self.path in ("direct", "relay") or self.path == self.expected
        return self.first_ping_s is not None and self.tcp_ok and path_ok


@dataclass
class Timings:
    connect_timeout: float = 30.0     # per pair: until the first ping gets through
    direct_wait: float = 10.0         # how long to wait for a direct path where one is expected
    either_wait: float = 5.0          # ... where direct is possible but not required
    route_wait: float = 10.0          # until the server lists a LAN route a node advertises (to approve it)


# -- building ----------------------------------------------------------------------------------

def build(scenario: Scenario, lab: Lab) -> tuple[Host, dict[str, Host]]:
    """The scenario's topology in `lab`: a public "signal" host, its routers, one host per device (any kind)."""
    signal_host = lab.public_host("signal", extra_addrs=1)
    routers: dict[str, Router] = {}
    for spec in scenario.routers:
        upstream = routers[spec.behind] if spec.behind else None
        routers[spec.name] = lab.router(spec.name, spec.nat, upstream=upstream, cgn=spec.cgn, hairpin=spec.hairpin)
    hosts = {n.name: lab.host(n.name, routers[n.behind] if n.behind else None) for n in scenario.nodes}
    for spec in scenario.plain_nodes():
        lab.sweep_on_close(hosts[spec.name])    # wg-quick's wireguard-go is no child of ours
    return signal_host, hosts


def lan_cidr(host: Host) -> str:
    """The LAN a node behind a router advertises: its router's /24."""
    return f"{host.router.lan_prefix}.0/24"


def read_tail(path, lines: int = 15, indent: str = "") -> str:
    """The last `lines` lines of a log file, each prefixed with `indent` (for error messages)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return indent + "(no log)"
    return "\n".join(indent + line for line in text[-lines:]) or indent + "(empty log)"


def start_signal_server(host: Host, *extra: str) -> subprocess.Popen:
    """Start `meshwg-signal serve` (plus `extra` arguments) on the signal host; return once it listens.

    Its output is appended to signal.log in the host's directory, so a restarted server keeps the old log."""
    log_path = host.dir / "signal.log"
    with open(log_path, "ab") as log:
        proc = host.popen(*nc.command("signal_serve", **nc.signal_values(host)), *extra,
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        # The control port is TCP only (STUN and the relay use other ports).
        wait_for(lambda: proc.poll() is not None or listening(host, nc.SIGNAL_PORT, "tcp"), timeout=15,
                 interval=0.1, what="the signal server")
    except TimeoutError:
        raise NodeSoftwareError(f"`meshwg-signal serve` did not listen on port {nc.SIGNAL_PORT} within 15 s. "
                                f"Its output:\n{read_tail(log_path, indent='    ')}") from None
    if proc.poll() is not None:
        raise NodeSoftwareError(f"`meshwg-signal serve` exited with status {proc.returncode} on the signal host "
                                f"before listening on port {nc.SIGNAL_PORT}. Its output:\n"
                                f"{read_tail(log_path, indent='    ')}")
    return proc


def create_invite(host: Host) -> str:
    """A reusable invite from the signal server's database on `host`."""
    res = host.run_proc(*nc.command("invite_create", **nc.signal_values(host)))
    lines = res.stdout.decode(errors="replace").strip().splitlines()
    if res.returncode != 0 or not lines:
        raise NodeSoftwareError(f"`meshwg-signal invite create --reusable` failed ({res.returncode}): "
                                f"{res.stderr.decode(errors='replace').strip()}")
    return lines[-1].strip()


def start_node(host: Host, invite: str, *extra: str) -> subprocess.Popen:
    log_path = host.dir / "join.log"
    with open(log_path, "wb") as log:
        return host.popen(*nc.command("join", **nc.node_values(host, invite)), *extra,
                          stdout=log, stderr=subprocess.STDOUT)


# -- watching ----------------------------------------------------------------------------------

class StatusPoller:
    """Polls `meshwg status --json` on every node in the background; remembers when paths went direct."""

    def __init__(self, nodes: dict[str, Host], procs: dict[str, subprocess.Popen], t0: float, interval: float = 0.3):
        self.nodes, self.procs, self.t0, self.interval = nodes, procs, t0, interval
        self.latest: dict[str, nc.NodeStatus] = {}
        self.taken_at: dict[str, float] = {}   # when each node's latest status was asked for (monotonic)
        self.direct_since: dict[tuple[str, str], float] = {}
        self.failure: str | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(name,), daemon=True) for name in nodes]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _poll(self, name: str) -> None:
        host = self.nodes[name]
        while not self._stop.is_set():
            if self.procs[name].poll() is not None:
                self.failure = (f"`meshwg join` exited with status {self.procs[name].returncode} on node {name!r}. "
                                f"Its output:\n{read_tail(host.dir / 'join.log', indent='    ')}")
                return
            asked_at = time.monotonic()
            res = host.run_proc(*nc.command("status", **nc.node_values(host)), timeout=10)
            if res.returncode == 0:
                try:
                    status = nc.parse_status(res.stdout.decode())
                except (ValueError, KeyError, TypeError):
                    status = None
                if status is not None:
                    self.latest[name] = status
                    self.taken_at[name] = asked_at
                    now = time.monotonic() - self.t0
                    for peer, ps in status.peers.items():
                        if ps.path == "direct":
                            self.direct_since.setdefault((name, peer), now)
                        else:
                            self.direct_since.pop((name, peer), None)
            self._stop.wait(self.interval)

    def wait_fresh(self, names: tuple[str, ...], since: float, timeout: float = 10.0) -> None:
        """Waits until every named node has a status asked for after `since`: a snapshot from before a
        ping may predate the peer itself (a slow poll on a loaded machine), so it cannot tell the path."""
        until = time.monotonic() + timeout
        while time.monotonic() < until and self.failure is None:
            if all(self.taken_at.get(n, -1.0) > since for n in names):
                return
            time.sleep(0.05)

    def peer(self, node: str, peer: str) -> nc.PeerStatus | None:
        status = self.latest.get(node)
        return status.peers.get(peer) if status else None

    def mesh_ip(self, node: str) -> str | None:
        status = self.latest.get(node)
        return nc.bare_ipv4(status.addresses) if status else None


def _ping_once(host: Host, ip: str) -> bool:
    # A short wait keeps the first-ping time fine-grained (a lost ping costs 0.3 s, not 1 s).
    return host.run_proc("ping", "-c", "1", "-W", "0.3", ip, timeout=5).returncode == 0


def _rtt_ms(host: Host, ip: str) -> float | None:
    return ping_avg_ms(host.run_proc("ping", "-q", "-c", "5", "-i", "0.2", "-W", "1", ip, timeout=10).stdout.decode())


def ping_avg_ms(output: str) -> float | None:
    """The average RTT from ping's summary line (`rtt min/avg/max/mdev = a/b/c/d ms`); None without one."""
    match = re.search(r"= [\d.]+/([\d.]+)/", output)
    return float(match.group(1)) if match else None


def check_pair(scenario: Scenario, a: NodeSpec, b: NodeSpec, nodes: dict[str, Host], poller: StatusPoller,
               timings: Timings) -> PairResult:
    ha, hb = nodes[a.name], nodes[b.name]
    result = PairResult(a.name, b.name, ha.nat_label, hb.nat_label, scenario.expected(a, b))
    deadline = poller.t0 + timings.connect_timeout
    b_ip = None
    while time.monotonic() < deadline and poller.failure is None:
        b_ip = b_ip or poller.mesh_ip(b.name)
        if b_ip and _ping_once(ha, b_ip):
            result.first_ping_s = time.monotonic() - poller.t0
            break
        time.sleep(0.05 if b_ip else 0.2)
    if result.first_ping_s is None:
        result.note = poller.failure and "node failed" or ("no mesh address for " + b.name if not b_ip else "no ping")
        return result

    wait = {"direct": timings.direct_wait, "either": timings.either_wait}.get(result.expected, 0.0)
    until = time.monotonic() + wait

    def both_direct() -> float | None:
        ab, ba = poller.direct_since.get((a.name, b.name)), poller.direct_since.get((b.name, a.name))
        return max(ab, ba) if ab is not None and ba is not None else None

    while both_direct() is None and time.monotonic() < until:
        time.sleep(0.1)
    result.direct_s = both_direct()
    poller.wait_fresh((a.name, b.name), since=poller.t0 + result.first_ping_s)
    pa, pb = poller.peer(a.name, b.name), poller.peer(b.name, a.name)
    paths = {p.path for p in (pa, pb) if p is not None}
    result.path = paths.pop() if len(paths) == 1 else "/".join(sorted(str(p) for p in paths)) or None
    return measure(result, ha, b_ip)


def measure(result: PairResult, host: Host, ip: str) -> PairResult:
    """Once a pair answers pings: its RTT, a short TCP transfer from `host` to `ip`, the note if not ok."""
    result.rtt_ms = _rtt_ms(host, ip)
    tcp = host.run_proc(sys.executable, PROBES, "tcp", "--to", f"{ip}:{TCP_ECHO_PORT}", "--size", str(TCP_BYTES),
                        timeout=30)
    result.tcp_ok = b'"ok": true' in tcp.stdout
    if not result.tcp_ok:
        result.note = "TCP transfer failed"
    elif not result.ok:
        result.note = f"expected {result.expected}"
    return result


# -- plain devices and LAN routes -------------------------------------------------------------

@dataclass
class PlainDevice:
    """A plain device after `wg-quick up`: its config (as decoded from the QR code) and when it came up."""
    spec: NodeSpec
    host: Host
    conf: Path
    config: str
    t_up: float               # monotonic, when `wg-quick up` was started
    implementation: str       # what wg-quick ran: "wireguard-go" (userspace) or "kernel WireGuard"


def admin(host: Host, which: str, *extra: str, **values) -> subprocess.CompletedProcess:
    """An administrator's `meshwg-signal` command on the signal host."""
    return host.run_proc(*nc.command(which, **nc.signal_values(host), **values), *extra, timeout=30)


def _out(res: subprocess.CompletedProcess) -> str:
    return (res.stdout + res.stderr).decode(errors="replace").strip()


def wait_for_node(poller: StatusPoller, name: str, deadline: float) -> str:
    """The node's mesh address, once it has joined (a plain peer's config names only nodes that have)."""
    while time.monotonic() < deadline and poller.failure is None:
        ip = poller.mesh_ip(name)
        if ip:
            return ip
        time.sleep(0.1)
    raise NodeSoftwareError(poller.failure or f"node {name!r} had no mesh address in time "
                                              f"(its log: {poller.nodes[name].dir / 'join.log'})")


def approve_lan_routes(scenario: Scenario, signal_host: Host, hosts: dict[str, Host], poller: StatusPoller,
                       timings: Timings, say: Callable[[str], None]) -> None:
    """What the administrator does: once the server lists a node's advertised LAN as pending, approve it."""
    for spec in scenario.mesh_nodes():
        if not spec.advertise_lan:
            continue
        cidr = lan_cidr(hosts[spec.name])
        wait_for_node(poller, spec.name, poller.t0 + timings.connect_timeout)
        until, state = time.monotonic() + timings.route_wait, None
        while time.monotonic() < until and state not in ("pending", "approved"):
            res = admin(signal_host, "routes_list")
            state = nc.route_state(res.stdout.decode(errors="replace"), spec.name, cidr) if res.returncode == 0 else None
            if state not in ("pending", "approved"):
                time.sleep(0.2)
        if state == "pending":
            res = admin(signal_host, "routes_approve", node=spec.name, cidr=cidr)
            if res.returncode != 0:
                raise NodeSoftwareError(f"`meshwg-signal routes approve {spec.name} {cidr}` failed "
                                        f"({res.returncode}): {_out(res)}")
            say(f"  approved {spec.name}'s LAN: meshwg-signal routes approve {spec.name} {cidr}")
        elif state != "approved":
            raise NodeSoftwareError(f"the server did not list {spec.name}'s advertised route {cidr} as pending within "
                                    f"{timings.route_wait:.0f} s (state: {state or 'no row'})")


def bring_up_plain(spec: NodeSpec, host: Host, signal_host: Host, poller: StatusPoller, timings: Timings,
                   say: Callable[[str], None]) -> PlainDevice:
    """`plain add --qr-png` on the server, the QR code decoded on the device, `wg-quick up` on what it says."""
    for target in spec.to:
        wait_for_node(poller, target, poller.t0 + timings.connect_timeout)
    png = signal_host.dir / f"{spec.name}.png"
    to = [arg for target in spec.to for arg in ("--to", target)]
    added = admin(signal_host, "plain_add", *to, name=spec.name, png=png)
    if added.returncode != 0:
        raise NodeSoftwareError(f"`meshwg-signal plain add {spec.name}` failed ({added.returncode}): {_out(added)}")
    values = nc.plain_values(host)
    decoded = host.run_proc(*nc.command("qr_decode", png=png, **values), timeout=20)
    config = decoded.stdout.decode(errors="replace")
    if decoded.returncode != 0 or config.strip() != added.stdout.decode(errors="replace").strip():
        raise NodeSoftwareError(f"the QR code {png} did not decode to the config `plain add` printed "
                                f"({decoded.returncode}): {_out(decoded)}")
    conf = Path(values["conf"])
    conf.write_text(config)
    conf.chmod(0o600)    # it holds the device's private key (wg-quick warns otherwise)
    t_up = time.monotonic()
    up = host.run_proc(*nc.command("wg_quick_up", **values), timeout=30)
    if up.returncode != 0:
        raise NodeSoftwareError(f"`wg-quick up {conf}` failed on {spec.name} ({up.returncode}): {_out(up)}")
    impl = "wireguard-go" if re.search(r"^\[#\] wireguard-go ", up.stderr.decode(errors="replace"), re.M) \
        else "kernel WireGuard"
    say(f"  added {spec.name}: meshwg-signal plain add {spec.name} {' '.join(to)} --qr-png {png.name}")
    say(f"  {spec.name} reads the QR code (zbarimg --raw) and runs wg-quick up on that config ({impl})")
    return PlainDevice(spec, host, conf, config, t_up, impl)


def plain_path(node_view: nc.PeerStatus | None, endpoints: list[str], plain_addr: str) -> str | None:
    """A plain device's path as both ends see it: "relay" when the node lists the device as a plain peer on the
    relay and every endpoint the device holds is the server's plain port; otherwise each side's view joined by
    "/" ("?": a side that does not know the other)."""
    endpoints = [e for e in endpoints if e != "(none)"]    # a peer it has not sent to: no path to tell
    device = None if not endpoints else "relay" if all(e == plain_addr for e in endpoints) else "direct"
    node = node_view.path if node_view is not None and node_view.plain else None
    if device == node:
        return device
    return "/".join(sorted(side or "?" for side in (device, node)))


def check_plain_pair(scenario: Scenario, a: NodeSpec, b: NodeSpec, hosts: dict[str, Host], poller: StatusPoller,
                     device: PlainDevice, plain_addr: str, timings: Timings) -> PairResult:
    """A plain device `a` and what it reaches (a node, or a device on a node's LAN), timed from `wg-quick up`."""
    ha, hb = hosts[a.name], hosts[b.name]
    node = scenario.carrier(a, b)
    result = PairResult(a.name, b.name, ha.nat_label, hb.nat_label, scenario.expected(a, b), plain=True,
                        b_where=f"{node.name} LAN" if b.kind == LAN else "")
    ip = hb.addr if b.kind == LAN else poller.mesh_ip(b.name)
    deadline = device.t_up + timings.connect_timeout
    while ip and time.monotonic() < deadline and poller.failure is None:
        if _ping_once(ha, ip):
            result.first_ping_s = time.monotonic() - device.t_up
            break
        time.sleep(0.05)
    if result.first_ping_s is None:
        result.note = "node failed" if poller.failure else "no ping"
        if b.kind == LAN and lan_cidr(hb) not in device.config:
            result.note = f"{lan_cidr(hb)} is not in its config"
        return result
    poller.wait_fresh((node.name,), since=device.t_up + result.first_ping_s)
    shown = ha.run_proc(*nc.command("wg_endpoints", **nc.plain_values(ha)), timeout=10)
    result.path = plain_path(poller.peer(node.name, a.name), nc.parse_wg_endpoints(shown.stdout.decode()), plain_addr)
    return measure(result, ha, ip)


# -- running -----------------------------------------------------------------------------------

@dataclass
class RunOutcome:
    scenario: Scenario
    results: list[PairResult] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.results) and all(r.ok for r in self.results)


def run(scenario: Scenario, *, keep: bool = False, timings: Timings | None = None,
        say: Callable[[str], None] = print) -> RunOutcome:
    timings = timings or Timings()
    outcome = RunOutcome(scenario)
    lab = Lab()
    devices: dict[str, PlainDevice] = {}
    try:
        say(f"Building the lab for {scenario.name!r}: {scenario.description}")
        signal_host, hosts = build(scenario, lab)
        for spec in scenario.nodes:
            host = hosts[spec.name]
            say(f"  {spec.name:<14} {host.addr:<15} behind {host.nat_label}"
                + (f"  ({spec.role})" if spec.role else ""))
            host.popen(sys.executable, PROBES, "echo", "--tcp", f"0.0.0.0:{TCP_ECHO_PORT}",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        plain_addr = f"{signal_host.addr}:{nc.PLAIN_PORT}"
        say(f"Starting the signal server on {signal_host.addr}"
            + (f" (plain WireGuard on {plain_addr})" if scenario.plain_nodes() else "") + " ...")
        start_signal_server(signal_host, *(nc.command("signal_plain", **nc.signal_values(signal_host))
                                           if scenario.plain_nodes() else ()))
        invite = create_invite(signal_host)
        mesh = {spec.name: hosts[spec.name] for spec in scenario.mesh_nodes()}
        routes = {spec.name: lan_cidr(mesh[spec.name]) for spec in scenario.mesh_nodes() if spec.advertise_lan}
        say(f"Starting {len(mesh)} meshwg nodes"
            + "".join(f"; {name} advertises its LAN {cidr}" for name, cidr in routes.items()) + " ...")
        procs = {name: start_node(host, invite, *(nc.command("join_routes", routes=routes[name])
                                                  if name in routes else ()))
                 for name, host in mesh.items()}
        t0 = time.monotonic()
        poller = StatusPoller(mesh, procs, t0)
        poller.start()
        try:
            threads, results = [], {}

            def start(check: Callable[..., PairResult], a: NodeSpec, b: NodeSpec, *args) -> None:
                def work() -> None:
                    results[(a.name, b.name)] = check(scenario, a, b, hosts, poller, *args, timings)
                threads.append(threading.Thread(target=work, daemon=True))
                threads[-1].start()

            pairs = scenario.pairs()
            for a, b in pairs:
                if PLAIN not in (a.kind, b.kind):
                    start(check_pair, a, b)
            for t in threads:
                t.join()
            # Then (so that their CLIs and daemons do not slow the NAT traversal being timed on a small machine)
            # the administrator approves the advertised LANs and adds each plain device, which comes up from its
            # QR code; its pairs are checked as soon as it is up.
            approve_lan_routes(scenario, signal_host, hosts, poller, timings, say)
            for spec in scenario.plain_nodes():
                devices[spec.name] = bring_up_plain(spec, hosts[spec.name], signal_host, poller, timings, say)
                for a, b in pairs:
                    if a.name == spec.name:
                        start(check_plain_pair, a, b, devices[spec.name], plain_addr)
            for t in threads:
                t.join()
        finally:
            poller.stop()
        if poller.failure:
            raise NodeSoftwareError(poller.failure)
        outcome.results = [results[(a.name, b.name)] for a, b in pairs]
        say("")
        say(format_table(outcome.results))
        if scenario.matrix:
            say("")
            say(format_matrix(scenario, outcome.results))
        say("")
        say("All pairs connected as expected." if outcome.ok else "Some pairs did NOT connect as expected.")
    except NodeSoftwareError as err:
        outcome.error = str(err)
        say(f"\nscenario {scenario.name!r} failed: {err}")
    except KeyboardInterrupt:
        keep = False          # Ctrl-C / SIGTERM always tears the lab down, --keep or not
        raise
    finally:
        if keep:
            manifest = lab.write_manifest()
            lab.detach()
            say("\nThe lab is still up (--keep). Hosts (run a shell on one with the command shown):")
            for host in lab.hosts.values():
                say(f"  {host.name:<14} {host.shell_command()}")
            for device in devices.values():
                say(f"{device.spec.name} runs only wg-quick + {device.implementation} with {device.conf} "
                    f"(try `wg show` on it)")
            say(f"Tear it down with: python -m scenarios down {manifest}")
        else:
            lab.close()
    return outcome


# -- printing ----------------------------------------------------------------------------------

LEGEND = """\
pair        the two devices
NAT types   what each device sits behind (a+b: behind a, which is behind b)
path        how their WireGuard traffic flows: direct (hole punched or LAN) or relay (via the signal server)
first ping  seconds from starting the nodes until a ping over the mesh got an answer
direct      seconds until both sides used a direct path ('-': never, in the time allowed)
RTT         average ping round trip over the mesh, in milliseconds
result      ok: ping and a short TCP transfer worked and the path is the one this NAT pair allows"""

# Added under the legend when the table has plain devices' rows.
PLAIN_LEGEND = """\
plain rows  a device that runs only stock wg-quick + wireguard-go (what the official WireGuard apps run),
            configured with nothing but the config read back from the QR code `meshwg-signal plain add` wrote;
            'relay (plain WireGuard)': through the server's plain WireGuard port, encrypted end to end to the
            node; its first ping counts from its `wg-quick up`. 'X (N LAN)': X sits on node N's LAN, runs no
            meshwg and is reached through N's approved subnet route"""


def secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def format_table(results: list[PairResult], legend: bool = True) -> str:
    rows = [("pair", "NAT types", "path", "first ping", "direct", "RTT", "result")]
    for r in results:
        pair = f"{r.a} <-> {r.b}" + (f" ({r.b_where})" if r.b_where else "")
        path = (r.path or "none") + (" (plain WireGuard)" if r.plain and r.path else "")
        rows.append((pair, f"{r.nat_a} / {r.nat_b}", path, secs(r.first_ping_s),
                     secs(r.direct_s), "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f} ms",
                     "ok" if r.ok else f"FAIL {r.note}".strip()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    if not legend:
        return "\n".join(lines)
    extra = "\n" + PLAIN_LEGEND if any(r.plain for r in results) else ""
    return "\n".join(lines) + "\n\n" + LEGEND + extra


def format_matrix(scenario: Scenario, results: list[PairResult]) -> str:
    """Connectivity matrix: direct/relay/fail and the time to the first ping, per pair of nodes."""
    by_pair = {frozenset((r.a, r.b)): r for r in results}
    names = [n.name for n in scenario.mesh_nodes()]

    def cell(x: str, y: str) -> str:
        if x == y:
            return "."
        r = by_pair.get(frozenset((x, y)))
        if r is None or r.first_ping_s is None:
            return "fail"
        return f"{r.path or '?'} {r.first_ping_s:.1f}s"

    rows = [[""] + names] + [[x] + [cell(x, y) for y in names] for x in names]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
