"""`meshwg status` (one line a peer; `-d` the detailed form), `meshwg ip`, `meshwg whois`, and finding the agent
without --interface (issue 15)."""

import json
import os
import socket
import threading

import pytest

from meshwg import cli
from meshwg.commands import status_view
from meshwg.commands.mesh import format_brief, format_status
from meshwg.errors import UserError
from meshwg.io.ipc import status_server


def _peer(name, ip, **kw):
    p = {"name": name, "addresses": [f"{ip}/32", f"fd00::{ip.rsplit('.', 1)[1]}/128"], "online": True,
         "path": "relay", "endpoint": None, "latency_ms": None, "relay_reason": None, "active": True,
         "last_direct": None, "last_handshake_ago": 12.3, "rx_bytes": 2048, "tx_bytes": 10, "plain": False}
    p.update(kw)
    return p


def _status(peers, **kw):
    st = {"interface": "mesh7", "name": "laptop", "addresses": ["100.64.0.1/32", "fd00::1/128"],
          "listen_port": 51820, "control": {"connected": True},
          "relay": {"mode": "udp", "udp": ["203.0.113.10:3478"], "tcp": ["203.0.113.10:7301"], "latency_ms": 12.5},
          "nat": {"mapping": "endpoint-independent", "reflexive": ["198.51.100.1:51820"]}, "peers": peers}
    st.update(kw)
    return st


DIRECT = _peer("box", "100.64.0.2", path="direct", endpoint="198.51.100.9:41641", latency_ms=2.5,
               last_direct="198.51.100.9:41641")
# Gone idle after a direct path: what the node reported on the idle laptop.
IDLE = _peer("desk", "100.64.0.3", active=False, last_direct="192.168.1.20:51820", relay_reason="idle (not probing)",
             last_handshake_ago=400)
PLAIN = _peer("phone", "100.64.0.50", plain=True, online=False, active=False, relay_reason="plain WireGuard peer",
              last_handshake_ago=None, rx_bytes=0, tx_bytes=0)
RELAYED = _peer("server", "100.64.0.4", relay_reason="symmetric NAT on both sides", rx_bytes=5 * 1024 * 1024,
                exit_node=True, routes=["192.168.7.0/24", "0.0.0.0/0"], routed=["192.168.7.0/24", "0.0.0.0/0"])


def test_status_is_one_aligned_line_a_peer():
    assert format_brief(_status([DIRECT, IDLE, PLAIN, RELAYED])).splitlines() == [
        "mesh7: laptop  100.64.0.1/32, fd00::1/128  port 51820",
        "  NAME    IPV4         PATH                                   LATENCY  HANDSHAKE  RX / TX",
        "  box     100.64.0.2   direct 198.51.100.9:41641              2.50 ms  12s ago    2.00 KiB / 10 B",
        "  desk    100.64.0.3   idle (last direct 192.168.1.20:51820)  -        6m40s ago  2.00 KiB / 10 B",
        "  phone   100.64.0.50  plain relay                            -        never      0 B / 0 B",
        "  server  100.64.0.4   relay 203.0.113.10/UDP                 -        12s ago    5.00 MiB / 10 B  exit node",
    ]


def test_status_one_line_forms_of_each_path():
    def line(p, **kw):
        return format_brief(_status([p], **kw)).splitlines()[2]

    assert line(_peer("a", "100.64.0.9", path="direct", endpoint="[2001:db8::5]:4000", latency_ms=None)) == \
        "  a     100.64.0.9  direct [2001:db8::5]:4000  -        12s ago    2.00 KiB / 10 B"
    # Idle and never direct: no address to show, still not "relay".
    assert line(_peer("a", "100.64.0.9", active=False, online=False,
                      relay_reason="no direct candidates known")) == \
        "  a     100.64.0.9  idle  -        12s ago    2.00 KiB / 10 B  offline"
    # Traffic that flows through the relay (active): the relay and its transport.
    assert line(_peer("a", "100.64.0.9", relay_reason="probes unanswered since 10:00:00"),
                relay={"mode": "tcp", "udp": ["203.0.113.10:3478"], "tcp": ["[2001:db8::1]:7301"]}) == \
        "  a     100.64.0.9  relay 2001:db8::1/TCP  -        12s ago    2.00 KiB / 10 B"
    assert line(_peer("a", "100.64.0.9"), relay={"mode": "none", "udp": [], "tcp": []}) == \
        "  a     100.64.0.9  relay down  -        12s ago    2.00 KiB / 10 B"
    assert line(dict(PLAIN, path="direct", endpoint="198.51.100.20:51820")) == \
        "  phone  100.64.0.50  plain direct 198.51.100.20:51820  -        never      0 B / 0 B"


def test_status_brief_says_when_the_control_channel_is_down_and_when_there_are_no_peers():
    text = format_brief(_status([], control={"connected": False, "retry_in": 4.0}))
    assert text.splitlines() == ["mesh7: laptop  100.64.0.1/32, fd00::1/128  port 51820",
                                 "  control: DISCONNECTED (tunnels keep running); retrying in 4 s",
                                 "  no peers"]


def test_status_detail_keeps_the_three_line_form_and_shows_idle_as_idle():
    assert format_status(_status([DIRECT, IDLE, PLAIN, RELAYED])).splitlines() == [
        "mesh7: laptop  100.64.0.1/32, fd00::1/128  port 51820",
        "  control: connected  relay: udp (12.5 ms)",
        "  NAT: endpoint-independent; reflexive 198.51.100.1:51820",
        "  peer box  100.64.0.2/32, fd00::2/128",
        "    path: direct 198.51.100.9:41641, 2.50 ms",
        "    handshake: 12s ago  transfer: 2.00 KiB received, 10 B sent",
        "  peer desk  100.64.0.3/32, fd00::3/128",
        "    path: idle (last direct 192.168.1.20:51820)",
        "    handshake: 6m40s ago  transfer: 2.00 KiB received, 10 B sent",
        "  peer phone  100.64.0.50/32, fd00::50/128",
        "    path: plain (relay)",
        "    handshake: never  transfer: 0 B received, 0 B sent",
        "  peer server  100.64.0.4/32, fd00::4/128  [exit node]",
        "    routes: 192.168.7.0/24, 0.0.0.0/0",
        "    path: relay (symmetric NAT on both sides)",
        "    handshake: 12s ago  transfer: 5.00 MiB received, 10 B sent",
    ]


def _run(argv, capsys):
    args = cli.build_parser().parse_args(argv)
    assert args.run(args) == 0
    return capsys.readouterr().out


def test_status_chooses_the_form_by_detail(monkeypatch, capsys):
    from meshwg.commands import mesh

    st = _status([DIRECT, IDLE])
    monkeypatch.setattr(mesh, "_query", lambda args, req: json.loads(json.dumps(st)))
    assert _run(["status"], capsys) == format_brief(st) + "\n"
    assert _run(["status", "-d"], capsys) == format_status(st) + "\n"


# ---- a fake agent on a status socket in a temporary run directory -------------------------------------------------


class FakeAgent:
    """Answers every status query on <run_dir>/<iface>.meshwg with `reply`, from a thread, until closed."""

    def __init__(self, run_dir, iface, reply):
        self.path = status_server.socket_path(iface, str(run_dir))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.sock.settimeout(10.0)   # the thread's deadline: no test waits longer
        self.reply = reply
        self.requests = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10.0)
                try:
                    line = conn.makefile("rb").readline()
                    if line:
                        self.requests.append(json.loads(line))
                        conn.sendall(json.dumps(self.reply).encode() + b"\n")
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the thread's accept (close alone does not)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10.0)
        os.unlink(self.path)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setattr(status_server, "RUN_DIR", str(d))
    return d


def test_status_finds_the_one_agent_on_a_non_default_interface(run_dir, capsys):
    agent = FakeAgent(run_dir, "mesh7", _status([DIRECT]))
    (run_dir / "wg0.sock").write_text("")         # a WireGuard device's UAPI socket next to it: not an agent
    try:
        out = _run(["status"], capsys)
    finally:
        agent.close()
    assert out.splitlines()[0] == "mesh7: laptop  100.64.0.1/32, fd00::1/128  port 51820"
    assert agent.requests == [{"op": "status"}]


def test_status_skips_a_stale_socket_and_names_several_running_agents(run_dir, capsys):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(status_server.socket_path("dead0", str(run_dir)))   # bound, never listening: a crashed agent
    stale.close()
    a = FakeAgent(run_dir, "mesh7", _status([DIRECT]))
    try:
        assert _run(["status"], capsys).startswith("mesh7: laptop")
        b = FakeAgent(run_dir, "work0", _status([], interface="work0"))
        try:
            with pytest.raises(UserError) as err:
                _run(["status"], capsys)
            assert str(err.value) == "several meshwg agents are running: mesh7, work0 (choose one with -i)"
            assert _run(["status", "-i", "work0"], capsys).startswith("work0: laptop")
        finally:
            b.close()
    finally:
        a.close()


def test_status_without_an_agent_says_so(run_dir, capsys):
    with pytest.raises(UserError) as err:
        _run(["status"], capsys)
    assert str(err.value) == "no meshwg agent is running (start one with `meshwg join`)"


# ---- `meshwg ip`, `meshwg whois` ------------------------------------------------------------------------------------


def test_ip_prints_this_node_or_a_peer(run_dir, capsys):
    agent = FakeAgent(run_dir, "mesh7", _status([DIRECT, PLAIN]))
    try:
        assert _run(["ip"], capsys) == "100.64.0.1\nfd00::1\n"
        assert _run(["ip", "-4"], capsys) == "100.64.0.1\n"
        assert _run(["ip", "-6", "box"], capsys) == "fd00::2\n"
        assert _run(["ip", "-4", "phone"], capsys) == "100.64.0.50\n"
        with pytest.raises(UserError) as err:
            _run(["ip", "nobody"], capsys)
        assert str(err.value) == "ip: no peer named 'nobody'"
    finally:
        agent.close()


def test_whois_names_the_holder_or_the_router(run_dir, capsys):
    agent = FakeAgent(run_dir, "mesh7", _status([DIRECT, PLAIN, RELAYED]))
    try:
        assert _run(["whois", "100.64.0.2"], capsys) == "box  peer  100.64.0.2\n"
        assert _run(["whois", "fd00::50"], capsys) == "phone  plain peer  fd00::50\n"
        assert _run(["whois", "100.64.0.1"], capsys) == "laptop  this node  100.64.0.1\n"
        assert _run(["whois", "192.168.7.33"], capsys) == "server  peer  routes 192.168.7.0/24\n"   # the longest
        assert _run(["whois", "9.9.9.9"], capsys) == "server  peer  exit node\n"
    finally:
        agent.close()
    agent = FakeAgent(run_dir, "mesh7", _status([DIRECT, dict(RELAYED, routes=["192.168.7.0/24"], routed=[])]))
    try:
        for bad, text in (("100.64.0.99", "whois: no peer holds or routes 100.64.0.99"),
                          ("fd01::1", "whois: no peer holds or routes fd01::1"),
                          ("nonsense", "whois: not an IP address: 'nonsense'")):
            with pytest.raises(UserError) as err:
                _run(["whois", bad], capsys)
            assert str(err.value) == text
    finally:
        agent.close()


def test_the_ipv4_column_is_the_peers_mesh_address_even_when_its_routes_come_first():
    # CI: an exit node in use listed 0.0.0.0/0 first and the column said 0.0.0.0
    exit_node = {"addresses": ["0.0.0.0/0", "192.168.7.0/24", "100.64.0.4/32", "::/0", "fd00::4/128"]}
    assert status_view._ipv4(exit_node) == "100.64.0.4"
    assert status_view._ipv4({"addresses": ["fd00::4/128"]}) == "-"


def test_ip_of_an_exit_node_or_router_prints_only_its_mesh_addresses(run_dir, capsys):
    # The agent's peer addresses are its AllowedIPs: routes (even first, as 64cc64e saw) are not the peer's.
    router = _peer("server", "100.64.0.4",
                   addresses=["0.0.0.0/0", "192.168.7.0/24", "100.64.0.4/32", "::/0", "fd00::4/128"])
    agent = FakeAgent(run_dir, "mesh7", _status([router]))
    try:
        assert _run(["ip", "server"], capsys) == "100.64.0.4\nfd00::4\n"
        assert _run(["ip", "-4", "server"], capsys) == "100.64.0.4\n"
        assert _run(["ip", "-6", "server"], capsys) == "fd00::4\n"
    finally:
        agent.close()
