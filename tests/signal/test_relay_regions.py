"""Relays in regions (issue 14.3), the relay's side: credentials signed by the control plane (relay_auth) checked
on explicit wall time, admission by them in RelayCore with no node list, PING/PONG, and a real
`meshwg-signal relay --region` process with no database file admitting a node whose credential a real control
server issued."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio
from nacl.signing import SigningKey
from relay_node import UdpRelayNode
from sig_helpers import new_key, start_server, wait_until  # noqa: F401

from meshwg.control import ControlConnection
from meshwg.signaling import relay_wire as W
from meshwg.wg.crypto import clamp, dh_pub
from signal_server import relay_auth as A
from signal_server.relay import RelayCore

SERVER_SK = bytes(range(32))
NODE_SK = os.urandom(32)
NODE = dh_pub(clamp(NODE_SK))
WALL = 1_800_000_000.0


def vk():
    return A.signing_key(SERVER_SK).verify_key


def test_a_credential_admits_its_key_until_it_expires_plus_60s_of_skew():
    cred = A.issue(A.signing_key(SERVER_SK), NODE, WALL, ttl=600)
    assert A.check_untrusted(vk(), NODE, cred, WALL) is None
    assert A.check_untrusted(vk(), NODE, cred, WALL + 600 + 60) is None
    assert A.check_untrusted(vk(), NODE, cred, WALL + 600 + 61) == "cred_expired"


def test_a_credential_names_one_key_and_one_signer():
    cred = A.issue(A.signing_key(SERVER_SK), NODE, WALL)
    assert A.check_untrusted(vk(), os.urandom(32), cred, WALL) == "cred_bad_signature"
    other = SigningKey(os.urandom(32))
    assert A.check_untrusted(other.verify_key, NODE, cred, WALL) == "cred_bad_signature"
    forged = A.issue(other, NODE, WALL)
    assert A.check_untrusted(vk(), NODE, forged, WALL) == "cred_bad_signature"


def test_a_moved_expiry_or_a_malformed_credential_is_refused():
    cred = A.issue(A.signing_key(SERVER_SK), NODE, WALL)
    later = (A.credential_expires(cred) + 3600).to_bytes(8, "big") + cred[8:]
    assert A.check_untrusted(vk(), NODE, later, WALL) == "cred_bad_signature"
    for junk in (b"", cred[:-1], cred + b"x", None, "text"):
        assert A.check_untrusted(vk(), NODE, junk, WALL) == "cred_malformed"


def test_relay_keys_and_the_credential_key_derive_from_the_server_key_one_per_region():
    assert A.relay_private(SERVER_SK, "eu") != A.relay_private(SERVER_SK, "us")
    assert A.relay_private(SERVER_SK, "eu") == A.relay_private(bytes(range(32)), "eu")
    assert A.relay_private(SERVER_SK, "eu") != SERVER_SK
    assert A.credential_public(SERVER_SK) != A.relay_public(SERVER_SK, "eu")


def test_a_relay_secret_round_trips_and_bad_ones_are_one_line_errors():
    text = A.secret_text("eu-west", b"k" * 32, b"v" * 32)
    assert "\n" not in text and A.parse_secret(text + "\n") == ("eu-west", b"k" * 32, b"v" * 32)
    for bad in ("", "mwrelay1:", "nonsense", text[:-4], "mwrelay1:!!!!"):
        with pytest.raises(A.RelaySecretError):
            A.parse_secret(bad)


def _core(now_wall):
    relay_sk = A.relay_private(SERVER_SK, "eu")
    v = vk()
    c = RelayCore(relay_sk, os.urandom, verifier=lambda k, cred, wall: A.check_untrusted(v, k, cred, wall))
    return c, dh_pub(relay_sk)


def _hello(relay_pk, cred, wall, sk=NODE_SK):
    hello = W.encode_hello(clamp(sk), relay_pk, wall, os.urandom(8), os.urandom(24))
    return W.encode_hello_cred(hello, cred) if cred is not None else hello


def _ok(out):
    return len(out) == 1 and W.frame_type_untrusted(out[0][0]) == W.T_HELLO_OK


def test_a_regional_relay_admits_by_credential_with_no_node_list():
    c, pk = _core(WALL)
    assert c.allowed == set()
    cred = A.issue(A.signing_key(SERVER_SK), NODE, WALL)
    assert _ok(c.handle_untrusted(_hello(pk, cred, WALL), ("s", 1), 0.0, WALL))
    assert NODE in c.by_key


def test_a_regional_relay_refuses_no_credential_an_expired_one_and_another_keys():
    c, pk = _core(WALL)
    sk = A.signing_key(SERVER_SK)
    cases = [(None, "refused_no_credential", WALL),
             (A.issue(sk, NODE, WALL - 3600, ttl=600), "refused_cred_expired", WALL),
             (A.issue(sk, os.urandom(32), WALL), "refused_cred_bad_signature", WALL),
             (A.issue(SigningKey(os.urandom(32)), NODE, WALL), "refused_cred_bad_signature", WALL)]
    for i, (cred, counter, wall) in enumerate(cases):
        before = c.counters[counter]
        out = c.handle_untrusted(_hello(pk, cred, wall), ("s", i), float(i), wall)
        assert c.counters[counter] == before + 1, counter
        assert [W.parse_notice_untrusted(f)[0] for f, _ in out] == [W.N_NOT_REGISTERED]
    assert c.by_key == {}


def test_a_stolen_credential_without_the_key_gets_no_session():
    c, pk = _core(WALL)
    cred = A.issue(A.signing_key(SERVER_SK), NODE, WALL)
    thief = _hello(pk, cred, WALL, sk=os.urandom(32))  # the box is the thief's: it does not open as NODE's
    forged = thief[:5] + NODE + thief[37:]
    assert c.handle_untrusted(forged, ("t", 1), 0.0, WALL) == []
    assert c.counters["drop_hello_auth"] == 1 and c.by_key == {}


def test_the_servers_own_relay_takes_a_credential_hello_by_its_node_list():
    c = RelayCore(SERVER_SK, os.urandom)
    pk = dh_pub(clamp(SERVER_SK))
    cred = A.issue(A.signing_key(SERVER_SK), NODE, WALL)
    assert not _ok(c.handle_untrusted(_hello(pk, cred, WALL), ("s", 1), 0.0, WALL))
    c.allowed.add(NODE)
    assert _ok(c.handle_untrusted(_hello(pk, cred, WALL), ("s", 1), 1.0, WALL))


def test_a_ping_gets_its_nonce_back_50_at_once_then_40_a_second_per_source_ip():
    c = RelayCore(SERVER_SK, os.urandom)
    ping = W.encode_ping(b"12345678")
    a = [(0, ("192.0.2.1", port)) for port in range(1, 61)]   # one IP's many ports (and sockets) share a budget
    pongs = [c.handle_untrusted(ping, src, 0.0, WALL) for src in a]
    assert pongs[0] == [(W.encode_ping(b"12345678", pong=True), a[0])]
    assert sum(1 for p in pongs if p) == 50
    assert not c.handle_untrusted(ping, (1, ("192.0.2.1", 9)), 0.0, WALL)
    assert c.handle_untrusted(ping, (0, ("192.0.2.2", 1)), 0.0, WALL)  # another IP has its own budget
    v6 = [c.handle_untrusted(ping, (0, (f"2001:db8:1:2::{i:x}", 1, 0, 0)), 0.0, WALL) for i in range(1, 61)]
    assert sum(1 for p in v6 if p) == 50   # an IPv6 /64 is one source
    assert c.handle_untrusted(ping, (0, ("2001:db8:1:3::1", 1, 0, 0)), 0.0, WALL)
    assert sum(1 for i in range(60) if c.handle_untrusted(ping, a[i], 1.0, WALL)) == 40
    assert c.handle_untrusted(ping + b"x", ("c", 1), 0.0, WALL) == [] and c.counters["drop_bad_ping"] == 1


def test_pongs_to_many_spoofed_ips_have_a_global_bound():
    c = RelayCore(SERVER_SK, os.urandom)
    ping = W.encode_ping(b"12345678")
    ips = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(30_000)]
    assert sum(1 for ip in ips if c.handle_untrusted(ping, (0, (ip, 1)), 0.0, WALL)) == 20_000
    assert c.counters["drop_ping_global"] == 10_000


# --- a real regional relay process, no database


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay_proc(tmp_path, secret: str, region: str = "eu"):
    secret_file = tmp_path / "relay.secret"
    secret_file.write_text(secret + "\n")
    os.chmod(secret_file, 0o600)
    log = open(tmp_path / "relay.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "signal_server", "relay", "--region", region, "--secret-file",
                             str(secret_file), "--udp", f"127.0.0.1:{_free_udp_port()}", "--relay-tcp", "none", "--stun-alt-port", "none",
                             "--db", str(tmp_path / "no-such-dir" / "none.db")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    return proc, log


async def _bound_udp(log, proc, timeout: float = 10.0):
    with trio.fail_after(timeout):
        while True:
            log.seek(0)
            text = log.read()
            if "udp (stun+relay) " in text:
                hostport = text.split("udp (stun+relay) ")[1].split(",")[0].split()[0]
                host, port = hostport.rsplit(":", 1)
                return host, int(port)
            assert proc.poll() is None, text
            await trio.sleep(0.05)


async def test_a_regional_relay_process_with_no_database_admits_a_node_by_its_welcome_credential(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, relays=[("eu", [("127.0.0.1", 9)], [])])
    sk = new_key()
    conn = await ControlConnection.open(h.invite(), sk)
    relays = conn.welcome.relays
    assert [r.region for r in relays] == ["main", "eu"] and conn.welcome.relay_cred
    secret = A.secret_text("eu", A.relay_private(h.server.server_sk, "eu"), A.credential_public(h.server.server_sk))
    proc, log = _relay_proc(tmp_path, secret)
    try:
        addr = await _bound_udp(log, proc)
        assert not (tmp_path / "no-such-dir").exists()  # no database file, nor its directory
        node = UdpRelayNode(sk, relays[1].key, addr)
        node.rs.cred = conn.welcome.relay_cred
        await node.bind()
        assert (await node.hello())[0] == "ready"
        stranger = UdpRelayNode(new_key(), relays[1].key, addr)
        await stranger.bind()
        ev = await stranger.hello()
        assert ev[0] == "notice" and ev[1] == W.N_NOT_REGISTERED
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_relay_region_without_a_secret_or_with_another_regions_is_a_one_line_error(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "signal_server", "relay", "--region", "eu", *args],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
        return r.returncode, r.stderr.strip()
    code, err = run()
    assert code == 2 and "needs --secret-file" in err and "\n" not in err
    (tmp_path / "us.secret").write_text(A.secret_text("us", b"k" * 32, b"v" * 32))
    code, err = run("--secret-file", str(tmp_path / "us.secret"))
    assert code == 2 and "region 'us'" in err and "\n" not in err


def test_a_credentials_session_ends_when_the_credential_does():
    """A removed node's last credential (10 min, 60 s of skew) bounds its relay session: a HELLO just before the
    expiry gets a session that ends with it, not 90 s after (12.5 min in all, where the README said 10)."""
    c, pk = _core(WALL)
    cred = A.issue(A.signing_key(SERVER_SK), NODE, WALL, ttl=600)
    hello_at = WALL + 630                       # 30 s before the credential's expiry plus skew
    assert _ok(c.handle_untrusted(_hello(pk, cred, hello_at), ("s", 1), 630.0, hello_at))
    assert c.by_key[NODE].expires == 630.0 + 30
    fresh = A.issue(A.signing_key(SERVER_SK), NODE, hello_at, ttl=600)
    assert _ok(c.handle_untrusted(_hello(pk, fresh, hello_at + 1), ("s", 1), 631.0, hello_at + 1))
    assert c.by_key[NODE].expires == 631.0 + 90   # a fresh credential: the usual session
