"""Birthday punching as a technique on its own (meshwg.disco.techniques.birthday): no node, no PeerPaths, a
stand-in peer and explicit time. Figures are literals (Tailscale's: 256 sockets x 8 rounds on the hard side,
1,024 ports at 200 a second on the easy side), never the constants under test."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from meshwg.disco import peer_paths
from meshwg.disco.netcheck import EDM, EIM
from meshwg.disco.peer_paths import PeerPaths, SendPing
from meshwg.disco.techniques import CloseSockets, OpenSockets, Probe, Started, Technique
from meshwg.disco.techniques.birthday import Birthday, role_for

OBSERVED = ("198.51.100.7", 40000)


@dataclass
class Peer:
    """What a technique sees of a peer (PeerView)."""
    local_nat: str | None = EIM
    peer_nat: str | None = EDM
    observed: tuple | None = OBSERVED
    is_direct: bool = False

    def direct(self, now: float) -> bool:
        return self.is_direct

    def observed_addr(self) -> tuple | None:
        return self.observed


def _rb(seed=1):
    r = random.Random(seed)
    return lambda n: r.getrandbits(8 * n).to_bytes(n, "big")


def run(t: Technique, peer: Peer, start: float, end: float, step: float = 0.01, budget=None) -> list:
    """Poll every `step` seconds from start to end; (now, action) for each action."""
    out = []
    for i in range(round((end - start) / step) + 1):
        now = start + i * step
        out += [(now, a) for a in t.poll(peer, now, budget)]
    return out


def probes(log) -> list:
    return [(now, a) for now, a in log if isinstance(a, Probe)]


def test_roles_need_exactly_one_side_mapping_per_destination():
    assert role_for(EDM, EIM) == "hard" and role_for(EIM, EDM) == "easy"
    assert role_for(EIM, EIM) is None and role_for(EDM, EDM) is None
    assert role_for(None, EDM) is None and role_for(EIM, None) is None


def test_nothing_happens_unless_armed():
    t = Birthday(_rb())
    assert t.deadline() == math.inf
    assert run(t, Peer(), 0.0, 30.0, step=0.5) == []


def test_easy_side_sends_1024_distinct_ports_at_200_a_second_then_ends():
    t, peer = Birthday(_rb()), Peer()
    t.arm(peer, 10.0)
    assert t.deadline() == 12.0                       # a normal round gets 2 s first
    assert run(t, peer, 10.0, 11.99) == []
    log = run(t, peer, 12.0, 30.0)
    assert isinstance(log[0][1], Started) and sum(isinstance(a, Started) for _, a in log) == 1
    sent = probes(log)
    assert len(sent) == 1024
    assert all(p.via is None and p.addr[0] == "198.51.100.7" for _, p in sent)   # main socket, observed IP
    ports = [p.addr[1] for _, p in sent]
    assert len(set(ports)) == 1024 and all(1024 <= x <= 65535 for x in ports)
    per_batch: dict[float, int] = {}
    for now, _ in sent:
        per_batch[round(now, 2)] = per_batch.get(round(now, 2), 0) + 1
    assert max(per_batch.values()) <= 10              # 200 a second in 50 ms batches
    assert sent[-1][0] >= 12.0 + 1024 / 200 - 0.1
    assert not any(isinstance(a, (OpenSockets, CloseSockets)) for _, a in log)   # no extra sockets
    assert t.plan is None and t.deadline() == math.inf   # ended (5.12 s of probes + 3 s for the pongs)


def test_hard_side_opens_256_sockets_pings_8_rounds_and_closes_the_silent_ones():
    t, peer = Birthday(_rb()), Peer(local_nat=EDM, peer_nat=EIM)
    t.arm(peer, 0.0)
    log = run(t, peer, 2.0, 2.0)
    assert [type(a) for _, a in log] == [Started, OpenSockets] and log[1][1].count == 256
    assert t.holds_sockets and t.role == "hard"
    log = run(t, peer, 2.01, 8.0)
    t.socket_alive(17)                                 # the peer answered on socket 17
    log += run(t, peer, 8.01, 13.0)
    sent = probes(log)
    assert len(sent) == 256 * 8
    assert {p.via for _, p in sent} == set(range(1, 257)) and {p.addr for _, p in sent} == {OBSERVED}
    rounds = sorted({round(now, 2) for now, _ in sent})
    assert len(rounds) == 8 and rounds[0] >= 2.05 and all(b - a >= 1.0 - 1e-9 for a, b in zip(rounds, rounds[1:]))
    closes = [a for _, a in log if isinstance(a, CloseSockets)]
    assert closes == [CloseSockets((17,))]
    assert not t.holds_sockets and t.deadline() == math.inf


def test_a_direct_path_ends_the_attempt_and_closes_the_sockets():
    t, peer = Birthday(_rb()), Peer(local_nat=EDM, peer_nat=EIM)
    t.arm(peer, 0.0)
    run(t, peer, 2.0, 3.0)
    peer.is_direct = True
    assert [a for _, a in run(t, peer, 3.01, 3.01)] == [CloseSockets(())]
    assert t.plan is None and run(t, peer, 3.02, 20.0) == []


def test_not_armed_when_direct_without_an_observed_address_or_a_role():
    for peer in (Peer(is_direct=True), Peer(observed=None), Peer(local_nat=EIM, peer_nat=EIM)):
        t = Birthday(_rb())
        t.arm(peer, 0.0)
        assert t.deadline() == math.inf and run(t, peer, 0.0, 5.0, step=0.5) == []


def test_one_attempt_a_minute_per_peer():
    t, peer = Birthday(_rb()), Peer()
    log = []
    for second in range(0, 180, 5):
        t.arm(peer, float(second))                     # every 5 s a probe round fails
        log += run(t, peer, float(second), second + 4.99)
    starts = [now for now, a in log if isinstance(a, Started)]
    assert len(starts) == 3 and all(b - a >= 60.0 for a, b in zip(starts, starts[1:]))


def _easy_ports(seed=1, budget=None) -> list:
    t, peer = Birthday(_rb(seed)), Peer()
    t.arm(peer, 0.0)
    return probes(run(t, peer, 2.0, 12.0, budget=budget))


def test_a_refused_budget_stops_the_batch_and_keeps_the_port():
    calls = []

    def budget(n):                                     # 4 probes, then a refusal, and again
        calls.append(n)
        return len(calls) % 5 != 0

    sent = _easy_ports(budget=budget)
    per_batch: dict[float, int] = {}
    for now, _ in sent:
        per_batch[now] = per_batch.get(now, 0) + 1
    assert set(per_batch.values()) == {4}              # each batch stopped at its refusal
    unbounded = [p.addr for _, p in _easy_ports()]
    assert 0 < len(sent) < 1024
    assert [p.addr for _, p in sent] == unbounded[:len(sent)]   # the refused port went out next time


def test_ports_come_from_the_randomness_given():
    def ports(seed):
        return [p.addr[1] for _, p in _easy_ports(seed)]
    assert ports(1) == ports(1) and ports(1) != ports(2)


def test_the_node_bounds_birthday_probes_at_2048_a_minute_per_ip():
    assert Birthday.name == "birthday"
    assert Birthday.ip_burst == 2048 and abs(Birthday.ip_rate * 60 - 2048) < 1e-6
    assert Birthday.max_outstanding == 1024


class Knock(Technique):
    """A second technique as the package docstring describes it: one probe per attempt."""
    name = "knock"
    max_outstanding = 1

    def __init__(self, random_bytes):
        super().__init__(random_bytes)
        self.armed = False

    def arm(self, peer, now):
        self.armed = peer.observed_addr() is not None

    def poll(self, peer, now, budget):
        if not self.armed:
            return []
        self.armed = False
        return [Started(), Probe(peer.observed_addr(), 3), OpenSockets(1)]


def test_peer_paths_runs_any_technique_through_the_interface(monkeypatch):
    monkeypatch.setattr(peer_paths, "TECHNIQUES", (Knock,))
    pp = PeerPaths(b"k" * 32, _rb(), local_nat=EIM, peer_nat=EDM)
    pp.set_candidates("observed", [OBSERVED], 0.0)
    pp.on_punch(0.0)
    out = pp.poll(0.0, 0.0, None)
    assert pp.counters["attempt_knock"] == 1 and "attempt_birthday" not in pp.counters
    assert [a for a in out if isinstance(a, SendPing) and a.technique == "knock"][0].via == 3
    assert OpenSockets(1) in out
    assert pp.birthday_role() == "easy"
