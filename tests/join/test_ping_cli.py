"""`meshwg ping`'s command line and the agent side of the request (meshwg/io/agent/ping_shell.py), without a
network: lines, exit codes, --until-direct, and a reply for every request (an answer, a refusal or a timeout)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshwg import cli
from meshwg.commands import ping as P
from meshwg.disco import user_ping as UP
from meshwg.io.agent.ping_shell import UserPingServer
from meshwg.mesh import agent_core as A

DIRECT = {"peer": "laptop", "address": "100.64.0.2", "path": "direct", "endpoint": "203.0.113.7:41641",
          "rtt_ms": 1.3, "timeout": 5.0}
RELAY = dict(DIRECT, path="relay", endpoint=None, rtt_ms=4.1)
NONE = dict(DIRECT, path=None, endpoint=None, rtt_ms=None)


def test_lines():
    assert P.format_pong(DIRECT) == "pong from laptop (100.64.0.2) via 203.0.113.7:41641 in 1.3 ms"
    assert P.format_pong(RELAY) == "pong from laptop (100.64.0.2) via relay in 4.1 ms"
    assert P.format_pong(dict(DIRECT, rtt_ms=0.123)) == "pong from laptop (100.64.0.2) via 203.0.113.7:41641 in 0.12 ms"
    assert P.format_pong(NONE) == "no pong from laptop (100.64.0.2) within 5 s"


def run(monkeypatch, capsys, replies, *argv):
    asked = []

    def fake_query(args, req):
        asked.append(req)
        return replies[min(len(asked), len(replies)) - 1]
    monkeypatch.setattr(P, "_query", fake_query)
    monkeypatch.setattr(P.time, "sleep", lambda s: None)
    rc = cli.main(["ping", *argv, "-i", "meshwg9"])
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err, asked


def test_until_direct_stops_at_the_first_direct_pong(monkeypatch, capsys):
    rc, lines, err, asked = run(monkeypatch, capsys, [RELAY, RELAY, DIRECT], "--until-direct", "laptop")
    assert rc == 0 and len(lines) == 3 and len(asked) == 3 and lines[-1].endswith("via 203.0.113.7:41641 in 1.3 ms")
    assert asked[0] == {"op": "ping", "peer": "laptop", "timeout": 5.0}


def test_until_direct_without_one_exits_1(monkeypatch, capsys):
    rc, lines, err, asked = run(monkeypatch, capsys, [RELAY], "--until-direct", "-c", "4", "laptop")
    assert rc == 1 and len(lines) == 4 and err.strip() == "direct connection not established"


def test_default_is_ten_pings_and_exit_0_when_any_answered(monkeypatch, capsys):
    rc, lines, err, asked = run(monkeypatch, capsys, [NONE, RELAY, DIRECT], "laptop")
    assert rc == 0 and len(lines) == 10 and len(asked) == 10
    rc, lines, err, asked = run(monkeypatch, capsys, [NONE], "-c", "2", "laptop")
    assert rc == 1 and lines == ["no pong from laptop (100.64.0.2) within 5 s"] * 2


def test_an_error_is_one_line_and_exit_1(monkeypatch, capsys):
    rc, lines, err, asked = run(monkeypatch, capsys, [{"error": "no peer named or addressed 'x'"}], "x")
    assert rc == 1 and lines == [] and err == "meshwg: ping: no peer named or addressed 'x'\n" and len(asked) == 1


def test_no_agent_is_the_usual_one_line(tmp_path, monkeypatch, capsys):
    from meshwg.io.ipc import status_server
    monkeypatch.setattr(status_server, "RUN_DIR", str(tmp_path))
    assert cli.main(["ping", "-i", "meshwg9", "x"]) == 1
    assert capsys.readouterr().err == "meshwg: no meshwg agent is running on meshwg9 (start one with `meshwg join`)\n"


@pytest.mark.parametrize("argv", [["--timeout", "0"], ["--timeout", "11"], ["--timeout", "nan"], ["-c", "0"]])
def test_bad_numbers_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        cli.main(["ping", *argv, "x"])


# ---- the agent side ----------------------------------------------------------------------------
SENT = (b"k" * 32, "laptop", "100.64.0.2", 2)   # PingSent after its ref


async def serve_with(events, req):
    """UserPingServer.serve with a fake core step that yields `events` (a function of the ref)."""
    srv = UserPingServer()

    async def step(inp):
        assert isinstance(inp, A.UserPing)
        for ev in events(inp.ref):
            if isinstance(ev, UP.UserPingDone):
                srv.done(ev)
            else:
                srv.carry_out(ev)
    return await srv.serve(req, step), srv


def test_agent_reply_for_an_answer_a_refusal_and_a_bad_request():
    async def main():
        rep, srv = await serve_with(lambda r: [A.PingSent(r, *SENT), UP.UserPingDone(r, b"k" * 32,
                                                                                       ("203.0.113.7", 41641), 0.0013)],
                                    {"op": "ping", "peer": "laptop", "timeout": 5})
        assert rep["path"] == "direct" and rep["endpoint"] == "203.0.113.7:41641" and rep["rtt_ms"] == 1.3
        assert P.format_pong(rep) == "pong from laptop (100.64.0.2) via 203.0.113.7:41641 in 1.3 ms"
        assert srv._slots == {}
        rep, _ = await serve_with(lambda r: [A.PingRefused(r, "no peer named or addressed 'x'")],
                                  {"op": "ping", "peer": "x"})
        assert rep == {"error": "no peer named or addressed 'x'"}
        for bad in ({"op": "ping"}, {"op": "ping", "peer": "x", "timeout": "5"}, {"op": "ping", "peer": 3},
                    {"op": "ping", "peer": "x", "timeout": True}):
            rep, _ = await serve_with(lambda r: [], bad)
            assert "bad ping request" in rep["error"]
    trio.run(main)


def test_agent_reply_when_the_event_is_lost_comes_after_the_timeout_and_a_second():
    async def main():
        with trio.fail_after(10):
            t0 = trio.current_time()
            rep, srv = await serve_with(lambda r: [A.PingSent(r, *SENT)], {"op": "ping", "peer": "laptop",
                                                                               "timeout": 2})
            assert rep["path"] is None and trio.current_time() - t0 == pytest.approx(3.0)
            assert srv._slots == {}
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
