"""UAPI codec: set parsing (wg-go semantics and errnos), get formatting, framing, and the real `wg` as client."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config_strategies import configs  # tests/config/config_strategies.py
from conftest import require_real_components  # tests/conftest.py (a site-packages "tests" package shadows tests.conftest)
from meshwg.config import keys, uapi, wgquick
from meshwg.errors import ConfigError
from test_wgquick import _structured as structured_config_text  # tests/config/test_wgquick.py
from meshwg.config.uapi import (
    EINVAL,
    EPROTO,
    AllowedIPChange,
    DeviceSnapshot,
    PeerSnapshot,
    PeerUpdate,
    SetRequest,
    UapiError,
)

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
K3 = b"\xee" * 32
net = ipaddress.ip_network


def parse(text: str, **kw) -> SetRequest:
    return uapi.parse_set_request_untrusted(text.strip("\n").split("\n") if text.strip("\n") else [], **kw)


def test_parse_full_set_request():
    request = parse(
        f"""
private_key={K1.hex()}
listen_port=12912
fwmark=0
replace_peers=true
public_key={K2.hex()}
preshared_key={K3.hex()}
endpoint=[abcd:23::33%2]:51820
replace_allowed_ips=true
allowed_ip=192.168.4.4/32
public_key={K3.hex()}
endpoint=182.122.22.19:3233
persistent_keepalive_interval=111
replace_allowed_ips=true
allowed_ip=192.168.4.6/32
allowed_ip=-10.0.0.0/8
allowed_ip=fd00::1/64
protocol_version=1
public_key={K1.hex().upper()}
update_only=true
public_key={K2.hex()}
remove=true
""".replace("%2", "")
    )
    assert (request.private_key, request.listen_port, request.fwmark, request.replace_peers) == (K1, 12912, 0, True)
    p1, p2, p3, p4 = request.peers
    assert p1 == PeerUpdate(
        public_key=K2, preshared_key=K3, endpoint=("abcd:23::33", 51820), replace_allowed_ips=True,
        allowed_ips=[AllowedIPChange(net("192.168.4.4/32"))],
    )
    assert p2.endpoint == ("182.122.22.19", 3233) and p2.persistent_keepalive_interval == 111
    assert p2.allowed_ips == [
        AllowedIPChange(net("192.168.4.6/32")), AllowedIPChange(net("10.0.0.0/8"), remove=True), AllowedIPChange(net("fd00::/64")),
    ]
    assert p2.protocol_version == 1
    assert p3.public_key == K1 and p3.update_only and not p3.remove
    assert p4.public_key == K2 and p4.remove


def test_zero_private_key_means_remove_and_own_key_is_dropped():
    request = parse(f"public_key={K1.hex()}\nallowed_ip=10.0.0.1/32\npublic_key={K2.hex()}\n", own_public_key=K1)
    assert [p.public_key for p in request.peers] == [K2]
    # the request's own private_key line changes who "we" are, as in wg-go
    request = parse(f"private_key={'00' * 32}\npublic_key={K1.hex()}\n", own_public_key=K1)
    assert request.private_key == keys.ZERO_KEY and keys.nonzero(request.private_key) is None
    assert [p.public_key for p in request.peers] == [K1]
    sk = keys.clamp(K3)
    request = parse(f"private_key={sk.hex()}\npublic_key={keys.public_key(sk).hex()}\npublic_key={K1.hex()}\n", own_public_key=K1)
    assert [p.public_key for p in request.peers] == [K1]


def test_replace_allowed_ips_drops_earlier_lines_like_wg_go():
    request = parse(f"public_key={K1.hex()}\nallowed_ip=10.0.0.0/8\nreplace_allowed_ips=true\nallowed_ip=10.1.0.0/16\n")
    assert request.peers[0].replace_allowed_ips
    assert request.peers[0].allowed_ips == [AllowedIPChange(net("10.1.0.0/16"))]


@pytest.mark.parametrize(
    "text, errno",
    [
        ("garbage", EPROTO),
        (f"public_key={K1.hex()}\nnoequals", EPROTO),
        ("private_key=1234", EINVAL),
        (f"private_key={'g' * 64}", EINVAL),
        ("listen_port=65536", EINVAL),
        ("listen_port=-1", EINVAL),
        ("listen_port=+1", EINVAL),
        ("listen_port= 1", EINVAL),
        ("listen_port=" + "9" * 5000, EINVAL),
        ("fwmark=4294967296", EINVAL),
        ("replace_peers=false", EINVAL),
        ("colour=blue", EINVAL),
        ("preshared_key=00", EINVAL),  # a peer key before any public_key is a device key: unknown
        ("public_key=abc", EINVAL),
        (f"public_key={K1.hex()}\nremove=yes", EINVAL),
        (f"public_key={K1.hex()}\nupdate_only=1", EINVAL),
        (f"public_key={K1.hex()}\npreshared_key=zz", EINVAL),
        (f"public_key={K1.hex()}\nendpoint=1.2.3.4", EINVAL),
        (f"public_key={K1.hex()}\nendpoint=::1:5", EINVAL),
        (f"public_key={K1.hex()}\nendpoint=[1.2.3.4]:5", EINVAL),
        (f"public_key={K1.hex()}\nendpoint=example.com:5", EINVAL),
        (f"public_key={K1.hex()}\nendpoint=1.2.3.4:65536", EINVAL),
        (f"public_key={K1.hex()}\npersistent_keepalive_interval=65536", EINVAL),
        (f"public_key={K1.hex()}\nreplace_allowed_ips=no", EINVAL),
        (f"public_key={K1.hex()}\nallowed_ip=10.0.0.1", EINVAL),
        (f"public_key={K1.hex()}\nallowed_ip=10.0.0.0/33", EINVAL),
        (f"public_key={K1.hex()}\nallowed_ip=10.0.0.0/08", EINVAL),
        (f"public_key={K1.hex()}\nallowed_ip=10.0.0.0/255.0.0.0", EINVAL),
        (f"public_key={K1.hex()}\nallowed_ip=--10.0.0.0/8", EINVAL),
        (f"public_key={K1.hex()}\nprotocol_version=2", EINVAL),  # wg-go answers EINVAL here
        (f"public_key={K1.hex()}\nlisten_port=1", EINVAL),  # device key after a peer
    ],
)
def test_errors_carry_wg_go_errno(text, errno):
    with pytest.raises(UapiError) as info:
        parse(text)
    assert info.value.errno == errno and not info.value.fatal


@settings(max_examples=250, deadline=None)
@given(st.lists(st.one_of(
    st.text(max_size=40),
    st.sampled_from(["public_key=" + K1.hex(), "allowed_ip=", "endpoint=[", "remove=true", "allowed_ip=-", "=", ""]),
    st.tuples(st.sampled_from(["private_key", "listen_port", "fwmark", "public_key", "endpoint", "allowed_ip",
                               "preshared_key", "persistent_keepalive_interval", "protocol_version", "update_only"]),
              st.text(alphabet="0123456789abcdef.:/[]-%", max_size=70)).map("=".join),
), max_size=10))
def test_random_lines_raise_only_uapi_error(lines):
    try:
        request = uapi.parse_set_request_untrusted(lines)
    except UapiError as err:
        assert err.errno in (EINVAL, EPROTO)
        return
    assert uapi.parse_set_request_untrusted(uapi.format_set_request(request).split("\n")[1:-2]) == request


_key = st.binary(min_size=32, max_size=32)
_ip = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))
_net = _ip.flatmap(lambda ip: st.integers(0, ip.max_prefixlen).map(lambda n: ipaddress.ip_network(f"{ip}/{n}", strict=False)))
_peer_update = st.builds(
    PeerUpdate, public_key=_key, remove=st.booleans(), update_only=st.booleans(), preshared_key=st.none() | _key,
    endpoint=st.none() | st.tuples(_ip.map(str), st.integers(0, 65535)),
    persistent_keepalive_interval=st.none() | st.integers(0, 65535), replace_allowed_ips=st.booleans(),
    allowed_ips=st.lists(st.builds(AllowedIPChange, _net, st.booleans()), max_size=4),
    protocol_version=st.none() | st.just(1),
)
_set_request = st.builds(
    SetRequest, private_key=st.none() | _key, listen_port=st.none() | st.integers(0, 65535),
    fwmark=st.none() | st.integers(0, 2**32 - 1), replace_peers=st.booleans(), peers=st.lists(_peer_update, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(_set_request)
def test_format_set_request_round_trips(request):
    text = uapi.format_set_request(request)
    assert text.startswith("set=1\n") and text.endswith("\n\n")
    assert uapi.parse_set_request_untrusted(text.split("\n")[1:-2]) == request


def test_format_get_response_in_wg_go_order():
    snapshot = DeviceSnapshot(
        private_key=K1, listen_port=51820, fwmark=0,
        peers=[
            PeerSnapshot(
                public_key=K2, preshared_key=None, endpoint=("::ffff:192.0.2.1", 5),
                last_handshake_time_sec=1700000000, last_handshake_time_nsec=5, tx_bytes=10, rx_bytes=20,
                persistent_keepalive_interval=25, allowed_ips=[net("10.0.0.0/24"), net("fd00::/64")],
            ),
            PeerSnapshot(public_key=K3, preshared_key=K1, endpoint=("192.0.2.9", 1)),
        ],
    )
    assert uapi.format_get_response(snapshot) == (
        f"private_key={K1.hex()}\nlisten_port=51820\n"
        f"public_key={K2.hex()}\npreshared_key={'00' * 32}\nprotocol_version=1\nendpoint=[::ffff:192.0.2.1]:5\n"
        "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n"
        "persistent_keepalive_interval=25\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\n"
        f"public_key={K3.hex()}\npreshared_key={K1.hex()}\nprotocol_version=1\nendpoint=192.0.2.9:1\n"
        "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "errno=0\n\n"
    )
    assert uapi.format_get_response(DeviceSnapshot()) == "errno=0\n\n"
    assert uapi.handshake_time(None) == (0, 0)
    assert uapi.handshake_time(1700000000.25) == (1700000000, 250000000)


def test_framer_splits_any_chunking():
    stream = f"get=1\n\nset=1\npublic_key={K1.hex()}\nremove=true\n\nget=1\n\n".encode()
    for chunk in (1, 3, 7, len(stream)):
        framer = uapi.RequestFramer()
        got = []
        for i in range(0, len(stream), chunk):
            framer.feed(stream[i:i + chunk])
            while (req := framer.next_request()) is not None:
                got.append(req)
        assert got == [
            uapi.Request("get"), uapi.Request("set", (f"public_key={K1.hex()}", "remove=true")), uapi.Request("get"),
        ]


@pytest.mark.parametrize("data", [b"bogus=1\n", b"get=1\nx\n", b"set=1\n\xff\n", b"set=1\n" + b"a" * 70000])
def test_framer_fatal_errors(data):
    framer = uapi.RequestFramer()
    framer.feed(data)
    with pytest.raises(UapiError) as info:
        framer.next_request()
    assert info.value.fatal


# ---------------------------------------------------------------- the real `wg` talks to our codec


class FakeDevice:
    """A UAPI server made of our codec and a dict: enough device for `wg` to drive."""

    def __init__(self, name: str):
        self.private_key: bytes | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.peers: dict[bytes, PeerSnapshot] = {}
        self.requests: list[SetRequest] = []
        self.fail_next = 0
        self.path = f"/var/run/wireguard/{name}.sock"
        os.makedirs("/var/run/wireguard", mode=0o755, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def snapshot_text(self) -> str:
        return uapi.format_get_response(DeviceSnapshot(self.private_key, self.listen_port, self.fwmark, list(self.peers.values())))

    def reset(self):
        self.private_key, self.listen_port, self.fwmark, self.peers = None, 0, 0, {}

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.thread.join(timeout=5)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                framer = uapi.RequestFramer()
                while data := conn.recv(65536):
                    framer.feed(data)
                    try:
                        while (req := framer.next_request()) is not None:
                            conn.sendall(self._handle(req).encode())
                    except UapiError:
                        break

    def _handle(self, req: uapi.Request) -> str:
        if req.op == "get":
            return uapi.format_get_response(
                DeviceSnapshot(self.private_key, self.listen_port, self.fwmark, list(self.peers.values()))
            )
        own = keys.public_key(self.private_key) if self.private_key else None
        try:
            request = uapi.parse_set_request_untrusted(req.lines, own_public_key=own)
        except UapiError as err:
            return uapi.format_errno(err.errno)
        self.requests.append(request)
        if self.fail_next:  # lets a test see wg report the errno we send
            errno, self.fail_next = self.fail_next, 0
            return uapi.format_errno(errno)
        if request.private_key is not None:
            self.private_key = keys.nonzero(keys.clamp(request.private_key) if any(request.private_key) else None)
        if request.listen_port is not None:
            self.listen_port = request.listen_port
        if request.fwmark is not None:
            self.fwmark = request.fwmark
        if request.replace_peers:
            self.peers.clear()
        for update in request.peers:
            if update.remove:
                self.peers.pop(update.public_key, None)
                continue
            if update.update_only and update.public_key not in self.peers:
                continue
            peer = self.peers.setdefault(update.public_key, PeerSnapshot(update.public_key))
            if update.preshared_key is not None:
                peer.preshared_key = keys.nonzero(update.preshared_key)
            if update.endpoint is not None:
                peer.endpoint = update.endpoint
            if update.persistent_keepalive_interval is not None:
                peer.persistent_keepalive_interval = update.persistent_keepalive_interval
            if update.replace_allowed_ips:
                peer.allowed_ips = []
            for change in update.allowed_ips:
                if change.remove:
                    peer.allowed_ips = [n for n in peer.allowed_ips if n != change.network]
                elif change.network not in peer.allowed_ips:
                    peer.allowed_ips.append(change.network)
        return uapi.format_errno(0)


@pytest.fixture
def fake_device():
    require_real_components("wg")
    name = "mwgt" + secrets.token_hex(4)  # unique: /var/run/wireguard is shared by every namespace
    device = FakeDevice(name)
    try:
        yield name, device
    finally:
        device.close()


def wg(*args, input=None, check=True):
    return subprocess.run(["wg", *args], input=input, capture_output=True, text=True, check=check, timeout=10)


def test_real_wg_set_show_and_syncconf_through_our_codec(fake_device, tmp_path):
    name, device = fake_device
    sk, psk = os.urandom(32), os.urandom(32)
    pk1, pk2 = keys.public_key(os.urandom(32)), keys.public_key(os.urandom(32))
    (tmp_path / "sk").write_text(keys.key_to_base64(sk) + "\n")
    (tmp_path / "psk").write_text(keys.key_to_base64(psk) + "\n")
    b64 = keys.key_to_base64
    wg("set", name, "listen-port", "51999", "fwmark", "0x20", "private-key", str(tmp_path / "sk"),
       "peer", b64(pk1), "preshared-key", str(tmp_path / "psk"), "endpoint", "[fd00::1]:5",
       "persistent-keepalive", "25", "allowed-ips", "10.9.0.0/24,fd00:9::/64",
       "peer", b64(pk2), "endpoint", "192.0.2.7:51820", "allowed-ips", "10.9.1.1/32")
    assert device.requests[-1].peers[0].replace_allowed_ips  # `allowed-ips A,B` replaces
    dump = wg("show", name, "dump").stdout.splitlines()
    assert dump[0].split("\t") == [b64(keys.clamp(sk)), b64(keys.public_key(sk)), "51999", "0x20"]
    peer1 = dump[1].split("\t")
    assert peer1[:4] == [b64(pk1), b64(psk), "[fd00::1]:5", "10.9.0.0/24,fd00:9::/64"]
    assert peer1[4:] == ["0", "0", "0", "25"]
    assert dump[2].split("\t")[:4] == [b64(pk2), "(none)", "192.0.2.7:51820", "10.9.1.1/32"]
    showconf = wg("showconf", name).stdout
    assert f"PublicKey = {b64(pk2)}" in showconf and "ListenPort = 51999" in showconf

    # syncconf: wg reads our get reply, diffs, and sends the minimal set
    conf = tmp_path / "new.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {b64(sk)}\nListenPort = 51999\n[Peer]\nPublicKey = {b64(pk2)}\nAllowedIPs = 10.9.2.0/24\n")
    wg("syncconf", name, str(conf))
    dump = wg("show", name, "dump").stdout.splitlines()
    assert len(dump) == 2 and dump[1].split("\t")[:4] == [b64(pk2), "(none)", "192.0.2.7:51820", "10.9.2.0/24"]

    wg("set", name, "peer", b64(pk2), "remove")
    assert wg("show", name, "peers").stdout.strip() == ""

    # our negative errno reaches the user through wg
    device.fail_next = uapi.EADDRINUSE
    failed = wg("set", name, "listen-port", "1", check=False)
    assert failed.returncode != 0 and "Address already in use" in failed.stderr


def test_real_wg_setconf_with_a_parsed_wg_quick_config(fake_device, tmp_path):
    name, device = fake_device
    sk = keys.generate_private_key(os.urandom)
    pk = keys.public_key(os.urandom(32))
    text = (f"[Interface]\nPrivateKey = {keys.key_to_base64(sk)}\nAddress = 10.3.0.1/24\nListenPort = 4242\n"
            f"[Peer]\nPublicKey = {keys.key_to_base64(keys.public_key(sk))}\n"  # ourselves: ignored by both
            f"[Peer]\nPublicKey = {keys.key_to_base64(pk)}\nAllowedIPs = 10.3.0.2/32\nEndpoint = 127.0.0.1:4243\n")
    assert _wg_setconf_state(name, device, tmp_path, text) == _our_state(device, text)
    assert len(device.peers) == 1


def _wg_setconf_state(name, device, tmp_path, text) -> str:
    """Device state after the real `wg setconf` of strip(text): wg's own config parser at work."""
    device.reset()
    conf = tmp_path / "wgx.conf"
    conf.write_text(wgquick.strip(text))
    wg("setconf", name, str(conf))
    return device.snapshot_text()


def _our_state(device, text) -> str:
    device.reset()
    request = wgquick.to_uapi_set(wgquick.parse(text, require_private_key=False))
    device._handle(uapi.Request("set", tuple(request.split("\n")[1:-2])))
    return device.snapshot_text()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs(hostnames=False))
def test_real_wg_parses_our_formatted_configs_like_we_do(fake_device, tmp_path, config):
    """Differential: wg's config parser (setconf) and ours (to_uapi_set) configure the same device."""
    name, device = fake_device
    text = wgquick.format_config(config)
    assert _wg_setconf_state(name, device, tmp_path, text) == _our_state(device, text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=structured_config_text)
def test_whatever_we_accept_real_wg_accepts_the_same_way(fake_device, tmp_path, text):
    """Noisy, mostly valid files: if our parser accepts one, wg's setconf does too, with the same result."""
    name, device = fake_device
    try:
        wgquick.parse(text, require_private_key=False)
    except ConfigError:
        return
    if "\x00" in text or "host.example" in text:  # bash cannot hold NUL; wg would try DNS for the hostname
        return
    assert _wg_setconf_state(name, device, tmp_path, text) == _our_state(device, text)
