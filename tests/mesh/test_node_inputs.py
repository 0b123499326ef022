"""MeshNode inputs that must not build up state: what it cannot use is counted and dropped."""

from mesh_sim import Sim

from meshwg.signaling import relay_wire as W


def _held(node) -> int:
    """Items held in the node's own list/dict attributes (its counters aside)."""
    return sum(len(v) for k, v in vars(node).items() if k != "counters" and isinstance(v, (list, dict)))


def test_relay_frame_on_a_birthday_socket_is_counted_not_kept():
    # The relay session reads relay frames off the main socket only; the birthday sockets feed
    # receive_datagram directly, so one sent to a birthday port must not pile up in the node.
    sim = Sim(seed=3)
    node = sim.add_host("a", lan_ip="192.168.1.2", mesh_ip="100.64.0.1").node
    node.datagrams_to_send(), node.pop_events()
    held = _held(node)
    frame = W.encode_recv(b"k" * 32, b"\x04\0\0\0" + b"\0" * 28)
    for i in range(200):
        node.receive_datagram(frame, ("198.51.100.9", 4000 + i), float(i), via=1 + i % 4)
    assert node.counters["drop_relay_datagram"] == 200
    assert node.drops["drop_relay_datagram"] == 200
    assert node.datagrams_to_send() == [] and node.pop_events() == []
    assert _held(node) == held


def test_wireguard_from_the_driver_goes_straight_to_the_core():
    """receive_wireguard (the driver already split the datagram off as WireGuard) reaches the core,
    whose own checks count a malformed one; nothing is held in the node."""
    sim = Sim(seed=4)
    node = sim.add_host("a", lan_ip="192.168.1.2", mesh_ip="100.64.0.1").node
    node.datagrams_to_send(), node.pop_events()
    held = _held(node)
    node.receive_wireguard(b"\x01\0\0\0" + bytes(40), ("198.51.100.9", 4000), 1.0)  # an initiation's type, wrong size
    node.receive_wireguard(b"\x04\0\0\0" + bytes(40), ("198.51.100.9", 4000), 1.0)  # transport, unknown index
    assert node.core.drops["bad_size"] == 1 and node.core.drops["unknown_index"] == 1
    assert node.datagrams_to_send() == [] and _held(node) == held
