"""`meshwg join INVITE`, `meshwg status [-d] [--json]`, `meshwg ip`, `meshwg whois`, `meshwg netcheck [--json]`,
`meshwg set ...`.

`join` runs the node agent in the foreground until SIGTERM/SIGINT (then removes the interface);
`status` (its text: meshwg.commands.status_view), `ip`, `whois` and `netcheck` ask the running agent over its
local socket (meshwg.io.ipc.status_server; without --interface, the one agent that runs); `netcheck`
adds the RFC 5780 mapping/filtering tests against the signal server's STUN addresses (meshwg.io.agent.netcheck_probe),
IPv6 reachability and the gateway's port-mapping protocols (meshwg.io.agent.portmap_probe), all at once and time-boxed,
and runs standalone with `--server HOST:PORT` (no agent needed). `set` changes the running agent's subnet routes and
exit node (issue 12) the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from meshwg.commands import status_view as SV
from meshwg.commands.common import IFACE_RE, human_bytes
from meshwg.errors import UserError

DEFAULT_STATE_DIR = "/var/lib/meshwg"
DEFAULT_IFACE = "meshwg0"

log = logging.getLogger("meshwg.join")


def _iface(text: str) -> str:
    if not IFACE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"bad interface name {text!r} (1-15 of a-z A-Z 0-9 _=+.-)")
    return text


def _common(p: argparse.ArgumentParser, query: bool = False) -> None:
    """`query`: a command that asks the running agent, which it finds itself when no interface is given."""
    if query:
        p.add_argument("--interface", "-i", type=_iface, default=None,
                       help="the agent's interface (default: the one agent running)")
    else:
        p.add_argument("--interface", "-i", type=_iface, default=DEFAULT_IFACE,
                       help=f"interface (default {DEFAULT_IFACE})")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"state directory (default {DEFAULT_STATE_DIR})")


def _join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("invite", nargs="?",
                   help="invite string from `meshwg-signal invite create` (mwg1_...); visible in `ps` to every "
                        "local user while the command runs: prefer --invite-file or $MESHWG_INVITE. Needed only "
                        "for the first join: a registered node starts from its state directory")
    p.add_argument("--invite-file", metavar="FILE",
                   help="read the invite from FILE ('-': standard input)")
    p.add_argument("--name", help="node name shown to other nodes (default: chosen by the server)")
    p.add_argument("--listen-port", type=int, default=0, help="UDP port (default: the last one used, else random)")
    p.add_argument("--accept-dns", action="store_true",
                   help="let this host's resolver ask the mesh for NAME.<mesh domain> (systemd-resolved per-link DNS "
                        "for that domain only, else a change to /etc/resolv.conf undone at exit)")
    _routing_args(p, join=True)
    _common(p)


def _routing_args(p: argparse.ArgumentParser, join: bool) -> None:
    """Subnet routes and exit nodes: the same flags for `join` (kept in the state directory) and `set`."""
    p.add_argument("--advertise-routes", metavar="CIDR[,CIDR...]",
                   help="offer to route these prefixes (e.g. the home LAN) for the mesh; the server's administrator "
                        "approves them ('none': stop)")
    if join:
        p.add_argument("--advertise-exit-node", action="store_const", const="on",
                       help="offer to be an exit node (the mesh's internet traffic through this node)")
    else:
        p.add_argument("--advertise-exit-node", metavar="on|off", help="offer to be an exit node, or stop")
    p.add_argument("--exit-node", metavar="NAME|none",
                   help="send all internet traffic through that node (an approved exit node); 'none': stop")
    p.add_argument("--snat-routes", metavar="on|off",
                   help="masquerade what the mesh sends through this node's routes (default on; off keeps the "
                        "source addresses, the LAN then needs a route back to the mesh)")
    p.add_argument("--public-endpoint", metavar="IP:PORT|none",
                   help="a port forward to this node's UDP port (set it up on the router, with --listen-port to fix "
                        "the port): reported to the server as reachable with no punch, for phones' configs "
                        "(`meshwg-signal plain add --direct`); 'none': stop")


def _routing_overrides(args, what: str) -> dict:
    """The routing flags given, as RoutingChoice fields (exit_node None: 'none'); one-line errors naming the value."""
    from meshwg.mesh import routing as RT

    out: dict = {}
    try:
        if args.advertise_routes is not None:
            out["advertise"] = RT.parse_advertised(args.advertise_routes)
        if args.advertise_exit_node is not None:
            out["advertise_exit"] = RT.parse_on_off(args.advertise_exit_node, "--advertise-exit-node")
        if args.snat_routes is not None:
            out["snat"] = RT.parse_on_off(args.snat_routes, "--snat-routes")
        if args.exit_node is not None:
            out["exit_node"] = RT.parse_exit_node(args.exit_node)
        if args.public_endpoint is not None:
            out["public_endpoint"] = RT.parse_public_endpoint(args.public_endpoint)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from None
    return out


def run_join(args) -> int:
    import trio

    from meshwg.signaling.invite import InviteFormatError, parse_invite
    from meshwg.io.agent.agent import Agent, AgentError

    if logging.getLogger().level > logging.INFO:
        # A daemon should say what it does; the global default is quieter for one-shot commands.
        logging.getLogger("meshwg").setLevel(logging.INFO)
    # No local name holds the invite: once registered, the agent's copy loses its secret and nothing
    # else keeps it alive.
    routing = _routing_overrides(args, "join")
    agent = Agent(_load_invite(args, parse_invite, InviteFormatError), name=args.name, state_dir=args.state_dir,
                  iface=args.interface, listen_port=args.listen_port, routing=routing, accept_dns=args.accept_dns)
    try:
        trio.run(agent.run)
    except AgentError as err:
        raise UserError(f"join: {err}") from None
    except OSError as err:
        raise UserError(f"join: {err}") from None
    return 0


INVITE_ENV = "MESHWG_INVITE"


def _invite_text(args) -> tuple[str | None, str]:
    """The invite's text and where it came from: the argument, --invite-file, or $MESHWG_INVITE."""
    import os

    from_env = os.environ.pop(INVITE_ENV, None)  # never inherited by anything this process starts
    given = [src for src, present in (("argument", args.invite), ("--invite-file", args.invite_file)) if present]
    if len(given) > 1:
        raise UserError("join: give the invite once: as an argument or with --invite-file")
    if args.invite_file:
        path = args.invite_file
        try:
            text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"join: {path}: cannot read the invite: {getattr(err, 'strerror', None) or err}") from None
        return text, "standard input" if path == "-" else path
    if args.invite:
        return args.invite, "argument"
    return from_env, f"${INVITE_ENV}"


def _load_invite(args, parse_invite, format_error):
    """The invite to join with; a registered node without one uses the server recorded in its state."""
    from meshwg.io.agent import agent_state
    from meshwg.io.agent.agent import cached_invite

    text, source = _invite_text(args)
    args.invite = None  # the secret is not kept around longer than needed
    if text and text.strip():
        try:
            return parse_invite(text)
        except format_error as err:
            raise UserError(f"join: {source}: {err}") from None
    invite = cached_invite(agent_state.load_cache(args.state_dir))
    if invite is None:
        raise UserError(f"join: no invite given and {args.state_dir} holds no registration: pass an invite "
                        f"(--invite-file FILE, ${INVITE_ENV} or as an argument)")
    return invite


def _agent_iface(args) -> str:
    """--interface, else the one agent whose status socket answers (several: the user picks)."""
    from meshwg.io.ipc import status_server

    if args.interface:
        return args.interface
    listed = status_server.listed_agents()
    running = listed if len(listed) == 1 else status_server.running_agents()   # one: its own errors say it
    if not running:
        raise UserError("no meshwg agent is running (start one with `meshwg join`)")
    if len(running) > 1:
        raise UserError(f"several meshwg agents are running: {', '.join(running)} (choose one with -i)")
    args.interface = running[0]
    return running[0]


def _query(args, request: dict) -> dict:
    from meshwg.io.ipc import status_server

    iface = _agent_iface(args)
    try:
        return status_server.query(iface, request)
    except (FileNotFoundError, ConnectionRefusedError):
        raise UserError(f"no meshwg agent is running on {iface} (start one with `meshwg join`)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot query the agent on {iface}: {err}") from None



def _control_text(c: dict) -> str:
    if c["connected"]:
        return "connected"
    text = "DISCONNECTED (tunnels keep running)"
    if c.get("last_error"):
        text += f": {c['last_error']}"
        if c.get("error_kind") == "suspect":
            text += " [check the server's address and database: it does not look like the server this node joined]"
    if c.get("retry_in") is not None:
        text += f"; retrying in {c['retry_in']:.0f} s"
    return text


def run_set(args) -> int:
    """`meshwg set`: the running agent's subnet routes and exit node, without a restart."""
    _routing_overrides(args, "set")   # the same one-line errors before asking the agent
    req = {"op": "set", "advertise_routes": args.advertise_routes, "advertise_exit_node": args.advertise_exit_node,
           "exit_node": args.exit_node, "snat_routes": args.snat_routes, "public_endpoint": args.public_endpoint}
    if all(v is None for k, v in req.items() if k != "op"):
        raise UserError("set: nothing to change (give --advertise-routes, --advertise-exit-node, --exit-node, "
                        "--snat-routes or --public-endpoint)")
    rep = _query(args, req)
    if "error" in rep:
        raise UserError(f"set: {rep['error']}")
    print(_routing_text(rep["routing"]))
    return 0


def _set_args(p: argparse.ArgumentParser) -> None:
    _routing_args(p, join=False)
    _common(p, query=True)


def _routing_text(r: dict) -> str:
    adv = ", ".join(r["advertise_routes"]) or "-"
    line = f"  advertising: routes {adv}; exit node {'yes' if r['advertise_exit_node'] else 'no'}"
    if r["advertise_routes"] or r["advertise_exit_node"]:
        line += f"; masquerade {'on' if r['snat_routes'] else 'off'}"
    if r.get("exit_node"):
        line += f"\n  exit node: {r['exit_node']}" + (" (in use)" if r.get("exit_node_in_use") else
                                                      " (not in use: not an approved exit node in the directory)")
    if r.get("public_endpoint"):
        line += f"\n  public endpoint: {r['public_endpoint']} (port forward)"
    elif r.get("public_candidates"):
        line += f"\n  public endpoint: {', '.join(r['public_candidates'])} (netcheck: no NAT filtering)"
    return line


def _acl_text(p: dict) -> str:
    """Both directions in one line: what we may send the peer (the directory's word, the peer enforces it) and what
    our filter accepts from it."""
    accepts = p["accepts"] if p.get("accepts") is not None else "all (no policy)"
    sends = p.get("sends")
    if sends is None:
        sends = "all (no policy)" if p.get("accepts") is None else "unknown"   # a server that sends no offers
    return f"sends: {sends}; accepts: {accepts}"


def _node_line(st: dict) -> str:
    tags = f"  tags {','.join(st['tags'])}" if st.get("tags") else ""
    return (f"{st['interface']}: {st['name']}  {', '.join(st['addresses']) or '(no address yet)'}  "
            f"port {st['listen_port']}{tags}")


def format_brief(st: dict) -> str:
    """`meshwg status`: one line a peer (meshwg.commands.status_view); the control line only when it is down."""
    down = None if st["control"]["connected"] else _control_text(st["control"])
    return SV.format_brief(st, _node_line(st), down)


def format_status(st: dict) -> str:
    """`meshwg status -d`: everything, a few lines a peer."""
    lines = [_node_line(st),
             f"  control: {_control_text(st['control'])}"
             f"  relay: {st['relay']['mode']}"
             + (f" ({st['relay']['latency_ms']} ms)" if st['relay'].get('latency_ms') is not None else ""),
             f"  NAT: {st['nat']['mapping'] or 'unknown'}; reflexive {', '.join(st['nat']['reflexive']) or '-'}"]
    held = (st.get("routes") or {}).get("conflicting")
    if held:
        lines.append(f"  routes: {', '.join(held)} routed through another interface (left alone: unreachable here)")
    if st.get("routing"):
        lines.append(_routing_text(st["routing"]))
    if not st["peers"]:
        lines.append("  no peers")
    # Access control (issue 13): once any peer has an accept list, every peer says what it may send us.
    policy = any(p.get("accepts") is not None for p in st["peers"])
    for p in st["peers"]:
        if p.get("plain"):
            # A stock WireGuard device, never online itself: direct when it reaches our public endpoint.
            path = f"plain (direct) {p['endpoint']}" if p["path"] == "direct" else "plain (relay)"
        elif p["path"] == "direct":
            path = f"direct {p['endpoint']}" + (f", {p['latency_ms']:.2f} ms" if p["latency_ms"] is not None else "")
        elif SV.is_idle(p):
            # Not "relay (...)": nothing is sent or probed, and traffic brings the direct path back at once.
            path = SV.idle_text(p)
        else:
            path = f"relay ({p['relay_reason']})" if p.get("relay_reason") else "relay"
        offline = "" if p.get("online") or p.get("plain") else "  (offline)"
        mark = "  [exit node" + (", in use]" if p.get("exit_node_in_use") else "]") if p.get("exit_node") else ""
        ptags = f"  [tags {','.join(p['tags'])}]" if p.get("tags") else ""
        lines.append(f"  peer {p['name']}  {', '.join(p['addresses'])}{offline}{mark}{ptags}")
        if policy:
            lines.append(f"    {_acl_text(p)}")
        if p.get("routes"):
            refused = sorted(set(p["routes"]) - set(p.get("routed") or ()))
            lines.append(f"    routes: {', '.join(p['routes'])}"
                         + (f" (not routed here: {', '.join(refused)})" if refused else ""))
        lines.append(f"    path: {path}")
        lines.append(f"    handshake: {SV.age(p['last_handshake_ago'])}  "
                     f"transfer: {human_bytes(p['rx_bytes'])} received, {human_bytes(p['tx_bytes'])} sent")
    if "counters" in st:
        lines.append("  counters:" + ("" if st["counters"] else " none"))
        lines += [f"    {key} {n}" for key, n in st["counters"].items()]
    return "\n".join(lines)


def run_status(args) -> int:
    st = _query(args, {"op": "status"})
    if "error" in st:
        raise UserError(f"status: {st['error']}")
    if not args.detail:
        st.pop("counters", None)
    print(json.dumps(st, indent=1) if args.json else format_status(st) if args.detail else format_brief(st))
    return 0


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p, query=True)


def _status_only_args(p: argparse.ArgumentParser) -> None:
    _status_args(p)
    p.add_argument("-d", "--detail", action="store_true",
                   help="a few lines a peer (why relayed, routes, access control) and every counter, by component "
                        "(<component>.<verb>_<object>; drop_* for what was lost)")


def _status_for(args, what: str) -> dict:
    st = _query(args, {"op": "status"})
    if "error" in st:
        raise UserError(f"{what}: {st['error']}")
    return st


def run_ip(args) -> int:
    """`meshwg ip [-4|-6] [NAME]`: this node's mesh addresses, or a peer's, one a line."""
    try:
        addrs = SV.addresses_of(_status_for(args, "ip"), args.peer, args.family)
    except SV.NotFound as err:
        raise UserError(f"ip: {err}") from None
    if not addrs:
        which = f"IPv{args.family} " if args.family else ""
        raise UserError(f"ip: {args.peer or 'this node'} has no {which}mesh address yet")
    print("\n".join(addrs))
    return 0


def _ip_args(p: argparse.ArgumentParser) -> None:
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=4, help="only the IPv4 address")
    fam.add_argument("-6", dest="family", action="store_const", const=6, help="only the IPv6 address")
    p.add_argument("peer", nargs="?", metavar="NAME", help="a peer's name (default: this node)")
    _common(p, query=True)


def run_whois(args) -> int:
    """`meshwg whois IP`: the node, peer or plain peer that holds a mesh address or routes it."""
    try:
        print(SV.whois(_status_for(args, "whois"), args.ip))
    except (SV.NotFound, ValueError) as err:
        raise UserError(f"whois: {err}") from None
    return 0


def _whois_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ip", metavar="IP", help="a mesh address, or an address in a subnet a peer routes")
    _common(p, query=True)


def _netcheck_args(p: argparse.ArgumentParser) -> None:
    _status_args(p)
    p.add_argument("--server", action="append", metavar="HOST:PORT",
                   help="the meshwg signal server's STUN address(es) to test against (default: the running "
                        "agent's, else the last ones it used, from --state-dir); no agent needed")
    p.add_argument("--stun", metavar="HOST:PORT", help="also run the RFC 5780 tests against this third-party STUN "
                   "server (one with two addresses, e.g. coturn); its verdicts fill in what the others left unknown")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each STUN test (default 1)")


def _server_addrs(args, rep: dict | None) -> list[tuple]:
    """Where the built-in server's STUN answers: --server, else the agent's report, else its cache."""
    from meshwg.signaling.invite import split_hostport

    if args.server:
        try:
            return [split_hostport(s) for s in args.server]
        except ValueError as err:
            raise UserError(f"netcheck: --server: {err}") from None
    texts = list((rep or {}).get("stun_servers") or [])
    if not texts:
        from meshwg.io.agent.agent_state import load_cache

        cache = load_cache(args.state_dir) or {}
        return [tuple(a) for a in (cache.get("welcome") or {}).get("stun", []) if len(a) == 2]
    out = []
    for t in texts:
        try:
            out.append(split_hostport(t))
        except ValueError:
            continue
    return out


def _standalone_report(nat: dict) -> dict:
    """A netcheck report without an agent, from our probe (against the server, else the --stun one)."""
    return {"agent": False, "udp": nat["udp"], "mapping": nat["mapping"], "filtering": nat["filtering"],
            "hard": nat["hard"], "reflexive": nat["reflexive"],
            "stun_servers": [nat["server"]] + ([nat["other_address"]] if nat["other_address"] else []),
            "relay": {"mode": "none", "udp": [], "latency_ms": None}, "relay_latency_ms": None,
            "stun_rtt_ms": nat["stun_rtt_ms"], "nat_probe": nat}


def _progress_enabled() -> bool:
    """Progress lines only for a person watching (as curl and apt do): scripts read stdout and stay quiet."""
    return sys.stderr.isatty()


class _Progress:
    def __init__(self, enabled: bool, t0: float) -> None:
        self.enabled, self.t0 = enabled, t0

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"netcheck: {text} ({time.monotonic() - self.t0:.1f} s)", file=sys.stderr, flush=True)


def _netcheck_budget(timeout: float) -> float:
    """The whole probe phase: the mapping tests start after the first answer, so two test timeouts, plus slack."""
    return 2 * timeout + 1.5


async def _run_probes(args, servers: list, nat_needed: bool, progress: _Progress) -> dict:
    """Every probe at once (NAT tests, IPv6, port mapping, --stun), all within _netcheck_budget: a probe that
    has not finished by then reports nothing."""
    import trio

    from meshwg.io.agent import netcheck_probe, portmap_probe

    out: dict = {}

    async def step(key: str, what: str, fn) -> None:
        progress.say(f"{what}...")
        try:
            out[key] = await fn()
        except OSError as err:
            progress.say(f"{what}: {err}")
            return
        progress.say(f"{what}: done")

    async def third_party():
        host, port = args.stun_addr
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
        ip = sorted((i[4][0] for i in infos), key=lambda a: ":" in a)[0]
        return await netcheck_probe.probe((ip, port), timeout=args.timeout)

    with trio.move_on_after(_netcheck_budget(args.timeout)) as scope:
        async with trio.open_nursery() as n:
            if nat_needed and servers:
                n.start_soon(step, "nat", "NAT mapping and filtering tests",
                             lambda: netcheck_probe.probe_servers(servers, timeout=args.timeout))
            n.start_soon(step, "ipv6", "IPv6 reachability",
                         lambda: netcheck_probe.probe_ipv6(servers, timeout=args.timeout))
            n.start_soon(step, "port_mapping", "port mapping (UPnP, PCP, NAT-PMP)",
                         lambda: portmap_probe.probe(timeout=portmap_probe.DEFAULT_TIMEOUT))
            if args.stun:
                n.start_soon(step, "stun", f"RFC 5780 tests via {args.stun}", third_party)
    if scope.cancelled_caught:
        progress.say("time is up: what has not answered is reported as unknown")
    return out


def _stun_verdicts(rep: dict, third: dict) -> None:
    """--stun's verdicts fill in what our server's tests left unknown."""
    from meshwg.disco import netcheck as NC

    rep["stun"] = third
    if rep.get("filtering", NC.UNKNOWN) == NC.UNKNOWN:
        rep["filtering"] = third["filtering"]
    if rep.get("mapping", NC.UNKNOWN) in (NC.UNKNOWN, NC.NO_UDP) and third["mapping"] not in (NC.UNKNOWN, NC.NO_UDP):
        rep["mapping"], rep["hard"] = third["mapping"], third["hard"]


def netcheck_report(args, progress: _Progress) -> dict:
    """The agent's report (if one runs) with every probe merged in; `summary` is derived last, from the fields."""
    import trio

    from meshwg.disco import netcheck as NC
    from meshwg.io.agent import netcheck_probe
    from meshwg.signaling.invite import split_hostport

    args.stun_addr = None
    if args.stun:
        try:
            args.stun_addr = split_hostport(args.stun)
        except ValueError as err:
            raise UserError(f"netcheck: --stun: {err}") from None
    rep = None
    no_agent = None
    progress.say("asking the agent...")
    try:
        rep = _query(args, {"op": "netcheck"})
    except UserError as err:
        no_agent = err
    if rep is not None and "error" in rep:
        raise UserError(f"netcheck: {rep['error']}")
    servers = _server_addrs(args, rep)
    # An agent that probes itself already said it all (its report carries nat_probe).
    found = trio.run(_run_probes, args, servers, rep is None or "nat_probe" not in rep, progress)
    nat, third = found.get("nat"), found.get("stun")
    if rep is None:
        if nat is None and third is None:
            raise no_agent or UserError("netcheck: no STUN server known (give --server HOST:PORT)")
        rep = _standalone_report(nat or third)
    else:
        rep["agent"] = True
        if nat is not None:
            netcheck_probe.merge(rep, nat)
    if third is not None:
        _stun_verdicts(rep, third)
    rep["ipv6"] = found.get("ipv6")
    rep["port_mapping"] = found.get("port_mapping")
    rep["summary"] = NC.summarize(rep)
    return rep


def _ipv6_text(v6: dict | None) -> str:
    from meshwg.disco import netcheck as NC

    if v6 is None:
        return "unknown (no answer in time)"
    text = NC.ipv6_verdict(v6)
    if v6.get("udp"):
        text += f", reflexive {v6['reflexive'] or '-'} (STUN via {v6['server']})"
    return text


def netcheck_text(rep: dict) -> str:
    from meshwg.disco import portmap as PM

    lines = ["Report:", f"  UDP: {'yes' if rep['udp'] else 'no (relay over TCP only)'}"]
    probe = rep.get("nat_probe")
    public = " (no NAT: our address is public)" if probe and probe.get("behind_nat") is False else ""
    lines.append(f"  mapping: {rep['mapping']}{' (hard NAT: direct paths need help)' if rep['hard'] else ''}{public}")
    how = (f" (RFC 5780 tests via {probe['server']} + {probe['other_address']})"
           if probe and probe.get("other_address") else
           " (the server has no second address: run it with two --udp addresses)" if probe else "")
    lines.append(f"  filtering: {rep.get('filtering', 'unknown')}{how}")
    if rep.get("stun"):
        s = rep["stun"]
        lines.append(f"  third-party STUN via {s['server']}: mapping {s['mapping']}, filtering {s['filtering']}")
    lines.append(f"  reflexive: {', '.join(rep['reflexive']) or '-'}  "
                 f"(STUN servers: {', '.join(rep['stun_servers']) or '-'})")
    lines.append(f"  IPv6: {_ipv6_text(rep.get('ipv6'))}")
    lines.append(f"  port mapping: {PM.portmap_text(rep.get('port_mapping'))}")
    r = rep["relay"]
    if r["mode"] == "none" and rep.get("stun_rtt_ms") is not None:
        lines.append(f"  relay: no agent running; STUN round trip to the server {rep['stun_rtt_ms']} ms")
    else:
        lines.append(f"  relay: {r['mode']}, UDP {', '.join(r['udp']) or '-'}: "
                     + (f"{r['latency_ms']} ms" if r["latency_ms"] is not None else "no answer")
                     + (f"; TCP {r['tcp_latency_ms']} ms" if r.get("tcp_latency_ms") is not None else ""))
    for g in r.get("regions") or ():   # relays in regions (issue 14.3): each one's latency, home marked
        lat = "down" if g.get("down") else f"{g['latency_ms']} ms" if g.get("latency_ms") is not None else "no answer"
        lines.append(f"  relay region {g['region']}{' (home)' if g.get('home') else ''}: "
                     f"UDP {', '.join(g.get('udp') or ()) or '-'}: {lat}")
    lines.append(f"  summary: {rep['summary']}")
    return "\n".join(lines)


def run_netcheck(args) -> int:
    t0 = time.monotonic()
    rep = netcheck_report(args, _Progress(_progress_enabled(), t0))
    print(json.dumps(rep, indent=1) if args.json else netcheck_text(rep))
    print(f"  ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    return 0


COMMANDS = {
    "join": ("Join a mesh with an invite and run the node agent (foreground).", _join_args, run_join),
    "status": ("Show the mesh peers of the running agent, one a line: path, latency, handshake, transfer.",
               _status_only_args, run_status),
    "ip": ("Print this node's mesh addresses, or a peer's.", _ip_args, run_ip),
    "whois": ("Name the node or peer that holds a mesh address or routes it.", _whois_args, run_whois),
    "netcheck": ("Report NAT mapping/filtering, reflexive addresses and relay latency.", _netcheck_args, run_netcheck),
    "set": ("Change the running agent's advertised routes, exit node offer and the exit node it uses.", _set_args,
            run_set),
}
