"""Known-answer tests: published vectors (each source named at its test) and one WireGuard-framed vector."""

from __future__ import annotations

import ipaddress

import pytest

from meshwg.wg import crypto, messages, noise
from meshwg.wg.cookie import CookieChecker, CookieGenerator
from meshwg.wg.device import WireGuardCore
from meshwg.wg.keypair import Keypair
from meshwg.wg.replay import ReplayWindow

h = bytes.fromhex


# wireguard-go device/kdf_test.go, all three vectors, through KDF1, KDF2 and KDF3.
KDF_VECTORS = [
    ("746573742d6b6579", "746573742d696e707574",
     "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
     "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
     "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24"),
    ("776972656775617264", "776972656775617264",
     "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
     "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
     "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160"),
    ("", "",
     "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
     "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
     "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e"),
]


@pytest.mark.parametrize("key,data,t1,t2,t3", KDF_VECTORS)
def test_kdf(key, data, t1, t2, t3):
    assert crypto.kdf3(h(key), h(data)) == (h(t1), h(t2), h(t3))
    assert crypto.kdf2(h(key), h(data)) == (h(t1), h(t2))
    assert crypto.kdf1(h(key), h(data)) == h(t1)


def test_initial_chain_key_and_hash():
    assert noise.INITIAL_CHAIN_KEY == h("60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36")
    assert noise.INITIAL_HASH == h("2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3")


def test_dh_rejects_low_order_point():
    with pytest.raises(crypto.InvalidKey):
        crypto.dh(crypto.clamp(bytes(range(32))), bytes(32))


# cacophony entry Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s (mcginty/snow tests/vectors/cacophony.txt).
CACO = dict(
    prologue="4a6f686e2047616c74",
    psk="54686973206973206d7920417573747269616e20706572737065637469766521",
    init_static="e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    init_ephemeral="893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    init_remote_static="31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62",
    resp_static="4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    resp_ephemeral="bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    handshake_hash="f5191b875290abcd41347ac3622d9679688a7e980229cb937ef748336cfde0e5",
)
CACO_MESSAGES = [
    ("4c756477696720766f6e204d69736573",
     "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944001e21de9f98ddd8e2ad57527207feb56253c9c9"
     "4a9e496782ecfcb2a75fbcaf1b52948cc48daefe660c62119ab5000980c84831215f2441eba616548e832985464cf17e51ee9310"
     "9008399a21f7e13f"),
    ("4d757272617920526f746862617264",
     "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843cb765f2caef0751b8f007572dab0322217755c06"
     "32f365717edbf34d33e87a"),
    ("462e20412e20486179656b", "8153ca9833bc3c1b91a7e66e5f4d4f5b59bf9e64c2f20d15f0bba7"),
    ("4361726c204d656e676572", "07af0c9c86e1b4e80f36b04ff7688d51141af3debd0332f0a705ef"),
    ("4a65616e2d426170746973746520536179", "6ab1467c0448cc78394494abaaf23afce0e234315d6e2624dcbfa8a21c1c4d073d"),
    ("457567656e2042f6686d20766f6e2042617765726b",
     "dfc346c0d2296ae6cf1acf6f12b8456a1dba228cf8d8b774aacf1c47fc53aa80ebc7a4c292"),
]


def test_cacophony_ikpsk2():
    v = {k: h(x) for k, x in CACO.items()}
    i_pub = crypto.dh_pub(v["init_static"])
    assert crypto.dh_pub(v["resp_static"]) == v["init_remote_static"]
    payload1, wire1 = (h(x) for x in CACO_MESSAGES[0])
    init = noise.create_initiation(v["init_static"], i_pub, v["init_remote_static"], v["init_ephemeral"],
                                   payload1, prologue=v["prologue"])
    assert init.ephemeral + init.encrypted_static + init.encrypted_payload == wire1
    consumed = noise.consume_initiation(
        v["resp_static"], v["init_remote_static"], wire1[:32], wire1[32:80], wire1[80:],
        lambda rs: crypto.dh(v["resp_static"], rs) if rs == i_pub else None, prologue=v["prologue"])
    assert consumed is not None and consumed.payload == payload1 and consumed.remote_static == i_pub

    payload2, wire2 = (h(x) for x in CACO_MESSAGES[1])
    resp = noise.create_response(consumed, v["resp_ephemeral"], v["psk"], payload2)
    assert resp.ephemeral + resp.encrypted_payload == wire2
    result = noise.consume_response(init.state, v["init_static"], wire2[:32], wire2[32:], v["psk"])
    assert result is not None
    c_i, h_i, got2 = result
    assert got2 == payload2
    assert h_i == resp.hash == v["handshake_hash"]
    assert c_i == resp.chain_key

    t1, t2 = noise.transport_keys(c_i)
    for at, (payload, wire) in enumerate(CACO_MESSAGES[2:]):
        key = t1 if at % 2 == 0 else t2  # initiator, responder, alternating; counters 0,0,1,1
        assert crypto.aead_encrypt(key, at // 2, h(payload), b"") == h(wire)
        assert crypto.aead_decrypt(key, at // 2, h(wire), b"") == h(payload)


# zinc selftest xenc/xdec 001 (wireguard src/crypto/zinc/selftest/chacha20poly1305.c).
XCHACHA_KEY = "1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0"
XCHACHA_NONCE = "000102030405060708090a0b0c0d0e0f1011121314151617"
XCHACHA_AAD = "f33388860000000000004e91"
XCHACHA_INPUT = (
    "496e7465726e65742d4472616674732061726520647261667420646f63756d656e74732076616c696420666f722061206d6178696d"
    "756d206f6620736978206d6f6e74687320616e64206d617920626520757064617465642c207265706c616365642c206f72206f6273"
    "6f6c65746564206279206f7468657220646f63756d656e747320617420616e792074696d652e20497420697320696e617070726f70"
    "726961746520746f2075736520496e7465726e65742d447261667473206173207265666572656e6365206d6174657269616c206f72"
    "20746f2063697465207468656d206f74686572207468616e206173202fe2809c776f726b20696e2070726f67726573732e2fe2809d")
XCHACHA_OUTPUT = (
    "1a6e3ad9fd413f7754720a709aa029922eed93cf0f7188187a9d2d24e0f5ea3d5564d7ad2a1a1f7e866db0ce8041728626ee84d7ef"
    "829ee2609d5afcf0e41985ea09c6fbb3a95009ec5e1190a1c54e49ef50d88fe078d7fdb93bc9f291c825c8a76360ce10cdc67ff816"
    "f8e10ad9de795033f2160f17bab85dd8df4e51a839d085ca466a10a7a388ef79b9f824f3e0717b7628463a3a1b91b6d43e23e54415"
    "bf60439da4bbd55f89ebef8efdddb40d46f0692363ae94f55ea5ad131c4176e690d66da28f974ca80bcf8d432b9c9bc558a5b6959a"
    "bf81c654c9660ce54f6a53a1e50cba31de3464738a3bbd9201db7169f35899bcd1cb4a05e2589c2517cddc83b7fffb0961adbf135b"
    "5eed46826f22d893a6855b40395cc59c")


def test_xchacha20poly1305_enc_dec_001():
    key, nonce, aad = h(XCHACHA_KEY), h(XCHACHA_NONCE), h(XCHACHA_AAD)
    assert crypto.xaead_encrypt(key, nonce, h(XCHACHA_INPUT), aad) == h(XCHACHA_OUTPUT)
    assert crypto.xaead_decrypt(key, nonce, h(XCHACHA_OUTPUT), aad) == h(XCHACHA_INPUT)
    tampered = bytearray(h(XCHACHA_OUTPUT))
    tampered[-1] ^= 1
    assert crypto.xaead_decrypt(key, nonce, bytes(tampered), aad) is None


# wireguard-go replay/replay_test.go (port of the kernel's counter selftest).
def test_replay_window_sequence():
    limit = (1 << 64) - (1 << 4) - 1  # the test's own RejectAfterMessages
    T_LIM = 8128 + 1
    steps = [
        (0, True), (1, True), (1, False), (9, True), (8, True), (7, True), (7, False), (T_LIM, True),
        (T_LIM - 1, True), (T_LIM - 1, False), (T_LIM - 2, True), (2, True), (2, False), (T_LIM + 16, True),
        (3, False), (T_LIM + 16, False), (T_LIM * 4, True), (T_LIM * 4 - (T_LIM - 1), True), (10, False),
        (T_LIM * 4 - T_LIM, False), (T_LIM * 4 - (T_LIM + 1), False), (T_LIM * 4 - (T_LIM - 2), True),
        (T_LIM * 4 + 1 - T_LIM, False), (0, False), (limit, False), (limit - 1, True), (limit, False),
        (limit - 1, False), (limit - 2, True), (limit + 1, False), (limit + 2, False), (limit - 2, False),
        (limit - 3, True), (0, False),
    ]
    w = ReplayWindow()
    for number, (counter, expected) in enumerate(steps, 1):
        assert w.validate(counter, limit) is expected, f"step {number}: {counter}"


def _bulk(seq, tail):
    w = ReplayWindow()
    for c in seq:
        assert w.validate(c), c
    for c, expected in tail:
        assert w.validate(c) is expected, c


def test_replay_window_bulk():
    W = 8128
    _bulk(range(1, W + 1), [(0, True), (0, False)])
    _bulk(range(2, W + 2), [(1, True), (0, False)])
    _bulk(range(W + 1, 0, -1), [])
    _bulk(range(W + 2, 1, -1), [(0, False)])
    _bulk(range(W, 0, -1), [(W + 1, True), (0, False)])
    _bulk(range(W, 0, -1), [(0, True), (W + 1, True)])


# A WireGuard-framed vector made for this project (wireguard-go accepted that initiation).
def _r(a, b):
    return bytes(range(a, b + 1))


SI, SR, EI, ER = (crypto.clamp(_r(1, 0x20)), crypto.clamp(_r(0x21, 0x40)), crypto.clamp(_r(0x41, 0x60)),
                  crypto.clamp(_r(0x61, 0x80)))
PSK = _r(0x81, 0xA0)
WALL = 1700000000.123456789
I_INDEX, R_INDEX = 0x11223344, 0x55667788
V_SPUB_I = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
V_SPUB_R = "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b"
V_TAI = "400000006553f10a07000000"
V_INIT = ("010000004433221164b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466158a0e4ca242d151ca97ab90"
          "159a98b67e616625e68b4065d357376b6598e644ad7d678c0295d22de4cb43d5135581ed36346bfa7cf42a122639f89315e67f2b"
          "43de40f99f8e6be9135e1632d45237be41c55cffa3e7b390a525fe6500000000000000000000000000000000")
V_RESP = ("020000008877665544332211244fe3b963e899dd295baffce248d3530f3a9a7479ba063002680ebfe7adad4927d9d0c10dbd892b"
          "072dfd62f2b6d42bee99ce22cd644e00a4f7522e3d9c984400000000000000000000000000000000")
V_T1 = "248a29611829aaf7ee8bc8e87df805c1019f08f82d80eb79b7625821ba0a1317"
V_T2 = "848308e622b3e15e5ebc5312111efc31082e86c85e9ee93fe8c5aa7f972cc9c3"
V_HELLO = ("04000000887766550000000000000000b2ea16d7c4ad8d3fc59afdb71376d9508accd8c930ecb8f0280c59b1439ee711")
V_KEEPALIVE = "0400000044332211000000000000000010dc9041d68a187ff419d33cab66fc50"
V_COOKIE = "ce77b3ed90589aecabcdf9b9adac79fb"
V_COOKIE_REPLY = ("0300000044332211000102030405060708090a0b0c0d0e0f10111213141516170a62324b68470f6cf38887bbcf3b87549dbd"
                  "ded898fe16ccd4662eaefe1e5fd0")
V_MACS_WITH_COOKIE = "d45237be41c55cffa3e7b390a525fe65b622a3f49364155c9e4276a7cccba23e"


def test_wg_framed_vector_noise_level():
    spub_i, spub_r = crypto.dh_pub(SI), crypto.dh_pub(SR)
    assert spub_i.hex() == V_SPUB_I and spub_r.hex() == V_SPUB_R
    assert crypto.tai64n(WALL).hex() == V_TAI
    init = noise.create_initiation(SI, spub_i, spub_r, EI, crypto.tai64n(WALL))
    gen_i = CookieGenerator(spub_r)
    body = messages.encode(messages.Initiation(I_INDEX, init.ephemeral, init.encrypted_static,
                                               init.encrypted_payload))[:116]
    wire_init = gen_i.add_macs(body, now=0.0)
    assert wire_init.hex() == V_INIT
    parsed = messages.parse_untrusted(wire_init)
    assert isinstance(parsed, messages.Initiation) and messages.encode(parsed) == wire_init

    consumed = noise.consume_initiation(SR, spub_r, parsed.ephemeral, parsed.encrypted_static,
                                        parsed.encrypted_timestamp, lambda rs: crypto.dh(SR, rs))
    assert consumed.payload.hex() == V_TAI and consumed.remote_static == spub_i
    resp = noise.create_response(consumed, ER, PSK)
    gen_r = CookieGenerator(spub_i)  # a response's mac1 is keyed with the initiator's key
    body = messages.encode(messages.Response(R_INDEX, I_INDEX, resp.ephemeral, resp.encrypted_payload))[:60]
    assert gen_r.add_macs(body, now=0.0).hex() == V_RESP

    c, _, _ = noise.consume_response(init.state, SI, resp.ephemeral, resp.encrypted_payload, PSK)
    t1, t2 = noise.transport_keys(c)
    assert (t1.hex(), t2.hex()) == (V_T1, V_T2)
    sender = Keypair(t1, t2, I_INDEX, R_INDEX, 0.0, True)
    receiver = Keypair(t2, t1, R_INDEX, I_INDEX, 0.0, False)
    hello = sender.seal(b"hello" + bytes(11))
    assert hello.hex() == V_HELLO
    assert receiver.open(hello) == b"hello" + bytes(11)
    assert receiver.open(hello) is None  # replayed
    keepalive = receiver.seal(b"")
    assert keepalive.hex() == V_KEEPALIVE and sender.open(keepalive) == b""

    # Cookie path: Rm = aa*32, source 192.0.2.1:51820.
    checker = CookieChecker(ScriptedRandom(n32=[b"\xaa" * 32], n24=[bytes(range(24))]))
    checker.set_public_key(spub_r)
    assert crypto.mac(b"\xaa" * 32, h("c0000201ca6c")).hex() == V_COOKIE
    receiver_index, nonce, enc = checker.create_reply(wire_init, 116, ("192.0.2.1", 51820), now=10.0)
    reply = messages.encode(messages.CookieReply(receiver_index, nonce, enc))
    assert reply.hex() == V_COOKIE_REPLY
    assert gen_i.consume_reply(nonce, enc, now=10.0) and gen_i.cookie.hex() == V_COOKIE
    again = gen_i.add_macs(wire_init[:116], now=11.0)
    assert again[116:].hex() == V_MACS_WITH_COOKIE
    assert checker.check_mac1(again, 116) and checker.check_mac2(again, 132, ("192.0.2.1", 51820), now=11.0)
    assert not checker.check_mac2(again, 132, ("192.0.2.2", 51820), now=11.0)


class ScriptedRandom:
    """Serves fixed bytes per requested length (4: indices, 32: ephemerals); zeros for anything else."""

    def __init__(self, **by_len):
        self.queues = {int(k[1:]): list(v) for k, v in by_len.items()}

    def __call__(self, n):
        q = self.queues.get(n)
        return q.pop(0) if q else bytes(n)


def test_wg_framed_vector_through_the_core():
    now = 100.0
    ini = WireGuardCore(SI, ScriptedRandom(n4=[I_INDEX.to_bytes(4, "little")], n32=[_r(0x41, 0x60)]),
                        wall_offset=WALL - now)
    rsp = WireGuardCore(SR, ScriptedRandom(n4=[R_INDEX.to_bytes(4, "little")], n32=[_r(0x61, 0x80)]),
                        wall_offset=0.0)
    p_r = ini.add_peer(rsp.public_key)
    ini.set_preshared_key(p_r, PSK)
    ini.set_endpoint(p_r, ("192.0.2.2", 51820))
    ini.set_allowed_ips(p_r, [ipaddress.ip_network("10.0.0.2/32")])
    p_i = rsp.add_peer(ini.public_key)
    rsp.set_preshared_key(p_i, PSK)
    ini.initiate_handshake(p_r, now)
    [(wire, addr)] = ini.datagrams_to_send()
    assert wire.hex() == V_INIT and addr == ("192.0.2.2", 51820)
    rsp.receive_datagram(wire, ("192.0.2.1", 51820), now)
    [(wire, addr)] = rsp.datagrams_to_send()
    assert wire.hex() == V_RESP and addr == ("192.0.2.1", 51820)
    assert p_i.endpoint == ("192.0.2.1", 51820)
    ini.receive_datagram(wire, ("192.0.2.2", 51820), now)
    [(keepalive, _)] = ini.datagrams_to_send()  # key confirmation
    assert keepalive == Keypair(h(V_T1), h(V_T2), I_INDEX, R_INDEX, 0, True).seal(b"")
    rsp.receive_datagram(keepalive, ("192.0.2.1", 51820), now)
    assert rsp.peers[ini.public_key].keypairs.current is not None
    assert not rsp.drops and not ini.drops
