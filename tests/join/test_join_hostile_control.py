"""Real `meshwg join` nodes keep their interface and tunnels whatever the control plane does (issue 10, 1).

In plain namespaces on one bridge: the server goes away and its port is taken first by a front that
closes every connection at once (a load balancer whose backend is down), then by a server started on
the wrong database (another identity). The old agent read the first as a wrong server key and quit,
removing its interface; now both nodes keep pinging each other, say why in `meshwg status`, and
reconnect when the right server is back. A node restarted with no invite (it was given one through
$MESHWG_INVITE, never on its command line) comes back from its state directory.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import require_real_components
from joinnet import ENV, PY, REPO, BridgeNet
from scenarios.netns import wait_for

pytestmark = pytest.mark.netns

CLOSER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7300)); s.listen(64)
while True:
    c, _ = s.accept(); c.close()
"""


def _start_env_invite(node, invite: str | None) -> None:
    """Like Node.start, the invite in the environment (or none at all), never in argv."""
    env = dict(ENV)
    env.pop("MESHWG_INVITE", None)
    if invite:
        env["MESHWG_INVITE"] = invite
    with open(node.log, "ab") as log:
        node.proc = node.ns.popen(PY, "-m", "meshwg", "join", "--name", node.name, "--state-dir", str(node.state),
                                  "--interface", node.iface, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _move_db(src: str, dst: str) -> None:
    """A stopped server's database with its WAL files, replacing what is at dst."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(dst + suffix):
            os.remove(dst + suffix)
        if os.path.exists(src + suffix):
            os.replace(src + suffix, dst + suffix)


def _alive(node) -> bool:
    return node.proc.poll() is None and bool(node.ns.run("ip", "link", "show", "dev", node.iface, check=False))


def test_nodes_keep_their_tunnels_through_a_dead_backend_and_a_wrong_server():
    require_real_components("ip", "ping", "ss")
    net = BridgeNet(78)
    a = b = closer = None
    try:
        invite = net.start_server()
        a, b = net.node("alpha"), net.node("beta")
        _start_env_invite(a, invite)
        _start_env_invite(b, invite)
        ip_a = wait_for(a.mesh_ip, timeout=15, what="alpha's mesh address")
        ip_b = wait_for(b.mesh_ip, timeout=15, what="beta's mesh address")
        wait_for(lambda: a.ping(ip_b) and b.ping(ip_a), timeout=15, what="alpha and beta ping over the mesh")
        assert invite not in open(f"/proc/{a.proc.pid}/cmdline", "rb").read().decode(errors="replace")
        wait_for(lambda: os.path.exists(a.state / "netmap.json"), timeout=10, what="alpha's netmap cache")

        # The backend dies; a front keeps accepting and closing at once.
        net.stop_server()
        ip1 = f"10.{net.n}.0.1"
        closer = net.srv.popen(PY, "-c", CLOSER, ip1)
        wait_for(lambda: ":7300" in net.srv.run("ss", "-tln"), timeout=10, what="the closing front listens")
        wait_for(lambda: (st := a.status()) and st["control"]["failures"] >= 2, timeout=20,
                 what="alpha retries against the closing front")
        st = a.status()
        # closed at once: an EOF, or a reset when our HELLO was still unread
        assert not st["control"]["connected"] and re.search("before answering|reset", st["control"]["last_error"])
        assert _alive(a) and _alive(b) and a.ping(ip_b, count=3) and b.ping(ip_a)
        net.srv.stop(closer)
        closer = None

        # A server on the wrong database: another identity at the same address.
        right_db = os.path.join(net.dir, "signal.db")
        _move_db(right_db, right_db + ".right")
        net.start_server()
        wait_for(lambda: (st := a.status()) and st["control"]["error_kind"] == "suspect", timeout=20,
                 what="alpha reports the wrong server")
        assert "wrong database" in a.status()["control"]["last_error"]
        assert _alive(a) and _alive(b) and a.ping(ip_b, count=3) and b.ping(ip_a)

        # The right server returns. Suspect-server retries are slow (60 s): restart beta to see it
        # rejoin at once, from its state directory with no invite at all.
        net.stop_server()
        _move_db(right_db + ".right", right_db)
        net.start_server()
        b.stop()
        _start_env_invite(b, None)
        wait_for(lambda: (st := b.status()) and st["control"]["connected"], timeout=20,
                 what="beta back from its state directory, no invite given")
        assert b.mesh_ip() == ip_b
        wait_for(lambda: b.ping(ip_a), timeout=15, what="beta reaches alpha again")
        assert _alive(a)
    except BaseException:
        net.print_logs()
        raise
    finally:
        if closer is not None:
            net.srv.stop(closer)
        net.close()
