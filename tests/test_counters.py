"""meshwg.counters: the one counter convention and its merged view."""

from collections import Counter

from meshwg import counters


def test_merge_prefixes_each_component_and_leaves_zeros_out():
    merged = counters.merge({"node": Counter(drop_unknown_datagram=2, send_disco_ping=5, recv_stun=0),
                             "driver": Counter(drop_send_error=1)})
    assert merged == {"node.drop_unknown_datagram": 2, "node.send_disco_ping": 5, "driver.drop_send_error": 1}


def test_drops_keeps_the_drop_keys_only():
    merged = {"node.drop_unknown_datagram": 2, "node.send_disco_ping": 5, "routes.add_route": 1,
              "core.drop_replay": 1}
    assert counters.drops(merged) == {"node.drop_unknown_datagram": 2, "core.drop_replay": 1}
    assert counters.drops(Counter(drop_stun=1, recv_stun=3)) == {"drop_stun": 1}


def test_reason_tables_join_with_the_drop_prefix():
    assert counters.as_drops(Counter(replay=3, bad_mac1=0, drop_x=1)) == Counter(drop_replay=3, drop_x=1)
