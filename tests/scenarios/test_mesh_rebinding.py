"""Issue 6 in the real NAT lab: NAT rebinding recovers without user action; LAN peers go direct over the LAN.

One lab for the module; tests run in file order on one pair. a and b sit behind their own
port-restricted cone NATs (Linux masquerade) with a direct path and a pinger a -> b (every 50 ms)
running throughout; then a router forgets its mappings (`conntrack -F` in its namespace):
- on a's router (the pinging side): a's next echo request re-creates the mapping (same port);
- on a's router with a rule that maps a's flows to another public port from then on (a rebinding to
  a new port: the old one is dead, b must learn the new one);
- on b's router (the pinged side): a's echo requests cannot re-open it, b must send first;
- on the router of a fresh node d, then the direct path is cut: the relay must still reach d.
Then two nodes behind one NAT (without and with hairpin) must use each other's own LAN addresses.

Bounds come from the path logic (meshwg/disco/paths.py): a direct path is pinged every
HEARTBEAT_INTERVAL (2 s) while active and trusted for TRUST_DURATION (4.5 s) after its last pong;
a pong on the old best path restores trust at once (no probe backoff involved).
Every gap is measured on the pinger's `ping -D` wall clock and printed (pytest -s).
"""

from __future__ import annotations

import time

import pytest
from conftest import require_real_components
from mesh_lab import (  # noqa: F401 (logs_on_failure is an autouse fixture)
    _TS,
    MeshLab,
    MeshNode,
    Pinger,
    RelayCapture,
    logs_on_failure,
    path_log,
    paths,
    read_pcap,
    relayed_kind,
    tunnel_report,
    wait_until,
)

from meshwg import logfmt
from meshwg.signaling import relay_wire as W
from meshwg.disco import paths as P
from scenarios.nat import NatType
from scenarios.topology import Lab

pytestmark = pytest.mark.netns

PR = NatType.PORT_RESTRICTED
PING_INTERVAL = 0.05
# Slack for a loaded 2-core machine (another lab may run alongside): agent timers, the pinger and
# status polls all wait for CPU. Added once to each design bound below.
CPU_SLACK = 1.0
# Pinged side's router flushed: nothing from a can re-open it; b's next heartbeat to a does.
RECEIVER_FLUSH_GAP = P.HEARTBEAT_INTERVAL + CPU_SLACK
# Pinging side's router flushed: a's next echo request re-opens it (same port: masquerade keeps it).
SENDER_FLUSH_GAP = 2 * PING_INTERVAL + CPU_SLACK
# New public port: the old direct path is dead both ways, so each side keeps it until its trust
# expires (4.5 s after the last pong) and then uses the relay (a re-HELLOs it from the new port first).
NEW_PORT_GAP = P.TRUST_DURATION + CPU_SLACK
# Back to direct after a new port: b must learn a's new address. The relay sees it at a's re-HELLO and
# the server publishes it as a's "observed" candidate (about 1 s); at worst a's own re-STUN (every
# 20-26 s) reports it. A new candidate is probed at once.
NEW_PORT_DIRECT = 26.0 + 2.0 + CPU_SLACK
NEW_PORT_RANGE = (21000, 21099)     # the router's ports for a after the rebinding (never a's own port)


def say(msg: str) -> None:
    print(f"[rebind] {msg}", flush=True)


def endpoint(x: MeshNode, y: MeshNode) -> str | None:
    """y's address as x uses it (None while relayed)."""
    p = x.peer(y.name)
    return p and p["endpoint"]


def outage(pinger: Pinger, t_event: float, t_end: float) -> tuple[float, float]:
    """(last reply at or before t_event, first reply after the longest silence in [t_event, t_end])."""
    before = [t for t in pinger.replies if t <= t_event]
    start, resumed = pinger.longest_gap(t_event, t_end)
    if start == t_event and before:
        start = before[-1]
    return start, resumed


def log_since(node: MeshNode, after: float) -> str:
    """The node's log lines from `after` on (for failure messages)."""
    lines = node.log.read_text(errors="replace").splitlines()
    keep = [ln for ln in lines if (ts := log_times_of(ln)) is not None and ts >= after]
    return f"---- {node.name} log from the event on\n" + "\n".join(keep[-60:])


def log_times_of(line: str) -> float | None:
    m = _TS.match(line)
    return logfmt.parse_timestamp(m.group(1)) if m else None


def fmt_changes(changes: list[tuple[float, str]], t0: float) -> str:
    return ", ".join(f"{kind} at +{t - t0:.3f} s" for t, kind in changes) or "none"


@pytest.fixture(scope="module")
def mesh():
    require_real_components("ip", "nft", "conntrack", "ping", "unshare")
    with Lab() as lab:
        m = MeshLab(lab)
        m.start_server()
        m.pingers = []
        try:
            yield m
        finally:
            for p in m.pingers:
                p.stop()
            for n in m.nodes.values():
                n.stop()


@pytest.fixture(scope="module")
def pair(mesh):
    """a and b direct behind their own port-restricted NATs, a pinging b every 50 ms."""
    a, b = mesh.add_node("a", PR), mesh.add_node("b", PR)
    ip_b, _ = wait_until(b.mesh_ip, 20)
    assert ip_b, f"b got no mesh address in 20 s\n{mesh.logs()}"
    pinger = Pinger(a.host, ip_b, interval=PING_INTERVAL).start()
    mesh.pingers.append(pinger)
    direct, _ = wait_until(lambda: paths(a, b) == ("direct", "direct"), 20)
    assert direct, f"a <-> b not direct 20 s after start: {paths(a, b)}\n{mesh.logs()}"
    return a, b, pinger


def settle(a: MeshNode, b: MeshNode, pinger: Pinger) -> None:
    """Start a case from a steady direct path with pings flowing."""
    ok, _ = wait_until(lambda: paths(a, b) == ("direct", "direct"), 15)
    assert ok, f"a <-> b not direct before the case: {paths(a, b)}"
    t = time.time()
    flowing, _ = wait_until(lambda: pinger.count(t, time.time()) >= 5, 5)
    assert flowing, "pings a -> b not flowing before the case"


def flush_case(mesh: MeshLab, a: MeshNode, b: MeshNode, pinger: Pinger, flushed: MeshNode, bound: float,
               why: str) -> None:
    settle(a, b, pinger)
    other = a if flushed is b else b
    seen_before = endpoint(other, flushed)          # flushed's public address as its peer uses it
    relay_before = flushed.status()["relay"]["observed"]
    t_flush = time.time()
    flushed.router.flush_conntrack()
    # Recovered: pings answered again and both sides direct; then watch 1 s more for a late blip.
    ok, _ = wait_until(lambda: pinger.first_reply(t_flush) and paths(a, b) == ("direct", "direct"), 15)
    time.sleep(1.0)
    t_end = time.time()
    start, resumed = outage(pinger, t_flush, t_end)
    lost, sent = pinger.lost(t_flush - 1.0, t_end)
    changes = {n.name: path_log(n, p, t_flush) for n, p in ((a, b), (b, a))}
    seen_after = endpoint(other, flushed)
    relay_after = flushed.status()["relay"]["observed"]
    say(f"conntrack -F on {flushed.name}'s router ({why}): pings a -> b stopped {resumed - start:.3f} s "
        f"at most (longest silence {start - t_flush:+.3f} s .. {resumed - t_flush:+.3f} s from the flush), "
        f"{lost}/{sent} lost; path changes a: {fmt_changes(changes['a'], t_flush)}; "
        f"b: {fmt_changes(changes['b'], t_flush)}; now {paths(a, b)}")
    say(f"  {flushed.name}'s mapping as {other.name} uses it: {seen_before} -> {seen_after} "
        f"({'unchanged' if seen_before == seen_after else 'CHANGED'}); as the relay sees it: "
        f"{relay_before} -> {relay_after}")
    assert ok, f"not recovered 15 s after the flush: paths {paths(a, b)}, last replies {pinger.replies[-3:]}"
    assert resumed - start <= bound, f"pings a -> b stopped {resumed - start:.3f} s (bound {bound:.2f} s: {why})"
    assert paths(a, b) == ("direct", "direct")


def test_rebinding_on_the_pinging_side_recovers_at_the_next_packet(mesh, pair):
    a, b, pinger = pair
    flush_case(mesh, a, b, pinger, a, SENDER_FLUSH_GAP,
               f"a's next echo request re-opens it, + {CPU_SLACK:.0f} s CPU slack")


def test_rebinding_to_a_new_public_port_falls_back_to_relay_then_direct_on_the_new_port(mesh, pair):
    # Before any flush on b's router: b's mapping towards the relay is intact, so this case measures a's
    # rebinding alone (see the relay test below for what a flush on b's side does to the relay path).
    a, b, pinger = pair
    settle(a, b, pinger)
    old = endpoint(b, a)
    old_port = int(old.rsplit(":", 1)[1])
    port = a.status()["listen_port"]
    assert not NEW_PORT_RANGE[0] <= port <= NEW_PORT_RANGE[1], "a's own port lies in the new-port range"
    ns = a.router.ns
    # From now on a's flows leave from another public port (first packet of a flow only: NAT rules
    # apply when conntrack creates the entry); the flush drops the old entries, so the old port is dead.
    ns.run("nft", "insert", "rule", "ip", "labnat", "post", "oifname", "wan0", "ip", "saddr", a.host.addr,
           "meta", "l4proto", "udp", "masquerade", "to", f":{NEW_PORT_RANGE[0]}-{NEW_PORT_RANGE[1]}",
           "comment", "rebind")
    try:
        t_flush = time.time()
        a.router.flush_conntrack()

        def new_port_direct():
            ep = endpoint(b, a)
            return (paths(a, b) == ("direct", "direct") and ep and ep != old
                    and pinger.first_reply(t_flush) and ep)

        new, t_direct = wait_until(new_port_direct, NEW_PORT_DIRECT + 10, 0.05)
        time.sleep(1.0)
        t_end = time.time()
    finally:
        # The rule goes; a's current flows keep their new port (conntrack), new ones get the old one.
        handles = [line.rsplit("# handle ", 1)[1] for line in ns.run("nft", "-a", "list", "chain", "ip", "labnat",
                                                                     "post").splitlines() if '"rebind"' in line]
        for h in handles:
            ns.run("nft", "delete", "rule", "ip", "labnat", "post", "handle", h)
    start, resumed = outage(pinger, t_flush, t_end)
    lost, sent = pinger.lost(t_flush - 1.0, t_end)
    changes = {n.name: path_log(n, p, t_flush) for n, p in ((a, b), (b, a))}
    relay_a = a.status()["relay"]
    say(f"a rebound to a new public port: pings a -> b stopped {resumed - start:.3f} s at most (longest silence "
        f"{start - t_flush:+.3f} s .. {resumed - t_flush:+.3f} s from the flush), {lost}/{sent} lost; path changes a: "
        f"{fmt_changes(changes['a'], t_flush)}; b: {fmt_changes(changes['b'], t_flush)}")
    say(f"  a's address as b uses it: {old} -> {new} (direct again "
        f"{(t_direct - t_flush) if t_direct else float('nan'):.3f} s after the flush); relay sees {relay_a['observed']}, "
        f"a's relay counters {relay_a['counters']}")
    assert new, f"a <-> b not direct on a's new port {NEW_PORT_DIRECT + 10:.0f} s after the rebinding: " \
                f"{paths(a, b)}, b uses {endpoint(b, a)}"
    new_port = int(new.rsplit(":", 1)[1])
    assert new_port != old_port and NEW_PORT_RANGE[0] <= new_port <= NEW_PORT_RANGE[1], (old, new)
    assert resumed - start <= NEW_PORT_GAP, \
        f"pings a -> b stopped {resumed - start:.3f} s (bound {NEW_PORT_GAP:.1f} s: trust {P.TRUST_DURATION} s + " \
        f"slack)\n{log_since(a, t_flush - 0.5)}\n{log_since(b, t_flush - 0.5)}"
    assert t_direct - t_flush <= NEW_PORT_DIRECT, f"direct on the new port {t_direct - t_flush:.3f} s after the flush"


def test_rebinding_on_the_pinged_side_recovers_direct_within_a_heartbeat(mesh, pair):
    a, b, pinger = pair
    flush_case(mesh, a, b, pinger, b, RECEIVER_FLUSH_GAP,
               f"b's next {P.HEARTBEAT_INTERVAL:.0f} s heartbeat re-opens it, + {CPU_SLACK:.0f} s CPU slack")


def to_relay_address(cap: RelayCapture, src_ip: str, t0: float, t1: float) -> list[tuple[float, str]]:
    """(time, kind) of what `src_ip` sent to the relay's port in [t0, t1]: 'stun', 'hello', or the
    relayed kind ('data', 'disco', ...). Any of them re-opens the sender's NAT mapping to the relay."""
    out = []
    for t, src, _, _, _, payload in read_pcap(cap.path):
        if src != src_ip or not t0 <= t <= t1:
            continue
        if payload[4:8] == b"\x21\x12\xa4\x42":
            kind = "stun"
        elif payload.startswith(W.MAGIC) and len(payload) > 4 and payload[4] == W.T_HELLO:
            kind = "hello"
        else:
            kind = relayed_kind(payload) or "other"
        out.append((t, kind))
    return out


def cut_rule(peer_wan: str) -> bytes:
    """As in test_mesh_resilience: a NAT drops all UDP to and from the peer's public address (before its
    own filter); the relay (on the signal host) stays reachable."""
    return (f"table inet cut {{\n chain cutpath {{\n type filter hook forward priority -10;\n"
            f" ip daddr {peer_wan} meta l4proto udp drop\n ip saddr {peer_wan} meta l4proto udp drop\n }}\n}}\n"
            ).encode()


def test_after_a_rebinding_cutting_the_direct_path_still_falls_back_to_the_relay_within_5s(mesh):
    """d's router forgets its mappings, then the direct path c <-> d is cut: the relay must carry the
    pings within 5 s (the issue's failover bound), as it does without the rebinding.

    A fresh pair, with one cut-and-heal cycle first (a direct path that failed over once in the last
    30 s, so no new punch is requested at the fallback: mesh/punch_policy.PUNCH_RELAYED_INTERVAL). All of it
    happens before d's periodic packets to the relay's address (STUN every 20-26 s, relay HELLO every
    25 s, both first sent at the join) could re-open d's mapping by chance; what d sent there is read
    off the wire and printed."""
    c, d = mesh.add_node("c", PR), mesh.add_node("d", PR)
    cut = cut_rule(d.router.wan_ip)
    ns = c.router.ns
    try:
        ip_d, _ = wait_until(d.mesh_ip, 20)
        assert ip_d, f"d got no mesh address in 20 s\n{mesh.logs()}"
        pinger = Pinger(c.host, ip_d, interval=PING_INTERVAL).start()
        mesh.pingers.append(pinger)
        settle(c, d, pinger)
        t_join = max(c.joined_at(), d.joined_at())
        with RelayCapture(mesh.signal) as cap:
            # Cycle 1: cut, both on the relay, heal, direct again (no rebinding yet).
            t_cut1 = time.time()
            ns.run("nft", "-f", "-", input=cut)
            try:
                relayed1, _ = wait_until(lambda: paths(c, d) == ("relay", "relay"), 5.0 + CPU_SLACK)
                flowing1, _ = wait_until(lambda: pinger.first_reply(time.time() - 0.2), 3)
            finally:
                ns.run("nft", "delete", "table", "inet", "cut")
            assert relayed1 and flowing1, f"first cut: not on the relay with pings flowing: {paths(c, d)}"
            back1, _ = wait_until(lambda: paths(c, d) == ("direct", "direct"), 10)
            assert back1, f"first cut healed: not direct again within 10 s: {paths(c, d)}"
            # d's router forgets its mappings; the direct path recovers (d's heartbeat); then the cut.
            t_flush = time.time()
            d.router.flush_conntrack()
            ok, _ = wait_until(lambda: pinger.count(t_flush + 0.2, time.time()) >= 3
                               and paths(c, d) == ("direct", "direct"), 10)
            assert ok, f"direct path not back 10 s after the flush: {paths(c, d)}"
            fwd0 = mesh.forwarded_packets()
            t_cut = time.time()
            ns.run("nft", "-f", "-", input=cut)
            try:
                time.sleep(5.0 + CPU_SLACK + 1.0)    # the bound, then pings must flow (a gap ending at t_end fails)
                t_end = time.time()
                now_paths, fwd1 = paths(c, d), mesh.forwarded_packets()
            finally:
                ns.run("nft", "delete", "table", "inet", "cut")
        _, resumed = outage(pinger, t_cut, t_end)
        if resumed >= t_end:
            resumed = float("inf")                  # still silent at the end of the window
        changes = {n.name: path_log(n, p, t_cut) for n, p in ((c, d), (d, c))}
        sent = to_relay_address(cap, d.router.wan_ip, t_flush, t_end)
        say(f"c <-> d: first cut {t_cut1 - t_join:.2f} s after both joined; flush on d's router at "
            f"{t_flush - t_join:.2f} s, direct again, cut at {t_cut - t_join:.2f} s: pings c -> d flowing again "
            f"{resumed - t_cut:.3f} s after the cut; path changes c: {fmt_changes(changes['c'], t_cut)}; "
            f"d: {fmt_changes(changes['d'], t_cut)}; paths {now_paths}")
        say(f"  server forwarded {fwd1 - fwd0} packets during the cut; d sent to the relay's port after the flush: "
            + (", ".join(f"{k} at {t - t_cut:+.3f} s" for t, k in sent[:6]) + (" ..." if len(sent) > 6 else "")
               if sent else "nothing"))
        assert resumed - t_cut <= 5.0, (
            f"pings c -> d not flowing through the relay {resumed - t_cut:.3f} s after the cut (must be <= 5 s). "
            f"The server forwarded {fwd1 - fwd0} packets towards d, but d sent nothing to the relay's address after "
            f"its router forgot the mapping ({[k for _, k in sent] or 'nothing'}), so the relay's frames die at d's "
            f"NAT until d's next STUN (20-26 s) or relay HELLO ({W.HELLO_INTERVAL:.0f} s) re-opens it"
            f"\n{log_since(c, t_cut - 0.5)}\n{log_since(d, t_cut - 0.5)}")
        back, _ = wait_until(lambda: paths(c, d) == ("direct", "direct"), 10)
        assert back, f"not direct again 10 s after the cut was removed: {paths(c, d)}"
    finally:
        for n in (c, d):                            # free the CPU for the next cases
            n.stop()


@pytest.mark.parametrize("hairpin", [False, True], ids=["no-hairpin", "hairpin"])
def test_lan_peers_behind_one_nat_go_direct_over_their_lan_addresses(mesh, hairpin):
    # With hairpin the routes through the router (its public address, or its LAN address as the
    # hairpin's source) work too, so the choice of the peer's own LAN address is the path logic's
    # preference, not the only way through.
    office = mesh.lab.router(f"office-{int(hairpin)}", PR, hairpin=hairpin)
    n1, n2 = f"l{int(hairpin)}a", f"l{int(hairpin)}b"
    l1 = MeshNode(mesh, n1, mesh.lab.host(n1, office))
    l2 = MeshNode(mesh, n2, mesh.lab.host(n2, office))
    for n in (l1, l2):
        mesh.nodes[n.name] = n
        n.start()
    ip_l2, _ = wait_until(l2.mesh_ip, 20)
    assert ip_l2, f"{n2} got no mesh address in 20 s\n{mesh.logs()}"
    pinger = Pinger(l1.host, ip_l2, interval=PING_INTERVAL).start()
    mesh.pingers.append(pinger)
    joined, _ = wait_until(lambda: l1.joined_at() and l2.joined_at() and max(l1.joined_at(), l2.joined_at()), 20)
    assert joined, f"{n1} or {n2} did not join within 20 s\n{mesh.logs()}"

    def own_lan(x: MeshNode, y: MeshNode) -> bool:
        """x reaches y at y's own LAN address (not the router's public or LAN address, not the relay)."""
        ep = endpoint(x, y)
        return bool(ep) and ep.rsplit(":", 1)[0] == y.host.addr

    ok, t_lan = wait_until(lambda: paths(l1, l2) == ("direct", "direct") and own_lan(l1, l2) and own_lan(l2, l1), 10)
    time.sleep(1.0)      # hysteresis must keep it there
    first = pinger.first_reply()
    st1 = l1.status_cli()                                   # the command a user runs
    p1, p2 = l1.peer(n2, st1), l2.peer(n1)
    say(f"LAN peers behind {office.wan_ip} (LAN {office.lan_prefix}.0/24, hairpin {'on' if hairpin else 'off'}): "
        f"first ping {(first - joined) if first else float('nan'):.3f} s, both direct on their own LAN addresses "
        f"{(t_lan - joined) if t_lan else float('nan'):.3f} s after both joined; {n1} ({l1.host.addr}) uses "
        f"{p1['endpoint']} ({p1['latency_ms']} ms), {n2} ({l2.host.addr}) uses {p2['endpoint']} "
        f"({p2['latency_ms']} ms); {n1} knows {n2}'s candidates {p1['candidates']}")
    assert ok, f"{n1} <-> {n2} not direct over their own LAN addresses 10 s after joining: {paths(l1, l2)}, " \
               f"{n1} uses {endpoint(l1, l2)}, {n2} uses {endpoint(l2, l1)} (own addresses {l1.host.addr}, " \
               f"{l2.host.addr}; router {office.lan_gw} / {office.wan_ip})"
    for p in (p1, p2):
        assert p["path"] == "direct" and p["relay_reason"] is None, p
    assert own_lan(l1, l2) and own_lan(l2, l1), f"left the LAN path: {endpoint(l1, l2)}, {endpoint(l2, l1)}"
    assert l1.ping(ip_l2, count=10, interval=0.05), \
        f"pings {n1} -> {n2} lost over the LAN path: {tunnel_report(l1, l2)}"
