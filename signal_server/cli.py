"""meshwg-signal: serve | relay | invite create/list/revoke | nodes [list/rename/expire/remove/tag/untag]
| plain add/list/config/rotate/remove | routes list/approve/reject | policy check | status | pubkey | backup | restore.

Admin commands (invite, nodes, plain, routes, policy check, status, pubkey) ask the running server through its
admin socket (signal_server/admin_socket.py; by default admin.sock next to the database, --admin-socket), which does
them on its database and pushes the change to peers at once; with no server running they open the database
themselves (WAL + busy timeout; the change feed tells a server started later). Only `serve --init` creates a
database (and with it the server's identity); everything else needs one.
Options also come from a TOML config file (--config, default /etc/meshwg/signal.toml when it exists), under the
command line's: keys are the long option names, in a table per command ([serve], [relay], [invite.create]) or at the
top level for every command that has the option (db); meshwg/cli_config.py derives them from these parsers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
import urllib.request

from meshwg import cli_config, logfmt
from meshwg import completion

# Absolute: a relative default named a different (new, empty) database in every working directory.
DEFAULT_DB = os.environ.get("MESHWG_SIGNAL_DB", "/var/lib/meshwg-signal/signal.db")
DEFAULT_CONFIG = "/etc/meshwg/signal.toml"


def _listen_list(values, default):
    from meshwg.signaling.invite import split_hostport

    if values is None:
        return default
    if values == ["none"]:
        return []
    return [split_hostport(v) for v in values]


def _alt_port(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, 'auto' or 'none', not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range")
    return port


def _positive(parse, what: str):
    """An argparse type: `parse` (int or float) of the text, above zero and finite."""
    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what} above zero, not {text!r}")
        return value
    return check


_positive_int = _positive(int, "a whole number")
_positive_float = _positive(float, "a number")


def _non_negative_float(text: str) -> float:
    """0 (no limit) or a number above zero."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _positive_float(text)


def _raise_fd_limit() -> None:
    """Every connection costs a descriptor, and the soft limit is often 1024: take what the hard limit
    allows, so the relay's share (and the rest, kept for the control listener) are worth having."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _fmt_time(t):
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _dns_domain(text: str) -> str:
    """--dns-domain: a DNS name (canonical: lower case, no trailing dot), or 'none' ("": names off)."""
    from meshwg.mesh.dns_names import normalize_domain

    if text.strip().lower() == "none":
        return ""
    domain = normalize_domain(text)
    if domain is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a DNS name (letters, digits, hyphens; labels of 1-63 "
                                         f"characters separated by dots) nor 'none'")
    return domain


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: nested subcommands share these options without resetting what an outer level parsed.
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help=f"SQLite state file, or a postgresql:// URL (default {DEFAULT_DB})")
    common.add_argument("--admin-socket", metavar="PATH|none", default=argparse.SUPPRESS,
                        help="the running server's admin socket: serve listens on it (mode 0600; 'none': no socket), "
                             "the admin commands ask through it (default admin.sock next to --db)")
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"],
                        help="least severe messages logged (default info)")
    common.add_argument("--log-format", default=argparse.SUPPRESS, choices=list(logfmt.FORMATS),
                        help="text lines (UTC time, level, logger: message) or one JSON object per line (default text)")
    common.add_argument("--config", dest="config_file", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML config file: keys are long option names, a table per command ([serve]), shared "
                             f"ones at the top (db); flags override it (default {DEFAULT_CONFIG} if it exists)")

    # The shared options at every level: `meshwg-signal --db X nodes list` as `meshwg-signal nodes list --db X`.
    p = argparse.ArgumentParser(prog="meshwg-signal", description="meshwg self-hosted signaling, STUN and relay server",
                                parents=[common])
    p.add_argument("--version", action=cli_config.LazyVersion,
                   text=lambda: f"meshwg-signal {cli_config.package_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def server_opts(sp, control: bool):
        if control:
            sp.add_argument("--init", action="store_true",
                            help="create the database and a new server identity if --db has none (first start); "
                                 "a database that has one is served as it is")
            sp.add_argument("--listen", action="append", metavar="HOST:PORT", help="control TCP (default 0.0.0.0:7300)")
            sp.add_argument("--advertise", help="host name/IP to put in invites and welcomes when listening on 0.0.0.0")
            sp.add_argument("--prefix4", help="IPv4 prefix for node addresses (default 100.64.0.0/10, kept once chosen)")
            sp.add_argument("--prefix6", help="IPv6 prefix (default: a random fd00::/48 ULA, kept once chosen)")
            sp.add_argument("--heartbeat", type=_positive_float, default=10.0, help="node heartbeat interval, seconds")
            sp.add_argument("--dns-domain", type=_dns_domain, default="mesh.internal", metavar="NAME",
                            help="nodes answer DNS for NODE.NAME on their mesh addresses and plain peers' configs get "
                                 "a DNS line (default mesh.internal; 'none': no names)")
            sp.add_argument("--sync", choices=["normal", "full"], default="normal",
                            help="SQLite durability: normal survives a killed server, full also a power loss")
            sp.add_argument("--policy", metavar="FILE",
                            help="access policy (TOML; `meshwg-signal policy check FILE` validates it): who may reach "
                                 "whom on which ports; reloaded when it changes or on SIGHUP (default: everything "
                                 "allowed)")
        if control:
            sp.add_argument("--relay", dest="relays", action="append", metavar="REGION=HOST:PORT[,HOST:PORT...]",
                            help="a relay in another region (`meshwg-signal relay --region REGION`): its UDP address, "
                                 "then its TCP ones; repeatable. Nodes use the nearest as their home relay")
            sp.add_argument("--region", default="main", metavar="NAME",
                            help="the region of this server's own relay, with --relay (default main)")
        else:
            sp.add_argument("--region", metavar="NAME",
                            help="run as the relay of this region with no database: nodes are admitted by the "
                                 "control plane's credentials (needs --secret-file)")
            sp.add_argument("--secret-file", metavar="FILE",
                            help="the region's relay secret (`meshwg-signal relay-secret REGION` on the control server)")
        sp.add_argument("--udp", action="append", metavar="HOST:PORT", help="STUN + UDP relay (default 0.0.0.0:3478; 'none')")
        sp.add_argument("--stun-alt-port", type=_alt_port, default="auto", metavar="N",
                        help="STUN-only alternate port on every --udp address, for NAT filtering tests "
                             "(RFC 5780 CHANGE-REQUEST; two --udp addresses make the full 2x2 layout). "
                             "Default: the --udp port + 1; 'none' disables")
        sp.add_argument("--relay-tcp", action="append", metavar="HOST:PORT", help="TCP relay fallback, repeatable: nodes try each in turn, e.g. "
                        "also 0.0.0.0:443 to pass firewalls that let only HTTPS out (default 0.0.0.0:7301; 'none')")
        sp.add_argument("--metrics", action="append", metavar="HOST:PORT", help="Prometheus /metrics listener (e.g. 127.0.0.1:9300)")
        sp.add_argument("--plain-udp", metavar="HOST:PORT",
                        help="UDP port for plain WireGuard peers (phones; `plain add`) (default 0.0.0.0:51820, "
                             "skipped with a warning if taken; 'none')")
        lim = sp.add_argument_group("limits against floods (per source: one IPv4 address or IPv6 /64)")
        if control:
            lim.add_argument("--max-unauthenticated", type=_positive_int, default=512, metavar="N",
                             help="control connections not yet registered, all sources together (default 512)")
            lim.add_argument("--max-unauthenticated-per-source", type=_positive_int, default=16, metavar="N",
                             help="...and from one source (default 16; a site behind one NAT shares it)")
        lim.add_argument("--accept-rate", type=_positive_float, default=10.0, metavar="PER_S",
                         help="new connections a second from one source, on each listener (default 10, burst 4x)")
        lim.add_argument("--relay-tcp-max", type=_positive_int, metavar="N",
                         help="relay TCP connections in all (default: a quarter of the descriptor limit)")
        lim.add_argument("--relay-tcp-max-per-source", type=_positive_int, metavar="N",
                         help="relay TCP connections from one source (default: an eighth of --relay-tcp-max)")
        rl = sp.add_argument_group("relay bandwidth (drops counted in `status` and /metrics)")
        rl.add_argument("--relay-node-rate", type=_positive_float, default=400.0, metavar="MBIT",
                        help="Mbit/s the relay carries for one node (default 400)")
        rl.add_argument("--relay-node-pps", type=_positive_float, metavar="N",
                        help="packets a second the relay carries for one node (default: 1 per 512 bytes of "
                             "--relay-node-rate)")
        rl.add_argument("--relay-total-rate", type=_non_negative_float, default=0.0, metavar="MBIT",
                        help="Mbit/s the relay carries in all (default 0: no limit but the CPU)")

    server_opts(sub.add_parser("serve", parents=[common], help="run the control server, STUN and relay"), True)
    server_opts(sub.add_parser("relay", parents=[common], help="run only STUN + relay (shares the server's DB file, or "
                                                              "with --region a relay of its own region, no database)"),
                False)
    rs = sub.add_parser("relay-secret", parents=[common],
                        help="print the secret a regional relay runs with (`relay --region REGION --secret-file`)")
    rs.add_argument("region", help="the relay's region name (a-z, 0-9, -)")

    inv = sub.add_parser("invite", parents=[common], help="create, list or revoke invites").add_subparsers(dest="action", required=True)
    c = inv.add_parser("create", parents=[common], help="print a new invite for `meshwg join`")
    c.add_argument("--reusable", action="store_true", help="any number of nodes may join with it (default: one)")
    c.add_argument("--expires", default="24h", help="lifetime, e.g. 30m, 24h, 7d, or 'never' (default 24h)")
    c.add_argument("--tag", default="", help="the joining node's tag(s) for the access policy (commas for more)")
    c.add_argument("--addr", action="append", metavar="HOST:PORT", help="control address(es) to embed (default: the server's)")
    c.add_argument("--auto-approve-routes", action="append", default=[], metavar="CIDR",
                   help="approve at once the routes inside CIDR that nodes joining with it advertise; 'exit' approves "
                        "them as exit nodes (repeatable)")
    inv.add_parser("list", parents=[common], help="every invite: kind, state, uses, expiry, tag")
    r = inv.add_parser("revoke", parents=[common], help="refuse an invite from now on (nodes that joined stay)")
    r.add_argument("invite_id", help="the ID column of `invite list`")

    nodes_json = argparse.ArgumentParser(add_help=False)
    nodes_json.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="a JSON list of objects (times in ISO 8601 UTC and seconds ago) instead of the table")
    nodes = sub.add_parser("nodes", parents=[common, nodes_json],
                           help="list (the default; ONLINE, last seen, tags, routes)/rename/expire/remove/tag nodes")
    na = nodes.add_subparsers(dest="action")
    na.add_parser("list", parents=[common, nodes_json], help="the nodes, in aligned columns or --json")
    rn = na.add_parser("rename", parents=[common], help="give a node a new name (peers see it at once)")
    rn.add_argument("node", help="id, name or public key")
    rn.add_argument("name", help="the new name")
    ex = na.add_parser("expire", parents=[common], help="cut a node off now or after a while (it needs a new invite)")
    ex.add_argument("node", help="id, name or public key")
    ex.add_argument("--in", dest="after", default="0s", help="expire after this duration (default: now)")
    rm = na.add_parser("remove", parents=[common], help="forget a node (its key needs a new invite to rejoin)")
    rm.add_argument("node", help="id, name or public key")
    for action, what in (("tag", "add tags to a node or plain peer"), ("untag", "remove tags from a node or plain peer")):
        tg = na.add_parser(action, parents=[common], help=what)
        tg.add_argument("node", help="id, name or public key")
        tg.add_argument("tags", nargs="+", metavar="TAG", help="tag name(s) used by the access policy")

    pol = sub.add_parser("policy", parents=[common], help="the access policy file").add_subparsers(dest="action", required=True)
    pck = pol.add_parser("check", parents=[common], help="validate a policy file against the database's nodes and "
                                                         "print who may reach whom (nothing is applied)")
    pck.add_argument("file", help="the policy file (TOML)")

    rt = sub.add_parser("routes", parents=[common], help="subnet routes and exit nodes the nodes advertise: list, approve, reject"
                        ).add_subparsers(dest="action", required=True)
    rt.add_parser("list", parents=[common], help="every node's advertised or decided routes and their state")
    for action, what in (("approve", "peers route it through the node while it advertises it"),
                         ("reject", "peers stop routing it through the node (until approved again)")):
        sp = rt.add_parser(action, parents=[common], help=what)
        sp.add_argument("node", help="id, name or public key")
        sp.add_argument("route", metavar="CIDR|exit", help="a subnet route, or 'exit' for an exit node")

    plain = sub.add_parser("plain", parents=[common], help="plain WireGuard peers: phones with a stock WireGuard app reaching nodes "
                                         "through the relay").add_subparsers(dest="action", required=True)
    pa = plain.add_parser("add", parents=[common], help="add one and print its wg-quick config")
    pa.add_argument("name", help="a name for the device (e.g. alice-phone)")
    pa.add_argument("--to", action="append", required=True, metavar="NODE", help="a node it may reach (repeatable)")
    pa.add_argument("--public-key", metavar="KEY", help="the device's own public key (its private key stays on it)")
    pa.add_argument("--exit-node", metavar="NODE", help="send all its internet traffic through this node")
    pa.add_argument("--tag", action="append", default=[], metavar="TAG", help="a tag for the access policy (repeatable)")
    plain.add_parser("list", parents=[common], help="every plain peer: addresses, key holder, exit node, reach, tags")
    pc = plain.add_parser("config", parents=[common], help="print its wg-quick config again")
    pc.add_argument("name", help="the plain peer's name")
    for sp in (pa, pc):
        sp.add_argument("--direct", action="store_true",
                        help="Endpoint = each node's own public endpoint (a port forward, or no NAT filtering, that "
                             "the node reports) instead of the server's plain WireGuard port")
        sp.add_argument("--qr", action="store_true", help="also print the config as a QR code")
        sp.add_argument("--qr-png", metavar="FILE", help="write the config's QR code as a PNG (mode 0600)")
        sp.add_argument("--endpoint", metavar="HOST:PORT", help="the server's plain WireGuard address "
                                                                 "(default: the one the server published)")
    pr = plain.add_parser("rotate", parents=[common], help="a new key (print the new config with `plain config`)")
    pr.add_argument("name", help="the plain peer's name")
    pr.add_argument("--public-key", metavar="KEY", help="the device's new public key (for one added with --public-key)")
    prm = plain.add_parser("remove", parents=[common], help="remove a plain peer (its config stops working)")
    prm.add_argument("name", help="the plain peer's name")

    sub.add_parser("status", parents=[common], help="connected nodes, relay throughput and errors")
    sub.add_parser("pubkey", parents=[common], help="print the server's public key")
    b = sub.add_parser("backup", parents=[common], help="copy the database (safe while the server runs) to a new file")
    b.add_argument("file", help="the new file to write (must not exist)")
    rs = sub.add_parser("restore", parents=[common],
                        help="restore a backup as the database --db (which must not exist; stop the server first)")
    rs.add_argument("file", help="a file written by `backup`")
    completion.add_command(sub, parents=[common])
    from meshwg.commands import service   # `service install|uninstall`: the systemd unit

    service.add_signal_command(sub, [common])
    return p


def _setup_logging(level: str, kind: str = "text") -> None:
    logfmt.setup(level, kind, stream=sys.stderr)


def _store(args):
    from signal_server.store_api import open_store

    return open_store(args.db)


def server_config(args, control: bool):
    """The ServerConfig that `serve` (control) or `relay` runs with these arguments."""
    from signal_server.server import ServerConfig

    cfg = ServerConfig(db=args.db, init=getattr(args, "init", False))
    cfg.control_enabled = control
    cfg.stop_on_sigterm = True
    if control:
        from signal_server.admin_socket import socket_path

    if control:
        cfg.control = _listen_list(args.listen, cfg.control)
        cfg.admin_socket = socket_path(args.db, getattr(args, "admin_socket", None), cfg.control[0][1])
        cfg.advertise = args.advertise
        cfg.prefix4, cfg.prefix6 = args.prefix4, args.prefix6
        cfg.heartbeat = args.heartbeat
        cfg.dns_domain = args.dns_domain
        cfg.synchronous = args.sync.upper()
        cfg.idle_timeout = max(3.5 * args.heartbeat, 5.0)
    cfg.udp = _listen_list(args.udp, cfg.udp)
    cfg.stun_alt_port = args.stun_alt_port
    cfg.relay_tcp = _listen_list(args.relay_tcp, cfg.relay_tcp)
    cfg.metrics = _listen_list(args.metrics, [])
    if args.plain_udp is not None:
        cfg.plain_udp = None if args.plain_udp == "none" else _listen_list([args.plain_udp], [])[0]
        cfg.plain_udp_strict = True
    if control:
        cfg.region = args.region
        cfg.relays = _relay_list(args.relays or [])
    if control:
        cfg.policy = args.policy
        cfg.max_unauthenticated = args.max_unauthenticated
        cfg.max_unauthenticated_per_source = args.max_unauthenticated_per_source
    cfg.accept_rate, cfg.accept_burst = args.accept_rate, 4 * args.accept_rate
    cfg.relay_tcp_max, cfg.relay_tcp_max_per_source = args.relay_tcp_max, args.relay_tcp_max_per_source
    cfg.relay_node_rate, cfg.relay_node_pps = args.relay_node_rate, args.relay_node_pps
    cfg.relay_total_rate = args.relay_total_rate
    return cfg


def _relay_list(specs) -> list:
    """`serve --relay` values -> [(region, [udp (host, port)], [tcp (host, port)...])]; ValueError (one line)."""
    from signal_server import relay_auth

    out, seen = [], set()
    for spec in specs:
        region, addrs = relay_auth.parse_relay_spec(spec)
        if region in seen:
            raise ValueError(f"--relay: region {region} given twice")
        seen.add(region)
        hostports = _listen_list(addrs, [])
        out.append((region, hostports[:1], hostports[1:]))
    return out


def regional_relay_config(args):
    """The RelayConfig of `relay --region NAME --secret-file FILE` (ValueError: one line)."""
    from signal_server import relay_auth
    from signal_server.relay_server import RelayConfig, load_secret

    if not relay_auth.valid_region(args.region):
        raise ValueError(f"--region {args.region!r}: a-z, 0-9 and -, at most 32")
    if not args.secret_file:
        raise ValueError(f"relay --region needs --secret-file (`meshwg-signal relay-secret {args.region}` on the "
                         "control server prints it)")
    sk, cred_pub = load_secret(args.secret_file, args.region)
    cfg = RelayConfig(args.region, sk, cred_pub, stop_on_sigterm=True)
    base = server_config(args, False)
    for name in ("udp", "stun_alt_port", "relay_tcp", "metrics", "accept_rate", "accept_burst", "relay_tcp_max",
                 "relay_tcp_max_per_source", "relay_node_rate", "relay_node_pps", "relay_total_rate"):
        setattr(cfg, name, getattr(base, name))
    return cfg


def cmd_relay_secret(args) -> int:
    from signal_server import relay_auth

    if not relay_auth.valid_region(args.region):
        raise ValueError(f"region {args.region!r}: a-z, 0-9 and -, at most 32")
    store = _store(args)
    try:
        sk = store.server_private_key()
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    print(relay_auth.secret_text(args.region, relay_auth.relay_private(sk, args.region),
                                 relay_auth.credential_public(sk)))
    return 0


def cmd_regional_relay(args) -> int:
    import trio

    from signal_server.relay_server import RegionalRelay

    relay = RegionalRelay(regional_relay_config(args))
    _raise_fd_limit()
    try:
        trio.run(relay.run)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_serve(args, control: bool) -> int:
    import trio

    from signal_server.server import SignalServer

    if not control and getattr(args, "region", None):
        return cmd_regional_relay(args)
    cfg = server_config(args, control)
    _raise_fd_limit()
    server = SignalServer(cfg)

    async def main():
        await server.run()

    from signal_server.admin_socket import AdminSocketError

    try:
        trio.run(main)
    except KeyboardInterrupt:
        logging.getLogger("signal").info("interrupted; state is on disk")
    except AdminSocketError as exc:
        print(f"meshwg-signal: {exc}", file=sys.stderr)
        return 1
    return 0


def _op(args, op: str, params: dict | None = None) -> dict:
    """`op` (admin_ops) carried out by the running server through its admin socket, or, with none running, on the
    database --db names (opened, never created). Sets args.via_server."""
    from signal_server import admin_ops, admin_socket

    path = admin_socket.socket_path(args.db, getattr(args, "admin_socket", None))
    args.via_server = False
    if path is not None:
        try:
            result = admin_socket.request(path, op, params or {})
            args.via_server = True
            return result
        except admin_socket.NoServer:
            pass
    return admin_ops.run(op, _store(args), None, params or {})


def cmd_invite(args) -> int:
    from signal_server.invites import parse_duration
    from signal_server.routes import parse_route

    if args.action == "create":
        expires = None if args.expires == "never" else time.time() + parse_duration(args.expires)
        auto = ",".join(dict.fromkeys(parse_route(r) for r in args.auto_approve_routes))  # ValueError first
        got = _op(args, "invite_create", {"reusable": args.reusable, "expires": expires, "tag": args.tag,
                                          "addr": args.addr, "auto_routes": args.auto_approve_routes})
        print(got["invite"])
        print(f"invite {got['invite_id']}: {'reusable' if args.reusable else 'one-time'}, expires {_fmt_time(expires)}"
              + (f", tag {args.tag}" if args.tag else "") + (f", auto-approves {auto}" if auto else ""),
              file=sys.stderr)
        return 0
    if args.action == "list":
        invites = _op(args, "invite_list")["invites"]
        wall = time.time()
        print(f"{'ID':10} {'KIND':9} {'STATE':8} {'USES':>4} {'EXPIRES':19} TAG")
        for i in invites:
            state = ("revoked" if i["revoked"] else "expired" if i["expires"] and i["expires"] <= wall
                     else "used" if not i["reusable"] and i["uses"] else "valid")
            auto = f" (auto-approves {','.join(i['auto_routes'])})" if i["auto_routes"] else ""
            print(f"{i['invite_id']:10} {'reusable' if i['reusable'] else 'one-time':9} {state:8} {i['uses']:>4} "
                  f"{_fmt_time(i['expires']):19} {i['tag']}{auto}")
        return 0
    if args.action == "revoke":
        _op(args, "invite_revoke", {"invite_id": args.invite_id})
        print(f"revoked {args.invite_id}")
        return 0
    return 2


def _nodes_list(args, as_json: bool) -> int:
    """`nodes [list] [--json]`: ONLINE from the running server's registry, or with none running from the presence
    record the last one left (admin.PRESENCE_META)."""
    from signal_server import admin

    got = _op(args, "nodes_list")
    if as_json:
        print(json.dumps(got["records"], indent=2))
        return 0
    sys.stdout.write(admin.nodes_table(got["records"], _fmt_time))
    if not got["fresh"]:
        print("meshwg-signal: no running server has published who is online"
              + (f" since {_fmt_time(got['at'])}" if got["at"] else "") + "; ONLINE shows when each was last seen",
              file=sys.stderr)
    return 0


def cmd_nodes(args) -> int:
    from signal_server.invites import parse_duration

    action = args.action or "list"
    if action == "list":
        return _nodes_list(args, getattr(args, "json", False))
    if action == "rename":
        got = _op(args, "node_rename", {"node": args.node, "name": args.name})
        print(f"node {got['node_id']} renamed to {got['name']}")
    elif action == "expire":
        when = time.time() + parse_duration(args.after)
        got = _op(args, "node_expire", {"node": args.node, "when": when})
        print(f"node {got['node_id']} ({got['name']}) expires {_fmt_time(when)}")
    elif action == "remove":
        got = _op(args, "node_remove", {"node": args.node})
        print(f"node {got['node_id']} ({got['name']}) removed; its key needs a new invite to rejoin")
    elif action in ("tag", "untag"):
        got = _op(args, "node_tags", {"node": args.node, "tags": args.tags, "add": action == "tag"})
        print(f"{got['name']}: tags {','.join(got['tags']) or '(none)'}")
    return 0


def _plain_params(args) -> dict:
    return {"name": args.name, "endpoint": getattr(args, "endpoint", None), "direct": getattr(args, "direct", False),
            "public_key": getattr(args, "public_key", None)}


def cmd_plain(args) -> int:
    if args.action == "list":
        peers = _op(args, "plain_list")["peers"]
        print(f"{'ID':>4} {'NAME':20} {'IPV4':15} {'IPV6':24} {'KEY':8} {'EXIT':10} {'REACHES':20} TAGS")
        for p in peers:
            print(f"{p['node_id']:>4} {p['name']:20} {p['ipv4']:15} {p['ipv6']:24} {p['holder']:8} {p['exit']:10} "
                  f"{','.join(p['reaches']):20} {','.join(p['tags']) or '-'}")
        return 0
    if args.action == "add":
        got = _op(args, "plain_add", {**_plain_params(args), "to": args.to, "exit_node": args.exit_node,
                                      "tags": args.tag})
        print(f"plain peer {got['name']} ({got['ipv4']}, {got['ipv6']}) added", file=sys.stderr)
        return _print_config(got["config"], args)
    if args.action == "config":
        return _print_config(_op(args, "plain_config", _plain_params(args))["config"], args)
    if args.action == "rotate":
        got = _op(args, "plain_rotate", _plain_params(args))
        print(f"plain peer {got['name']} has a new key; `meshwg-signal plain config {got['name']}` prints its config",
              file=sys.stderr)
        return 0
    if args.action == "remove":
        print(f"plain peer {_op(args, 'plain_remove', _plain_params(args))['name']} removed")
        return 0
    return 2


def cmd_routes(args) -> int:
    if args.action == "list":
        rows = _op(args, "routes_list")["routes"]
        print(f"{'NODE':20} {'ROUTE':43} STATE")
        for r in rows:
            print(f"{r['node']:20} {r['prefix']:43} {r['state']}" + (f"; refused: {r['refused']}" if r["refused"] else ""))
        return 0
    if args.action == "approve":
        got = _op(args, "route_approve", {"node": args.node, "route": args.route})
        print(f"approved {got['prefix']} for {got['name']}" + ("" if got["advertised"] else
              " (it does not advertise it now: peers get it when it does)"))
        return 0
    if args.action == "reject":
        got = _op(args, "route_reject", {"node": args.node, "route": args.route})
        print(f"rejected {got['prefix']} for {got['name']}")
        return 0
    return 2


def _print_config(text: str, args) -> int:
    from signal_server.plain_config import qr_terminal, write_qr_png

    sys.stdout.write(text)
    if args.qr:
        sys.stdout.write(qr_terminal(text))
    if args.qr_png:
        write_qr_png(text, args.qr_png)  # here, as the user running the CLI, not the server
        print(f"wrote the QR code to {args.qr_png}", file=sys.stderr)
    return 0


def cmd_policy(args) -> int:
    """`policy check FILE`: the file checked against the database's nodes, plain peers and invites, and who may
    reach whom; a bad file is one line on stderr and exit code 2 (main turns the PolicyError, a ValueError, into it)."""
    import base64

    from signal_server import policy

    try:
        with open(args.file, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise policy.PolicyError(f"{args.file}: cannot read: {exc.strerror or exc}") from None
    got = _op(args, "policy_check", {"file": args.file, "data": base64.b64encode(data).decode()})
    print(f"{args.file}: ok, {got['rules']} rules; {got['nodes']} nodes, {got['plain']} plain peers")
    print("who may reach whom (row: from, column: to; x: may, .: may not):")
    sys.stdout.write(got["matrix"])
    for line in got["warnings"]:
        print(line, file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    from signal_server.metrics import parse_text

    got = _op(args, "status")
    print(f"registered nodes: {got['registered']} ({got['expired']} expired), plain peers: {got['plain']}")
    if got["live"] is not None:  # the running server's own figures
        _print_metrics(got["live"])
        print(f"admin socket: {int(got['live'].get('meshwg_signal_admin_requests_total', 0))} requests served")
        return 0
    for a in got["metrics_addrs"]:
        try:
            with urllib.request.urlopen(f"http://{a}/metrics", timeout=2) as resp:
                m = parse_text(resp.read().decode())
        except OSError as exc:
            print(f"server metrics at {a}: unreachable ({exc})")
            continue
        _print_metrics(m)
        return 0
    if not got["metrics_addrs"]:
        print("server metrics: not published (start serve with --metrics HOST:PORT)")
    return 0


def _print_metrics(m: dict) -> None:
    g = lambda k: int(m.get("meshwg_signal_" + k, 0))  # noqa: E731
    print(f"server: up {m.get('meshwg_signal_uptime_seconds', 0):.0f} s, connected nodes {g('nodes_connected')}, "
          f"relay sessions {g('relay_sessions')}")
    print(f"relay: {g('forwarded_packets_total')} packets, {g('forwarded_bytes_total')} bytes forwarded; "
          f"{g('drop_rate_limited_total')} rate-limited (node limit {g('drop_relay_node_limit_total')}, total limit "
          f"{g('drop_relay_total_limit_total')}), {g('refused_unregistered_total')} refused unregistered")
    print(f"plain wireguard: {g('forwarded_from_plain_packets_total')} packets to nodes, "
          f"{g('forwarded_to_plain_packets_total')} to plain peers, {g('plain_sessions')} sessions, "
          f"{g('plain_targets')} nodes reachable")
    errors = {k[len('meshwg_signal_'):]: int(v) for k, v in m.items()
              if any(w in k for w in ("error", "refused", "drop", "closed", "bad", "timeout")) and v}
    print("errors: " + (", ".join(f"{k}={v}" for k, v in sorted(errors.items())) or "none"))


def cmd_backup(args) -> int:
    st = _store(args)
    try:
        st.backup_to(args.file)
    except FileExistsError:
        print(f"meshwg-signal: {args.file} exists; choose a new file name", file=sys.stderr)
        return 1
    finally:
        st.close()
    print(f"backed up {_db_name(args.db)} to {args.file}", file=sys.stderr)
    return 0


def cmd_restore(args) -> int:
    # Either kind of backup (a SQLite file, a PostgreSQL dump) into either kind of --db (store_dump).
    from signal_server.store_dump import restore

    restore(args.file, args.db)
    print(f"restored {args.file} as {_db_name(args.db)}", file=sys.stderr)
    return 0


def _db_name(db: str) -> str:
    from signal_server.store_api import db_label

    return db if not db.startswith(("postgresql://", "postgres://")) else db_label(db)


def _db_problem(args, exc) -> str:
    """One line for a database that cannot be used, with what to do about a missing identity."""
    from signal_server.store import NoIdentity

    if not isinstance(exc, NoIdentity):
        return f"meshwg-signal: {exc}"
    if args.cmd == "serve":
        return f"meshwg-signal: {exc}; pass --init to create a new server identity there (first start only)"
    return f"meshwg-signal: {exc}; is --db right? (`meshwg-signal serve --init` creates a server's database)"


def parse_args(argv=None, warn=None) -> argparse.Namespace:
    """The command line over the config file; cli_config.ConfigError for a bad file."""
    return cli_config.parse_args(build_parser(), argv, DEFAULT_CONFIG, warn or _warn)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except cli_config.ConfigError as exc:
        print(f"meshwg-signal: {exc}", file=sys.stderr)
        return 2
    args.db = getattr(args, "db", DEFAULT_DB)
    args.log_level = getattr(args, "log_level", "info")
    args.log_format = getattr(args, "log_format", "text")
    _setup_logging(args.log_level, args.log_format)
    from signal_server.admin_ops import OpError
    from signal_server.store import StoreError

    try:
        return _dispatch(args)
    except OpError as exc:
        print(f"meshwg-signal: {exc}", file=sys.stderr)
        return exc.code
    except StoreError as exc:
        print(_db_problem(args, exc), file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # e.g. corruption found past the header: one line, not a traceback
        print(f"meshwg-signal: {args.db}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"meshwg-signal: {exc}", file=sys.stderr)
        return 2


def _warn(line: str) -> None:
    print(f"meshwg-signal: {line}", file=sys.stderr)


def cmd_pubkey(args) -> int:
    print(_op(args, "pubkey")["key"])
    return 0


def _dispatch(args) -> int:
    if args.cmd in ("serve", "relay"):
        return cmd_serve(args, args.cmd == "serve")
    if args.cmd == "service":
        from meshwg.commands import service

        return service.run_signal(args)
    if args.cmd == "completion":
        print(completion.script(build_parser(), args.shell), end="")
        return 0
    commands = {"invite": cmd_invite, "nodes": cmd_nodes, "plain": cmd_plain, "routes": cmd_routes, "policy": cmd_policy,
                "status": cmd_status,
                "pubkey": cmd_pubkey, "backup": cmd_backup, "restore": cmd_restore, "relay-secret": cmd_relay_secret}
    return commands[args.cmd](args) if args.cmd in commands else 2
