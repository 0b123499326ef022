"""Issue 6 in the real NAT lab: direct and relayed paths, failover, server outage, live directory changes.

One lab for the whole module (tests run in file order and build on each other): a, b behind
port-restricted cone NATs (the Linux default), c, d behind symmetric NATs, then e and f joining later.
Every timing is measured on wall clocks shared with the nodes' logs and `ping -D`, printed (pytest -s)
and put in the assertion messages.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from conftest import require_real_components
from mesh_lab import (  # noqa: F401 (logs_on_failure is an autouse fixture)
    MeshLab,
    MeshNode,
    Pinger,
    RelayCapture,
    log_times,
    logs_on_failure,
    path_times,
    paths,
    wait_until,
)
from scenarios.nat import NatType
from scenarios.topology import Lab

pytestmark = pytest.mark.netns

PR, SYM = NatType.PORT_RESTRICTED, NatType.SYMMETRIC
OUTAGE_S = 30.0          # the issue's signaling-server outage
# The issue sets no bound for a new node to reach the others after a server restart. Old nodes redo
# their relay session only at their periodic HELLO (25 s) and WireGuard retries a handshake every 5 s,
# so up to ~35 s is what the product does today (see the report); 45 s leaves room for a loaded machine.
REACH_TIMEOUT = 45.0


def say(msg: str) -> None:
    print(f"[mesh] {msg}", flush=True)


def watch_all(nodes: list[MeshNode], predicate, timeout: float, extra=None) -> dict[str, float | None]:
    """Poll every node's status in parallel; the wall time at which predicate(status) first held, per node.
    `extra` = (node, predicate) is watched alongside under the key '<name>*'."""
    seen: dict[str, float | None] = {}
    jobs = [(n.name, n, predicate) for n in nodes] + ([(extra[0].name + "*", *extra)] if extra else [])

    def one(key: str, node: MeshNode, pred) -> None:
        _, seen[key] = wait_until(lambda: (st := node.status()) is not None and pred(st), timeout, 0.01)

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def join_pair(mesh: MeshLab, x: str, y: str, nat: NatType):
    """Start two nodes at once; return them, the later join time and a pinger x -> y started right away."""
    nx, ny = mesh.add_node(x, nat), mesh.add_node(y, nat)
    ip_y, _ = wait_until(ny.mesh_ip, 20)
    assert ip_y, f"{y} got no mesh address in 20 s\n{mesh.logs()}"
    pinger = Pinger(nx.host, ip_y, interval=0.05).start()
    joined, _ = wait_until(lambda: nx.joined_at() and ny.joined_at() and max(nx.joined_at(), ny.joined_at()), 20)
    assert joined, f"{x} or {y} did not join within 20 s\n{mesh.logs()}"
    return nx, ny, ip_y, joined, pinger


def time_to_first_ping(pinger: Pinger, joined: float, never: str) -> float:
    """Seconds from `joined` to the pinger's first reply (waits up to 10 s; `never` is the failure)."""
    first, _ = wait_until(pinger.first_reply, 10)
    assert first is not None, never
    return first - joined


@pytest.fixture(scope="module")
def mesh():
    require_real_components("ip", "nft", "conntrack", "ping", "curl", "unshare", "tcpdump")
    with Lab() as lab:
        m = MeshLab(lab)
        m.start_server()
        m.pingers = []
        yield m
        for p in m.pingers:
            p.stop()


def test_port_restricted_pair_goes_direct_pings_within_2s_and_relay_carries_no_data(mesh):
    a, b, ip_b, joined, pinger = join_pair(mesh, "a", "b", PR)
    mesh.pingers.append(pinger)
    ttfp = time_to_first_ping(pinger, joined, "a never pinged b")
    direct, _ = wait_until(lambda: paths(a, b) == ("direct", "direct"), 10)
    assert direct, f"a <-> b not direct after 10 s: {paths(a, b)}"
    t_direct = max(path_times(a, b, "direct", 0)[0], path_times(b, a, "direct", 0)[0])
    ttd = t_direct - joined
    say(f"pr <-> pr: time to first ping {ttfp:.3f} s, time to direct {ttd:.3f} s after both joined")
    assert ttfp <= 2.0, f"first ping {ttfp:.3f} s after both joins (must be <= 2 s)"
    # Both sides direct within a second: the second side pings back the first's punch ping at once (2.0 s when
    # it waited for its own next round).
    assert ttd <= 1.0, f"both direct {ttd:.3f} s after both joins (must be <= 1 s)"
    assert a.peer("b")["endpoint"].startswith(b.router.wan_ip + ":"), a.peer("b")

    # After the switch: pings keep flowing (a 20 ms flood-ish burst on top of the pinger) and no data
    # packet reaches the relay. What the relay is handed is read off the wire on the signal host
    # (the WireGuard message type is visible in a SEND frame); the server's /metrics and the nodes'
    # relay_tx_packets are printed alongside (only a and b exist yet, so the server's counter is theirs).
    # The counters are read while the capture runs: a packet relayed between reading them and tcpdump
    # listening was counted but not captured (seen once: the last relayed packets of the switch).
    with RelayCapture(mesh.signal) as cap:
        f0, r0 = mesh.forwarded_packets(), (a.peer("b")["relay_tx_packets"], b.peer("a")["relay_tx_packets"])
        t0 = time.time()
        assert a.ping(ip_b, count=50, wait=1, interval=0.02), "burst of 50 pings a -> b lost packets"
        time.sleep(1.0)
        t1 = time.time()
        f1, r1 = mesh.forwarded_packets(), (a.peer("b")["relay_tx_packets"], b.peer("a")["relay_tx_packets"])
    relayed = cap.sends({a.router.wan_ip, b.router.wan_ip})
    replies = 50 + pinger.count(t0, t1)
    say(f"pr <-> pr after the switch: {replies} echo replies in {t1 - t0:.1f} s; relay handed {relayed or 'nothing'} "
        f"by a and b (tcpdump); server forwarded {f1 - f0} packets; relay_tx_packets a {r1[0] - r0[0]}, b {r1[1] - r0[1]}")
    assert relayed.get("data", 0) == 0, f"{relayed['data']} data packets went through the relay while direct"
    assert f1 - f0 <= sum(relayed.values()), "the server forwarded more than the capture saw"


def test_symmetric_pair_relays_pings_within_2s_and_status_says_why(mesh):
    c, d, ip_d, joined, pinger = join_pair(mesh, "c", "d", SYM)
    mesh.pingers.append(pinger)
    ttfp = time_to_first_ping(pinger, joined, "c never pinged d")
    say(f"sym <-> sym: time to first ping {ttfp:.3f} s after both joined, time to direct: never (relay)")
    assert ttfp <= 2.0, f"first ping {ttfp:.3f} s after both joins (must be <= 2 s)"
    st = c.status_cli()                                    # the command a user runs
    pc = c.peer("d", st)
    assert pc["path"] == "relay" and "symmetric" in (pc["relay_reason"] or ""), pc
    say(f"sym <-> sym: `meshwg status --json` on c: path relay, reason {pc['relay_reason']!r}")
    assert paths(c, d) == ("relay", "relay")
    # The counter-check of the previous test: here the capture does see the pings as relayed data.
    with RelayCapture(mesh.signal) as cap:
        t0 = time.time()
        time.sleep(1.0)
        t1 = time.time()
    relayed = cap.sends({c.router.wan_ip, d.router.wan_ip})
    replies = pinger.count(t0, t1)
    say(f"sym <-> sym: {replies} echo replies in {t1 - t0:.1f} s, relay handed {relayed} by c and d (tcpdump)")
    assert replies > 0 and relayed.get("data", 0) >= 2 * replies - 4, (replies, relayed)


def test_cutting_the_direct_path_moves_to_relay_within_5s_and_back(mesh):
    a, b = mesh.nodes["a"], mesh.nodes["b"]
    pinger = mesh.pingers[0]                                # a -> b, every 50 ms
    assert paths(a, b) == ("direct", "direct")
    rb = b.router.wan_ip
    ra_ns = a.router.ns
    # Before the router's own filter (priority 0): a's NAT drops all UDP to and from b's public address,
    # while the relay (on the signal host) stays reachable.
    rule = (f"table inet cut {{\n chain cutpath {{\n type filter hook forward priority -10;\n"
            f" ip daddr {rb} meta l4proto udp drop\n ip saddr {rb} meta l4proto udp drop\n }}\n}}\n")
    t_cut = time.time()
    ra_ns.run("nft", "-f", "-", input=rule.encode())
    relayed, _ = wait_until(lambda: paths(a, b) == ("relay", "relay"), 10)
    t_relay = max(path_times(a, b, "relay", t_cut) + path_times(b, a, "relay", t_cut) or [float("inf")])
    time.sleep(1.0)
    t_now = time.time()
    gap_start, resumed = pinger.longest_gap(t_cut, t_now)
    gap = resumed - gap_start
    say(f"cut direct path: both sides on the relay {t_relay - t_cut:.3f} s after the nft rule; "
        f"pings a -> b interrupted for {gap:.3f} s, flowing again {resumed - t_cut:.3f} s after the cut")
    assert relayed, f"not both on relay 10 s after the cut: {paths(a, b)}"
    assert t_relay - t_cut <= 5.0, f"moved to the relay {t_relay - t_cut:.3f} s after the cut (must be <= 5 s)"
    assert resumed - t_cut <= 5.0, f"pings a -> b flowed again {resumed - t_cut:.3f} s after the cut (must be <= 5 s)"

    f0 = mesh.forwarded_packets()
    t_heal = time.time()
    ra_ns.run("nft", "delete", "table", "inet", "cut")
    back, _ = wait_until(lambda: paths(a, b) == ("direct", "direct"), 65, 0.1)
    f1 = mesh.forwarded_packets()
    t_back = max(path_times(a, b, "direct", t_heal) + path_times(b, a, "direct", t_heal) or [float("nan")])
    say(f"rule removed: both sides direct again {t_back - t_heal:.3f} s later; relay forwarded "
        f"{f1 - f0} packets meanwhile")
    assert back, f"not direct again 65 s after removing the rule: {paths(a, b)}"
    # The issue: while active and relayed, a node re-probes for a direct path (about every 60 s at most).
    assert t_back - t_heal <= 62.0
    assert f1 > f0, "the relay carried nothing while the direct path was cut"


def test_signal_server_outage_30s_tunnels_keep_flowing_then_new_node_reaches_everyone(mesh):
    a, b, c, d = (mesh.nodes[n] for n in "abcd")
    ab = mesh.pingers[0]
    assert paths(a, b) == ("direct", "direct")
    samples = []
    t_kill = time.time()
    # Kill (no goodbye) the whole server: control, STUN and relay, while a <-> b is direct.
    os.killpg(mesh.server.pid, signal.SIGKILL)
    mesh.stop_server()
    while time.time() - t_kill < OUTAGE_S:
        samples.append((time.time() - t_kill, paths(a, b), a.status()["control"]["connected"]))
        time.sleep(1.0)
    t_restart = time.time()
    gap, (lost, sent) = ab.max_gap(t_kill, t_restart), ab.lost(t_kill, t_restart)
    not_direct = [s for s in samples if s[1] != ("direct", "direct")]
    say(f"server (control, STUN and relay) down {t_restart - t_kill:.1f} s: a -> b {sent - lost}/{sent} pings "
        f"answered, longest gap {gap:.3f} s; a <-> b stayed direct in {len(samples) - len(not_direct)}/"
        f"{len(samples)} samples; a's control connection up in {sum(s[2] for s in samples)} samples")
    assert not_direct == [], f"a <-> b left the direct path while the server/relay was down: {not_direct}"
    assert gap < 1.0, f"pings a -> b stopped for {gap:.3f} s while the server was down"
    assert sent >= 100 and lost <= sent // 100, f"{lost} of {sent} pings a -> b lost while the server was down"
    assert not any(s[2] for s in samples[2:]), "a still claims a control connection to a dead server"

    mesh.start_server()
    e = mesh.add_node("e", PR)
    t_start_e = time.time()
    others = [a, b, c, d]
    ips = {n.name: n.mesh_ip() for n in others}
    reach: dict[str, float | None] = {}

    def reach_one(name: str) -> None:
        _, reach[name] = wait_until(lambda: e.ping(ips[name], wait=0.5), REACH_TIMEOUT, 0.05)

    threads = [threading.Thread(target=reach_one, args=(n.name,)) for n in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    joined = e.joined_at() or float("nan")
    m = mesh.metrics()
    say("after restart: e started, joined {:.2f} s later; reached ".format(joined - t_start_e) +
        ", ".join(f"{n} at {t - joined:.2f} s" if t else f"{n} NEVER" for n, t in reach.items()) +
        " after joining; relay dropped {:.0f} packets for absent peers, refused {:.0f} without session".format(
            m.get("meshwg_signal_drop_peer_absent_total", 0), m.get("meshwg_signal_refused_no_session_total", 0)))
    assert all(reach.values()), f"e did not reach {[n for n, t in reach.items() if not t]} within {REACH_TIMEOUT} s"
    back, _ = wait_until(lambda: all(n.status()["control"]["connected"] for n in others), 15)
    assert back, "not every old node reconnected to the restarted server"
    assert paths(a, b) == ("direct", "direct")


def test_node_added_changed_and_removed_shows_on_every_other_node_within_1s(mesh):
    others = [mesh.nodes[n] for n in "abcde"]
    f = mesh.add_node("f", PR)

    def server_join_time(name: str) -> float | None:
        times = log_times(mesh.signal.dir / "signal.log", rf"joined as {name} \(")
        return times[-1] if times else None

    seen = watch_all(others, lambda st: any(p["name"] == "f" for p in st["peers"]), 20)
    t_join = server_join_time("f")
    added = {n: (t - t_join if t else None) for n, t in seen.items()}

    # Changed: f comes back on another port; every node must learn the new endpoint. The change is on
    # the server when f has registered again, i.e. when f's own status says it is connected (a
    # returning node logs no "joined as"); the time from f's process start is printed too.
    port = random.randrange(40000, 50000)
    f.stop()
    t_restart = time.time()
    f.start("--listen-port", str(port))
    has_port = lambda st: any(c.endswith(f":{port}") for p in st["peers"] if p["name"] == "f"  # noqa: E731
                              for c in p["candidates"])
    seen = watch_all(others, has_port, 20, extra=(f, lambda st: st["control"]["connected"]))
    t_rejoin = seen.pop("f*")
    changed = {n: (t - t_rejoin if t and t_rejoin else None) for n, t in seen.items()}
    from_start = max((t or float("inf")) for t in seen.values()) - t_restart

    # Changed on the server by the admin: a rename.
    mesh.admin("nodes", "rename", "f", "f-renamed")
    t_rename = time.time()
    seen = watch_all(others, lambda st: any(p["name"] == "f-renamed" for p in st["peers"]), 10)
    renamed = {n: (t - t_rename if t else None) for n, t in seen.items()}

    mesh.admin("nodes", "remove", "f-renamed")
    t_remove = time.time()
    seen = watch_all(others, lambda st: not any(p["name"].startswith("f") for p in st["peers"]), 10)
    removed = {n: (t - t_remove if t else None) for n, t in seen.items()}

    def fmt(d):
        return ", ".join(f"{n} {v:.3f} s" if v is not None else f"{n} NEVER" for n, v in d.items())

    say(f"f added (from the server's join):        {fmt(added)}")
    say(f"f new endpoint :{port} (from f's re-registration): {fmt(changed)}; slowest {from_start:.3f} s "
        f"after f's process was started")
    say(f"f renamed (from the admin command's exit): {fmt(renamed)}")
    say(f"f removed (from the admin command's exit): {fmt(removed)}")
    for what, d in (("added", added), ("new endpoint", changed), ("renamed", renamed), ("removed", removed)):
        worst = max((v if v is not None else float("inf")) for v in d.values())
        assert worst <= 1.0, f"f {what}: slowest node saw it after {worst:.3f} s (must be <= 1 s): {fmt(d)}"
