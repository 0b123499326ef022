"""`meshwg-signal plain add/list/config/rotate/remove` against a running server (issue 12): the config it prints
is read back by the project's wg-quick parser with the right interface, peers, AllowedIPs and Endpoint (the
plain-WireGuard address the server published); changes reach the target nodes within 1 s; mistakes are one
line naming the value, exit code 2, and change nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import time

import pytest
import trio
from plain_helpers import recording_node
from sig_helpers import new_key, start_server, wait_until

from meshwg.config import keys, wgquick
from meshwg.wg.crypto import clamp, dh_pub
from signal_server import cli, store_api


async def run_cli(capsys, h, *argv) -> tuple[int, str, str]:
    """The CLI in a thread (it opens its own database connection, as from another process)."""
    capsys.readouterr()
    code = await trio.to_thread.run_sync(cli.main, [*argv, "--db", h.db])
    out, err = capsys.readouterr()
    return code, out, err


async def mesh(nursery, tmp_path, **kw):
    h = await start_server(nursery, tmp_path, plain_udp=("127.0.0.1", 0), **kw)
    inv = h.invite(reusable=True)
    nodes = {name: await recording_node(nursery, inv, name) for name in ("home", "office", "other")}
    rows = {r.name: r for r in h.admin.list_nodes()}
    return h, nodes, rows


def node_net(row) -> list:
    return [ipaddress.ip_network(f"{row.ipv4}/32"), ipaddress.ip_network(f"{row.ipv6}/128")]


async def test_add_config_rotate_remove_round_trip(nursery, tmp_path, capsys):
    h, nodes, rows = await mesh(nursery, tmp_path)
    t0 = time.monotonic()
    code, out, err = await run_cli(capsys, h, "plain", "add", "Phone", "--to", "home", "--to", "office")
    assert code == 0, err
    [phone] = h.admin.list_plain()
    cfg = wgquick.parse(out)
    assert cfg.interface.public_key == phone.key and cfg.interface.private_key == phone.private_key
    assert cfg.interface.addresses == [ipaddress.ip_interface(f"{phone.ipv4}/32"),
                                       ipaddress.ip_interface(f"{phone.ipv6}/128")]
    assert [p.public_key for p in cfg.peers] == [rows["home"].key, rows["office"].key]
    for p, name in zip(cfg.peers, ("home", "office")):
        assert p.allowed_ips == node_net(rows[name])
        assert p.endpoint == wgquick.Endpoint("127.0.0.1", h.plain[1]) and p.persistent_keepalive == 25
    assert phone.name in err and "Traceback" not in err
    # the target nodes have it within 1 s; the other node never hears of it
    await wait_until(lambda: phone.key in nodes["home"].entries and phone.key in nodes["office"].entries, timeout=1.0)
    assert time.monotonic() - t0 < 1.5  # the CLI's own start included
    code, again, _ = await run_cli(capsys, h, "plain", "config", "phone")
    assert code == 0 and again == out
    code, listing, _ = await run_cli(capsys, h, "plain", "list")
    assert code == 0 and "phone" in listing and phone.ipv4 in listing and "home,office" in listing

    code, _, err = await run_cli(capsys, h, "plain", "rotate", "phone")
    assert code == 0, err
    [rotated] = h.admin.list_plain()
    assert rotated.key != phone.key and rotated.private_key != phone.private_key
    assert (rotated.ipv4, rotated.ipv6) == (phone.ipv4, phone.ipv6)
    await wait_until(lambda: rotated.key in nodes["home"].entries and phone.key not in nodes["home"].entries,
                     timeout=1.0)
    code, out2, _ = await run_cli(capsys, h, "plain", "config", "phone")
    cfg2 = wgquick.parse(out2)
    assert cfg2.interface.private_key == rotated.private_key and cfg2.interface.public_key == rotated.key
    assert [p.public_key for p in cfg2.peers] == [p.public_key for p in cfg.peers]

    code, out, _ = await run_cli(capsys, h, "plain", "remove", "phone")
    assert code == 0 and "removed" in out and h.admin.list_plain() == []
    await wait_until(lambda: rotated.key not in nodes["home"].entries and rotated.key not in nodes["office"].entries,
                     timeout=1.0)
    assert not nodes["other"].ever_heard_of(phone.key) and not nodes["other"].ever_heard_of(rotated.key)
    # `nodes list` keeps to nodes; `status` counts plain peers apart
    code, out, _ = await run_cli(capsys, h, "nodes", "list")
    assert code == 0 and "phone" not in out


async def test_a_device_key_an_exit_node_and_qr_codes(nursery, tmp_path, capsys):
    h, nodes, rows = await mesh(nursery, tmp_path)
    # office offers itself as an exit node and is approved as one (`plain add --exit-node` needs that)
    await nodes["office"].conn.send({"type": "routes", "routes": [], "exit_node": True})
    assert (await run_cli(capsys, h, "routes", "approve", "office", "exit"))[0] == 0
    await wait_until(lambda: h.admin.get_node(rows["office"].key).is_exit)
    sk = clamp(new_key())
    pub = keys.key_to_base64(dh_pub(sk))
    png = str(tmp_path / "phone.png")
    code, out, err = await run_cli(capsys, h, "plain", "add", "tablet", "--to", "home", "--exit-node", "office",
                                   "--public-key", pub, "--qr", "--qr-png", png)
    assert code == 0, err
    text, _, qr = out.partition("\x1b")  # the config, then the QR code (ANSI colours)
    assert qr and keys.key_to_base64(sk) not in out
    cfg = wgquick.parse(text, require_private_key=False)
    assert cfg.interface.private_key is None and pub in text
    assert [p.public_key for p in cfg.peers] == [rows["home"].key, rows["office"].key]  # the exit node joins
    assert cfg.peers[0].allowed_ips == node_net(rows["home"])
    assert cfg.peers[1].allowed_ips == [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(os.stat(png).st_mode) == 0o600
    # the device holds its key: a rotation needs its new public key
    code, _, err = await run_cli(capsys, h, "plain", "rotate", "tablet")
    assert code == 2 and "--public-key" in err and len(err.strip().splitlines()) == 1
    new_pub = keys.key_to_base64(dh_pub(clamp(new_key())))
    code, _, err = await run_cli(capsys, h, "plain", "rotate", "tablet", "--public-key", new_pub)
    assert code == 0 and keys.key_to_base64(h.admin.list_plain()[0].key) == new_pub
    await wait_until(lambda: h.admin.list_plain()[0].key in nodes["office"].entries, timeout=1.0)


@pytest.mark.parametrize("case", ["unknown_node", "unknown_exit", "bad_key", "duplicate", "direct", "bad_endpoint",
                                  "unknown_plain"])
async def test_mistakes_are_one_line_naming_the_value_exit_2(nursery, tmp_path, capsys, case):
    h, nodes, rows = await mesh(nursery, tmp_path)
    assert (await run_cli(capsys, h, "plain", "add", "phone", "--to", "home"))[0] == 0
    head = h.admin.change_head()
    argv, named = {
        "unknown_node": (["add", "tablet", "--to", "home", "--to", "garage"], "'garage'"),
        "unknown_exit": (["add", "tablet", "--to", "home", "--exit-node", "attic"], "'attic'"),
        "bad_key": (["add", "tablet", "--to", "home", "--public-key", "not-a-key"], "'not-a-key'"),
        "duplicate": (["add", "Phone", "--to", "home"], "'phone'"),
        "direct": (["add", "tablet", "--to", "home", "--direct"], "--direct"),
        "bad_endpoint": (["add", "tablet", "--to", "home", "--endpoint", "nowhere"], "'nowhere'"),
        "unknown_plain": (["config", "tablet"], "'tablet'"),
    }[case]
    code, out, err = await run_cli(capsys, h, "plain", *argv)
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("meshwg-signal: ") and named in line and "Traceback" not in err
    # nothing written: the nodes' own background writes (touches, candidates) may land meanwhile, so only
    # changes naming something other than the three nodes count
    node_keys = {r.key for r in rows.values()}
    assert [c for c in h.admin.changes_since(head)[0] if c.kind in store_api.NODE_KINDS
            and c.pubkey not in node_keys] == []
    assert len(h.admin.list_plain()) == 1


async def test_the_endpoint_is_the_published_plain_address_or_endpoint(nursery, tmp_path, capsys):
    h = await start_server(nursery, tmp_path)  # no plain port: nothing published
    inv = h.invite(reusable=True)
    await recording_node(nursery, inv, "home")
    code, _, err = await run_cli(capsys, h, "plain", "add", "phone", "--to", "home")
    assert code == 2 and "--endpoint" in err and h.admin.list_plain() == []
    code, out, _ = await run_cli(capsys, h, "plain", "add", "phone", "--to", "home", "--endpoint", "vpn.example.org:51820")
    assert code == 0 and wgquick.parse(out).peers[0].endpoint == wgquick.Endpoint("vpn.example.org", 51820)
    h.admin.meta_set("plain_addrs", json.dumps(["0.0.0.0:51820"]))  # a wildcard bind without --advertise
    code, _, err = await run_cli(capsys, h, "plain", "config", "phone")
    assert code == 2 and "--advertise" in err and "0.0.0.0:51820" in err


async def test_status_shows_plain_peers_and_the_ingress(nursery, tmp_path, capsys):
    h, nodes, rows = await mesh(nursery, tmp_path)
    await run_cli(capsys, h, "plain", "add", "phone", "--to", "home")
    await wait_until(lambda: h.server.plain.targets == {rows["home"].key}, timeout=1.0)
    code, out, _ = await run_cli(capsys, h, "status")
    assert code == 0
    assert "registered nodes: 3 (0 expired), plain peers: 1" in out
    assert "plain wireguard: 0 packets to nodes, 0 to plain peers, 0 sessions, 1 nodes reachable" in out


def test_plain_udp_option():
    def cfg(*argv):
        return cli.server_config(cli.build_parser().parse_args(["serve", "--db", "/nonexistent/x.db", *argv]), True)

    default = cfg()
    assert default.plain_udp == ("0.0.0.0", 51820) and not default.plain_udp_strict
    assert cfg("--plain-udp", "none").plain_udp is None
    asked = cfg("--plain-udp", "[::1]:5000")
    assert asked.plain_udp == ("::1", 5000) and asked.plain_udp_strict
    relay = cli.server_config(cli.build_parser().parse_args(["relay", "--db", "x", "--plain-udp", "127.0.0.1:1"]), False)
    assert relay.plain_udp == ("127.0.0.1", 1)
