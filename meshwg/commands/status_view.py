"""What `meshwg status` (one line per peer), `meshwg ip` and `meshwg whois` print, from the agent's status reply.

Pure: a status dict (meshwg.io.agent.agent.Agent.status, also `meshwg status --json`) in, text out.

Idle: a mesh peer the node reports not `active` (no tunnel traffic either way for SESSION_ACTIVE_TIMEOUT, 45 s)
while its path is not direct. PeerPaths probes and heartbeats only active peers, so an idle peer's direct path
times out for want of heartbeats, not answers: it is shown as idle with the last direct address (`last_direct`),
never as relayed, and traffic brings the direct path back at once.
"""

from __future__ import annotations

import ipaddress

from meshwg.commands.common import human_bytes

COLUMNS = ("NAME", "IPV4", "PATH", "LATENCY", "HANDSHAKE", "RX / TX")


def is_idle(p: dict) -> bool:
    """Nothing sends and nothing probes (see the module docstring); old replies without `active` never are."""
    return not p.get("plain") and p.get("path") != "direct" and p.get("active") is False


def idle_text(p: dict) -> str:
    return f"idle (last direct {p['last_direct']})" if p.get("last_direct") else "idle"


def _host(hostport: str) -> str:
    """"203.0.113.5:3478" -> "203.0.113.5"; "[2001:db8::1]:3478" -> "2001:db8::1"."""
    host = hostport.rsplit(":", 1)[0] if ":" in hostport else hostport
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def relay_text(relay: dict) -> str:
    """The node's relay transport: "relay HOST/UDP", "relay HOST/TCP", "relay down" (none ready)."""
    mode = relay.get("mode") or "none"
    addrs = relay.get(mode) if mode in ("udp", "tcp") else None
    if not addrs:
        return "relay down" if mode not in ("udp", "tcp") else f"relay {mode.upper()}"
    return f"relay {_host(addrs[0])}/{mode.upper()}"


def path_text(p: dict, relay: dict) -> str:
    if p.get("plain"):
        return f"plain direct {p['endpoint']}" if p["path"] == "direct" else "plain relay"
    if p["path"] == "direct":
        return f"direct {p['endpoint']}"
    if is_idle(p):
        return idle_text(p)
    return relay_text(relay)


def _ipv4(p: dict) -> str:
    """The peer's mesh IPv4: its first IPv4 host address (an exit node's AllowedIPs also hold 0.0.0.0/0, a
    router's its LAN), else its first IPv4 prefix."""
    v4 = [a for a in p.get("addresses") or () if ":" not in a]
    hosts = [a for a in v4 if "/" not in a or a.endswith("/32")]
    return (hosts or v4 or ["-"])[0].split("/", 1)[0]


def age(seconds) -> str:
    if seconds is None:
        return "never"
    s = int(seconds)
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s ago"
    return f"{s // 3600}h{s % 3600 // 60:02d}m ago"


def _notes(p: dict) -> str:
    notes = []
    if not p.get("online") and not p.get("plain"):   # as `-d` says "(offline)"
        notes.append("offline")
    if p.get("exit_node"):
        notes.append("exit node, in use" if p.get("exit_node_in_use") else "exit node")
    return "; ".join(notes)


def peer_row(p: dict, relay: dict) -> list[str]:
    latency = f"{p['latency_ms']:.2f} ms" if p["path"] == "direct" and p.get("latency_ms") is not None else "-"
    return [p["name"], _ipv4(p), path_text(p, relay), latency, age(p.get("last_handshake_ago")),
            f"{human_bytes(p['rx_bytes'])} / {human_bytes(p['tx_bytes'])}", _notes(p)]


def align(rows: list[list[str]], indent: str = "") -> list[str]:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]


def format_brief(st: dict, header: str, control: str | None) -> str:
    """`meshwg status`: the node's line (`header`, plus the control line when it is down), then one line a peer."""
    lines = [header] + ([f"  control: {control}"] if control else [])
    if not st["peers"]:
        return "\n".join(lines + ["  no peers"])
    rows = [list(COLUMNS) + [""]] + [peer_row(p, st.get("relay") or {}) for p in st["peers"]]
    return "\n".join(lines + align(rows, "  "))


# ---- `meshwg ip`, `meshwg whois` -----------------------------------------------------------------------------


class NotFound(LookupError):
    """A name or address nobody in the reply holds (the CLI says it in one line)."""


def addresses_of(st: dict, name: str | None, family: int | None) -> list[str]:
    """This node's mesh addresses (name None or its own name), else the named peer's; family 4, 6 or None."""
    if name is None or name == st.get("name"):
        addrs = st.get("addresses") or []
    else:
        peer = next((p for p in st["peers"] if p["name"] == name), None)
        if peer is None:
            raise NotFound(f"no peer named {name!r}")
        # A peer's addresses are its AllowedIPs: an exit node's 0.0.0.0/0 and ::/0, a router's LAN are not its own.
        addrs = [a for a in peer.get("addresses") or () if _is_host(a)]
    out = []
    for a in addrs:
        ip = ipaddress.ip_interface(a).ip
        if family is None or ip.version == family:
            out.append(str(ip))
    return out


def _is_host(text: str) -> bool:
    net = ipaddress.ip_interface(text).network
    return net.prefixlen == net.max_prefixlen


def whois(st: dict, text: str) -> str:
    """Who holds the mesh address `text`, or routes it: the most specific prefix wins."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None
    if any(ipaddress.ip_interface(a).ip == ip for a in st.get("addresses") or ()):
        return f"{st['name']}  this node  {ip}"
    best = None   # (prefix length, line)
    for p in st["peers"]:
        kind = "plain peer" if p.get("plain") else "peer"
        for a in p.get("addresses") or ():
            iface = ipaddress.ip_interface(a)
            if iface.network.prefixlen == iface.network.max_prefixlen and iface.ip == ip:
                return f"{p['name']}  {kind}  {ip}"
        for r in list(p.get("routes") or ()) + list(p.get("routed") or ()):
            net = ipaddress.ip_network(r, strict=False)
            if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
                via = "exit node" if net.prefixlen == 0 else f"routes {net}"
                best = (net.prefixlen, f"{p['name']}  {kind}  {via}")
    if best is None:
        raise NotFound(f"no peer holds or routes {ip}")
    return best[1]
