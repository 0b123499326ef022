"""`meshwg ping` for real: three `meshwg join` agents and `meshwg-signal serve` in namespaces on one bridge.

alpha and beta reach each other directly; gamma drops every UDP datagram from alpha (nftables in its namespace),
so alpha and gamma talk only through the relay. The real CLI, run in alpha's namespace, must say "via <beta's
address>" for beta and "via relay" for gamma, and --until-direct must exit 0 for beta and 1 for gamma.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import require_real_components
from joinnet import BridgeNet
from scenarios.netns import wait_for

pytestmark = pytest.mark.netns


def _peers_known(node, *names) -> bool:
    st = node.status()
    return bool(st) and {p["name"] for p in st["peers"]} >= set(names)


def test_ping_names_the_direct_address_or_the_relay_and_until_direct_exit_codes():
    require_real_components("ip", "nft")
    net = BridgeNet(93)
    try:
        invite = net.start_server()
        a, b, c = net.node("alpha"), net.node("beta"), net.node("gamma")
        c.ns.run("nft", "-f", "-", input=(
            "add table inet pinglab\n"
            "add chain inet pinglab in { type filter hook input priority 0; }\n"
            f"add rule inet pinglab in ip saddr {a.ip} meta l4proto udp drop\n").encode())
        for n in (a, b, c):
            n.start(invite)
        ip_b = wait_for(b.mesh_ip, timeout=20, what="beta's mesh address")
        ip_c = wait_for(c.mesh_ip, timeout=20, what="gamma's mesh address")
        wait_for(lambda: _peers_known(a, "beta", "gamma"), timeout=20, what="alpha knows beta and gamma")
        port_b = b.status()["listen_port"]

        # Direct: by name, then by mesh IP; the first pong comes from beta's address.
        res = a.meshwg("ping", "-c", "2", "beta")
        assert res.returncode == 0, (res.stdout, res.stderr, net.print_logs())
        lines = res.stdout.splitlines()
        assert len(lines) == 2
        for ln in lines:
            assert re.fullmatch(rf"pong from beta \({re.escape(ip_b)}\) via {re.escape(b.ip)}:{port_b} in [0-9.]+ ms",
                                ln), ln
        res = a.meshwg("ping", "-c", "5", "--until-direct", ip_b)
        assert res.returncode == 0 and len(res.stdout.splitlines()) == 1, (res.stdout, res.stderr)
        assert f"via {b.ip}:{port_b}" in res.stdout

        # Relayed: gamma never hears alpha directly.
        res = a.meshwg("ping", "-c", "2", "gamma")
        assert res.returncode == 0, (res.stdout, res.stderr)
        lines = res.stdout.splitlines()
        assert len(lines) == 2 and all(re.fullmatch(rf"pong from gamma \({re.escape(ip_c)}\) via relay in [0-9.]+ ms",
                                                    ln) for ln in lines), lines
        res = a.meshwg("ping", "-c", "2", "--until-direct", "--json", "gamma")
        assert res.returncode == 1 and res.stderr.strip() == "direct connection not established", res.stderr
        reps = [json.loads(ln) for ln in res.stdout.splitlines()]
        assert len(reps) == 2 and all(r["path"] == "relay" and r["peer"] == "gamma" and r["rtt_ms"] > 0 for r in reps)
        assert not a.peer("gamma")["path"] == "direct"     # the relay's pongs moved no path

        # An unknown peer: one line, exit 1.
        res = a.meshwg("ping", "-c", "1", "nobody")
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.strip() == "meshwg: ping: no peer named or addressed 'nobody'", res.stderr
    except (AssertionError, subprocess.SubprocessError):
        net.print_logs()
        raise
    finally:
        net.close()
