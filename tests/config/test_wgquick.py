"""wg-quick config: parse/format round trips, every error's file:line:key, strip parity with wg-quick."""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import require_real_components  # tests/conftest.py (a site-packages "tests" package shadows tests.conftest)
from meshwg.config import keys, uapi, wgquick
from meshwg.config.wgquick import Endpoint

from config_strategies import configs  # tests/config/config_strategies.py
from meshwg.errors import ConfigError

SK = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PK_OF_SK = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
PK1 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
PK2 = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0="
PSK = "/UwcSPg38hW/D9Y3tcS1FOV0K1wuURMbS0sesJEP5ak="

FULL = f"""\
# Name = node1.example.tld
[Interface]
Address = 192.0.2.3/32, 2001:DB8::3/128
Address = 10.10.0.1/16
ListenPort = 51820
PrivateKey = {SK}
DNS = 1.1.1.1,8.8.8.8, internal.example.com
DNS = 2606:4700:4700::1111
Table = 12345
MTU = 1420
FwMark = 0xca6c
SaveConfig = true
PreUp = /bin/example arg1 arg2 %i
PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -A FORWARD -o %i -j ACCEPT
PostUp = echo "$(date +%s) WireGuard Started" >> /var/log/wireguard.log
PreDown = curl https://events.example.dev/wireguard/stopping/?key=abcdefg
PostDown = iptables -D FORWARD -i %i -j ACCEPT

[Peer]
# Name = public-server1.example-vpn.tld
Endpoint = public-server1.example-vpn.tld:51820
PublicKey = {PK1}
PresharedKey = {PSK}
# routes traffic to itself and entire subnet of peers as bounce server
AllowedIPs = 192.0.2.1/24
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25

[peer]
publickey = {PK2}
endpoint = [2607:5300:60:6b0::c05f:543]:2468
allowedips = 10.192.122.4/32, 192.168.0.0/16
persistentkeepalive = off
"""


def test_parse_full_reference_config():
    config = wgquick.parse(FULL, "wg0.conf")
    iface = config.interface
    assert iface.private_key == keys.key_from_base64(SK)
    assert keys.key_to_base64(iface.public_key) == PK_OF_SK
    assert [str(a) for a in iface.addresses] == ["192.0.2.3/32", "2001:db8::3/128", "10.10.0.1/16"]
    assert iface.listen_port == 51820
    assert [str(d) for d in iface.dns] == ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111"]
    assert iface.dns_search == ["internal.example.com"]
    assert (iface.table, iface.mtu, iface.fwmark, iface.save_config) == ("12345", 1420, 0xCA6C, True)
    assert iface.pre_up == ["/bin/example arg1 arg2 %i"]
    assert iface.post_up[0].endswith("-o %i -j ACCEPT") and len(iface.post_up) == 2
    # `#` starts a comment even inside a hook, as in wg-quick: the "%s) ..." survives, nothing after "#" would
    assert iface.post_up[1] == 'echo "$(date +%s) WireGuard Started" >> /var/log/wireguard.log'
    assert iface.comments == {"[Interface]": ["# Name = node1.example.tld"]}
    p1, p2 = config.peers
    assert p1.public_key == keys.key_from_base64(PK1) and p1.preshared_key == keys.key_from_base64(PSK)
    assert p1.endpoint == Endpoint("public-server1.example-vpn.tld", 51820) and p1.endpoint.ip is None
    assert [str(n) for n in p1.allowed_ips] == ["192.0.2.0/24", "0.0.0.0/0", "::/0"]
    assert p1.persistent_keepalive == 25
    assert p1.comments == {  # a comment belongs to the key or section that follows it
        "Endpoint": ["# Name = public-server1.example-vpn.tld"],
        "AllowedIPs": ["# routes traffic to itself and entire subnet of peers as bounce server"],
    }
    assert p2.endpoint == Endpoint("2607:5300:60:6b0::c05f:543", 2468)
    assert str(p2.endpoint) == "[2607:5300:60:6b0::c05f:543]:2468"
    assert p2.persistent_keepalive == 0 and p2.preshared_key is None


def test_round_trip_keeps_values_and_comments():
    config = wgquick.parse(FULL)
    text = wgquick.format_config(config)
    assert wgquick.parse(text) == config
    assert wgquick.format_config(wgquick.parse(text)) == text
    for comment in ("# Name = node1.example.tld", "# Name = public-server1.example-vpn.tld", "# routes traffic"):
        assert comment in text
    # the comment stays right above the key it described
    lines = text.splitlines()
    assert lines[lines.index("AllowedIPs = 192.0.2.0/24, 0.0.0.0/0, ::/0") - 1].startswith("# routes traffic")


def test_inline_and_trailing_comments():
    text = f"[Interface] # me\nPrivateKey = {SK} # secret!\nListenPort = 1 #port\n# left over\n"
    config = wgquick.parse(text)
    assert config.interface.comments == {"[Interface]": ["# me"], "PrivateKey": ["# secret!"], "ListenPort": ["#port"]}
    assert config.trailing_comments == ["# left over"]
    again = wgquick.format_config(config)
    assert again == f"# me\n[Interface]\n# secret!\nPrivateKey = {SK}\n#port\nListenPort = 1\n\n# left over\n"
    assert wgquick.parse(again) == config


def test_comment_above_a_key_with_no_output_moves_to_the_section():
    text = f"[Interface]\nPrivateKey = {SK}\n# nothing here\nAddress =\n"
    config = wgquick.parse(text)
    assert config.interface.comments == {"[Interface]": ["# nothing here"]}
    out = wgquick.format_config(config)
    assert wgquick.format_config(wgquick.parse(out)) == out


def test_peer_with_own_public_key_is_ignored():
    text = f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK_OF_SK}\nAllowedIPs = 10.0.0.1/32\n[Peer]\nPublicKey = {PK1}\n"
    config = wgquick.parse(text)
    assert [p.public_key for p in config.peers] == [keys.key_from_base64(PK1)]
    assert config.ignored_peers == [keys.key_from_base64(PK_OF_SK)]
    # a shared peers.conf parsed on its own, told who we are
    peers_only = f"[Peer]\nPublicKey = {PK_OF_SK}\n[Peer]\nPublicKey = {PK1}\n"
    shared = wgquick.parse(peers_only, require_private_key=False, own_public_key=keys.key_from_base64(PK_OF_SK))
    assert [p.public_key for p in shared.peers] == [keys.key_from_base64(PK1)] and shared.interface is None


def test_keys_and_sections_are_case_insensitive_and_values_normalised():
    text = f"[INTERFACE]\nprivatekey={SK}\nFWMARK=off\nTABLE=Off\nsaveconfig=FALSE\n[PEER]\nPUBLICKEY={PK1}\nallowedIPs=10.1.2.3/8\n"
    config = wgquick.parse(text)
    assert (config.interface.fwmark, config.interface.table, config.interface.save_config) == (0, "off", False)
    assert config.peers[0].allowed_ips == [ipaddress.ip_network("10.0.0.0/8")]
    assert "FwMark = off" in wgquick.format_config(config)


@pytest.mark.parametrize(
    "body, line, key, fragment",
    [
        (f"[Interface]\nPrivateKey = {SK[:-2]}=\n", 2, "PrivateKey", "bad base64"),
        ("[Interface]\nPrivateKey = AAAA\n", 2, "PrivateKey", "wrong key length (got 3 bytes, want 32)"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = nope!\n", 4, "PublicKey", "bad base64"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nPresharedKey = AAAA\n", 5, "PresharedKey", "wrong key length"),
        (f"[Interface]\nPrivateKey = {SK}\nAddress = 10.0.0.1/33\n", 3, "Address", "bad address"),
        (f"[Interface]\nPrivateKey = {SK}\nAddress = 10.0.0.256/24\n", 3, "Address", "bad address"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nAllowedIPs = 10.0.0.0/24, 1.2.3/8\n", 5, "AllowedIPs", "bad CIDR"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nAllowedIPs = fd00::/129\n", 5, "AllowedIPs", "bad CIDR"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nAllowedIPs = 10.0.0.0/255.0.0.0\n", 5, "AllowedIPs", "bad CIDR"),
        (f"[Interface]\nPrivateKey = {SK}\nListenPort = 65536\n", 3, "ListenPort", "port out of range"),
        (f"[Interface]\nPrivateKey = {SK}\nListenPort = -1\n", 3, "ListenPort", "not a number"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nEndpoint = 1.2.3.4:0\n", 5, "Endpoint", "port out of range"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nEndpoint = 1.2.3.4\n", 5, "Endpoint", "bad endpoint"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nEndpoint = fd00::1:51820\n", 5, "Endpoint", "need brackets"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nEndpoint = [1.2.3.4]:5\n", 5, "Endpoint", "brackets are for IPv6"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nEndpoint = 1.2.3.400:5\n", 5, "Endpoint", "bad endpoint host"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nPersistentKeepalive = 65536\n", 5, "PersistentKeepalive", "out of range"),
        (f"[Interface]\nPrivateKey = {SK}\nMTU = 1\n", 3, "MTU", "MTU out of range"),
        (f"[Interface]\nPrivateKey = {SK}\nFwMark = 0x1ffffffff\n", 3, "FwMark", "fwmark out of range"),
        (f"[Interface]\nPrivateKey = {SK}\nFwMark = 0xzz\n", 3, "FwMark", "bad fwmark"),
        (f"[Interface]\nPrivateKey = {SK}\nFwMark = 0X10\n", 3, "FwMark", "not a number"),  # wg: lowercase 0x only
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nAllowedIPs =\n", 5, "AllowedIPs", "missing value"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nAllowedIPs = 10.0.0.0/8,\n", 5, "AllowedIPs", "bad CIDR"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nAllowedIPs = 10.0.0.0/8 10.1.0.0/16\n", 5, "AllowedIPs", "bad CIDR"),
        (f"[Interface]\nPrivateKey = {SK}\nTable = a b\n", 3, "Table", "bad table"),
        (f"[Interface]\nPrivateKey = {SK}\nSaveConfig = yes\n", 3, "SaveConfig", "want true or false"),
        (f"[Interface]\nPrivateKey = {SK}\nDNS = 1.1.1.300\n", 3, "DNS", "bad DNS server"),
        (f"[Interface]\nPrivateKey = {SK}\nDNS = bad/domain\n", 3, "DNS", "bad DNS search domain"),
        (f"[Interface]\nPrivateKey = {SK}\nListenPort =\n", 3, "ListenPort", "missing value"),
        (f"[Interface]\nPrivateKey = {SK}\nColour = blue\n", 3, "Colour", "unknown key in [Interface]"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\nAddress = 10.0.0.1\n", 5, "Address", "unknown key in [Peer]"),
        (f"[Interface]\nPrivateKey = {SK}\nEndpoint = 1.2.3.4:5\n", 3, "Endpoint", "unknown key in [Interface]"),
        (f"ListenPort = 1\n[Interface]\nPrivateKey = {SK}\n", 1, "ListenPort", "key outside a section"),
        (f"[Interface]\nPrivateKey = {SK}\njust words\n", 3, "just words", "expected `Key = value`"),
        (f"[Interface]\nPrivateKey = {SK}\n= 5\n", 3, "(empty key)", "expected"[:0]),
        (f"[Interface]\nPrivateKey = {SK}\n[Peers]\n", 3, "[Peers]", "unknown section"),
        (f"[Interface]\nPrivateKey = {SK}\n[Interface]\n", 3, "[Interface]", "duplicate [Interface] section"),
        (f"[Interface]\nPrivateKey = {SK}\nListenPort = 1\nlistenport = 2\n", 4, "ListenPort", "duplicate key (first set on line 3)"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nPublicKey = {PK1}\n\n[Peer]\nPublicKey = {PK1}\n", 7, "PublicKey", "duplicate PublicKey (peer on line 3)"),
        (f"[Interface]\nPrivateKey = {SK}\n[Peer]\nAllowedIPs = 10.0.0.1/32\n", 3, "PublicKey", "missing PublicKey"),
        ("[Interface]\nListenPort = 1\n", 1, "PrivateKey", "missing PrivateKey"),
        (f"[Peer]\nPublicKey = {PK1}\n", 1, "[Interface]", "missing [Interface] section"),
        ("[Interface]\nPrivateKey = " + "9" * 5000 + "\n", 2, "PrivateKey", "wrong key length (got 3750 bytes"),
        (f"[Interface]\nPrivateKey = {SK}\nMTU = " + "9" * 5000 + "\n", 3, "MTU", "out of range"),
    ],
)
def test_every_error_names_file_line_and_key(body, line, key, fragment):
    with pytest.raises(ConfigError) as info:
        wgquick.parse(body, "wg9.conf")
    err = info.value
    assert (err.filename, err.line, err.key) == ("wg9.conf", line, key)
    assert str(err).startswith(f"wg9.conf:{line}: {key}: ")
    assert fragment in err.message
    assert "\n" not in str(err)


def test_error_key_with_control_characters_stays_one_line():
    with pytest.raises(ConfigError) as info:
        wgquick.parse("[Interface]\nPriv\rKey\x1b = 1\n")
    assert str(info.value).isprintable()


def test_peers_only_file_allowed_when_asked():
    config = wgquick.parse(f"[Peer]\nPublicKey = {PK1}\n", require_private_key=False)
    assert config.interface is None and len(config.peers) == 1


# ---------------------------------------------------------------- UAPI set from a config


def test_to_uapi_set_parses_back_with_the_uapi_codec():
    config = wgquick.parse(FULL)
    with pytest.raises(ConfigError, match="must be resolved"):
        wgquick.to_uapi_set(config)
    text = wgquick.to_uapi_set(config, resolve=lambda host, port: ("192.0.2.77", port))
    assert text.startswith("set=1\n") and text.endswith("\n\n")
    request = uapi.parse_set_request_untrusted(text.split("\n")[1:-2])
    assert request.private_key == keys.key_from_base64(SK)
    assert (request.listen_port, request.fwmark, request.replace_peers) == (51820, 0xCA6C, True)
    p1, p2 = request.peers
    assert p1.endpoint == ("192.0.2.77", 51820) and p2.endpoint == ("2607:5300:60:6b0::c05f:543", 2468)
    assert p1.preshared_key == keys.key_from_base64(PSK)
    assert p1.replace_allowed_ips and [c.network for c in p1.allowed_ips] == config.peers[0].allowed_ips
    assert (p1.persistent_keepalive_interval, p2.persistent_keepalive_interval) == (25, 0)
    assert request == wgquick.to_set_request(config, resolve=lambda host, port: ("192.0.2.77", port))


# ---------------------------------------------------------------- property tests

@settings(max_examples=150, deadline=None)
@given(configs())
def test_parse_of_format_is_identity(config):
    text = wgquick.format_config(config)
    assert wgquick.parse(text) == config
    assert wgquick.format_config(wgquick.parse(text)) == text


_FRAGMENTS = [
    "[Interface]", "[Peer]", "[interface]", "[Nope]", f"PrivateKey = {SK}", f"PublicKey = {PK1}",
    f"PublicKey = {PK2}", f"PublicKey = {PK_OF_SK}", f"PresharedKey = {PSK}", "Address = 10.0.0.1/24, fd00::1",
    "Address =", "DNS = 1.1.1.1, example.com", "ListenPort = 51820", "FwMark = 0x10", "Table = off", "MTU = 1420",
    "PostUp = echo %i # hi", "PreDown = x", "SaveConfig = true", "AllowedIPs = 0.0.0.0/0, ::/0", "AllowedIPs = 10.1.2.3/8",
    "Endpoint = [::1]:5", "Endpoint = host.example:51820", "PersistentKeepalive = off", "# comment", "", "  # indented",
]
_line = st.one_of(
    st.sampled_from(_FRAGMENTS),
    st.text(alphabet="[]=#,:/. abcPIKe0123456789\t\r", max_size=25),
    st.text(max_size=15),
)


_IFACE_LINES = [f for f in _FRAGMENTS if not f.startswith(("[", "PublicKey", "PresharedKey", "AllowedIPs", "Endpoint", "Persistent"))]
_PEER_LINES = [f for f in _FRAGMENTS if f.startswith(("PresharedKey", "AllowedIPs", "Endpoint", "Persistent", "#", " ")) or not f]
_iface_section = st.tuples(
    st.sampled_from(["[Interface]", "[interface]"]), st.lists(st.sampled_from(_IFACE_LINES), max_size=8, unique=True)
)
_peer_sections = st.lists(
    st.tuples(st.sampled_from([f"[Peer]\nPublicKey = {k}" for k in (PK1, PK2, PK_OF_SK)]),
              st.lists(st.sampled_from(_PEER_LINES), max_size=5, unique_by=lambda f: f.partition("=")[0] or f)),
    max_size=3, unique_by=lambda sec: sec[0],
)
_join_section = lambda sec: "\n".join([sec[0], *sec[1]])  # noqa: E731
# Mostly-valid files (so the format fixed point is exercised), plus occasional noise.
_structured = st.tuples(
    st.none() | _iface_section, _peer_sections, st.just([]) | st.lists(_line, max_size=1)
).map(lambda t: "\n".join([*([_join_section(t[0])] if t[0] else []), *map(_join_section, t[1]), *t[2]]))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(_line, max_size=14).map("\n".join), _structured))
def test_random_text_raises_only_config_error_and_format_is_a_fixed_point(text):
    try:
        config = wgquick.parse(text, require_private_key=False)
    except ConfigError as err:
        assert err.line is not None and err.key and "\n" not in str(err)
        return
    once = wgquick.format_config(config)
    again = wgquick.parse(once, require_private_key=False)
    assert again == config
    assert wgquick.format_config(again) == once


# ---------------------------------------------------------------- strip parity with the real wg-quick


def _real_strip(tmp_path, text: str) -> str:
    path = tmp_path / "wgt0.conf"
    path.write_bytes(text.encode())
    os.chmod(path, 0o600)
    os.chmod(tmp_path, 0o700)
    result = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, check=True)
    return result.stdout.decode()  # bytes: text mode would turn the CRLF cases into LF


STRIP_CASES = [
    FULL,
    FULL.replace("\n", "\r\n"),
    f"[Interface]\nPrivateKey = {SK}",  # no final newline
    f"  [Interface]  # c\n\tAddress=10.0.0.1\nPrivateKey = {SK}\n  # indented comment\n\n\n[Peer]\nPublicKey = {PK1}\n  AllowedIPs = 10.0.0.2/32 # x\n",
    f"[Peer]\nPublicKey = {PK1}\n[Interface]\nPrivateKey = {SK}\nMTU = 1280\nPostUp = a=b # = c\n",
]


@pytest.mark.parametrize("text", STRIP_CASES)
def test_strip_matches_real_wg_quick(tmp_path, text):
    require_real_components("wg-quick")
    assert wgquick.strip(text) == _real_strip(tmp_path, text)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs(), st.sampled_from(["\n", "\r\n"]))
def test_strip_matches_real_wg_quick_on_generated_configs(tmp_path, config, newline):
    require_real_components("wg-quick")
    text = wgquick.format_config(config).replace("\n", newline)
    assume(text and "\x00" not in text)  # bash strings cannot hold NUL
    assert wgquick.strip(text) == _real_strip(tmp_path, text)
