"""One log format for meshwg, meshwg-signal and meshwg-tun (issue 15): UTC ISO 8601 text lines or JSON lines,
addresses as host:port, and path changes at INFO only when the kind changes (relay <-> direct)."""

from __future__ import annotations

import io
import json
import logging
import sys
from types import SimpleNamespace

import pytest

from meshwg import cli, logfmt
from meshwg.io.agent.mesh_shell import MeshDevice
from meshwg.mesh import node as N
from signal_server import cli as signal_cli

# 2026-12-05T03:40:00.125Z (.125: exact in binary, so the milliseconds do not depend on rounding)
WHEN = 1796442000.125
ALICE = bytes(range(32))   # base64 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
BOB = bytes(range(1, 33))


def record(msg="peer %s: up", args=("alice",), level=logging.INFO, exc_info=None) -> logging.LogRecord:
    r = logging.LogRecord("meshwg.agent", level, __file__, 1, msg, args, exc_info)
    r.created = WHEN
    return r


def test_text_line():
    assert logfmt.TextFormatter().format(record()) == "2026-12-05T03:40:00.125Z INFO meshwg.agent: peer alice: up"


def test_json_line():
    line = logfmt.JsonFormatter().format(record(level=logging.WARNING))
    assert line == ('{"ts": "2026-12-05T03:40:00.125Z", "level": "WARNING", "logger": "meshwg.agent", '
                    '"msg": "peer alice: up"}')


def _exc_info():
    try:
        raise ValueError("bad packet")
    except ValueError:
        return sys.exc_info()


def test_exception_text_in_both_formats():
    r = record(msg="failed", args=(), level=logging.ERROR, exc_info=_exc_info())
    text = logfmt.TextFormatter().format(r).splitlines()
    assert text[0] == "2026-12-05T03:40:00.125Z ERROR meshwg.agent: failed"
    assert text[1] == "Traceback (most recent call last):" and text[-1] == "ValueError: bad packet"
    obj = json.loads(logfmt.JsonFormatter().format(r))
    assert obj["msg"] == "failed" and obj["exc"].endswith("ValueError: bad packet")
    assert "\n" not in logfmt.JsonFormatter().format(r)   # one object per line


def test_timestamp_reads_back():
    assert logfmt.parse_timestamp("2026-12-05T03:40:00.125Z") == WHEN


@pytest.mark.parametrize("addr, text", [
    (("198.51.100.30", 46598), "198.51.100.30:46598"),
    (("2001:db8::1", 41641, 0, 0), "[2001:db8::1]:41641"),
    ("relay.example.net:3478", "relay.example.net:3478"),
    (None, "-"),
])
def test_format_addr(addr, text):
    assert logfmt.format_addr(addr) == text


def test_format_endpoint():
    assert logfmt.format_endpoint(("198.51.100.30", 46598)) == "198.51.100.30:46598"
    assert logfmt.format_endpoint(N.RelayEndpoint(ALICE), ("udp", ("203.0.113.1", 3478))) == "relay 203.0.113.1:3478/UDP"
    assert logfmt.format_endpoint(N.RelayEndpoint(ALICE), ("tcp", ("2001:db8::5", 443))) == "relay [2001:db8::5]:443/TCP"
    assert logfmt.format_endpoint(N.RelayEndpoint(ALICE)) == "relay"
    assert logfmt.format_endpoint(N.SocketEndpoint(3, ("198.51.100.30", 1024))) == "198.51.100.30:1024 (socket 3)"


def test_peer_label():
    assert logfmt.peer_label("alice", ALICE) == "alice"
    assert logfmt.peer_label("", ALICE) == "AAECAwQF"


# --- the agent's path-change line ------------------------------------------------------------------------------

def _device() -> MeshDevice:
    """A MeshDevice with only what the path-change log reads (the real one opens a TUN)."""
    dev = MeshDevice.__new__(MeshDevice)
    dev.node = SimpleNamespace(specs={ALICE: SimpleNamespace(name="alice"), BOB: SimpleNamespace(name="")},
                               paths={ALICE: None, BOB: None})
    dev.relay = SimpleNamespace(mode="udp", relay_addr=("203.0.113.1", 3478), tcp_addrs=(("203.0.113.1", 443),),
                                refresh=lambda: None, forget_endpoints=lambda: None)
    dev._path_kind = {}
    dev.on_news = None
    return dev


def _changes(caplog, dev, *endpoints, key=ALICE):
    caplog.clear()
    for ep in endpoints:
        dev._on_event(N.PathChanged(key, ep, None, "why"))
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meshwg.mesh"]


def test_path_change_within_a_kind_is_debug_across_kinds_info(caplog):
    caplog.set_level(logging.DEBUG, logger="meshwg.mesh")
    dev = _device()
    relay = N.RelayEndpoint(ALICE)
    assert _changes(caplog, dev, relay, ("198.51.100.30", 46598), ("198.51.100.30", 50000), relay) == [
        (logging.INFO, "peer alice: path -> relay 203.0.113.1:3478/UDP (why)"),
        (logging.INFO, "peer alice: path -> 198.51.100.30:46598 (why)"),
        (logging.DEBUG, "peer alice: path -> 198.51.100.30:50000 (why)"),
        (logging.INFO, "peer alice: path -> relay 203.0.113.1:3478/UDP (why)"),
    ]
    dev.relay.mode = "tcp"
    assert _changes(caplog, dev, N.RelayEndpoint(BOB), N.SocketEndpoint(2, ("2001:db8::7", 9)), key=BOB) == [
        (logging.INFO, "peer AQIDBAUG: path -> relay 203.0.113.1:443/TCP (why)"),
        (logging.INFO, "peer AQIDBAUG: path -> [2001:db8::7]:9 (socket 2) (why)"),
    ]


def test_path_kinds_of_removed_peers_are_forgotten(caplog):
    caplog.set_level(logging.DEBUG, logger="meshwg.mesh")
    dev = _device()
    _changes(caplog, dev, ("198.51.100.30", 46598))
    del dev.node.paths[ALICE]
    dev._on_event(N.PeersChanged(()))
    assert dev._path_kind == {}


# --- --log-format reaches the handler --------------------------------------------------------------------------

def bare_root(monkeypatch) -> None:
    """The root logger as a fresh process has it: pytest's capture handlers set aside until the test ends
    (called in the test body: pytest adds the call phase's handlers after the fixtures ran)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)


def test_meshwg_log_format_json_reaches_the_handler(monkeypatch, capsys):
    bare_root(monkeypatch)
    parse = cli.parse_args

    def parse_and_log(argv):
        args = parse(argv)
        args.run = lambda a: logging.getLogger("meshwg.agent").info("peer %s: up", "alice")
        return args

    monkeypatch.setattr(cli, "parse_args", parse_and_log)
    assert cli.main(["status", "--log-format", "json", "--log-level", "info"]) == 0
    line = capsys.readouterr().err.strip()
    obj = json.loads(line)
    assert (obj["level"], obj["logger"], obj["msg"]) == ("INFO", "meshwg.agent", "peer alice: up")
    logfmt.parse_timestamp(obj["ts"])


def test_meshwg_signal_log_format_json_reaches_the_handler(monkeypatch, capsys, tmp_path):
    bare_root(monkeypatch)
    monkeypatch.setattr(signal_cli, "_dispatch",
                        lambda args: logging.getLogger("signal").warning("node %s joined", "alice") or 0)
    assert signal_cli.main(["--log-format", "json", "--db", str(tmp_path / "s.db"), "nodes", "list"]) == 0
    obj = json.loads(capsys.readouterr().err.strip())
    assert (obj["level"], obj["logger"], obj["msg"]) == ("WARNING", "signal", "node alice joined")


def test_text_is_the_default(monkeypatch, capsys):
    bare_root(monkeypatch)
    monkeypatch.setattr(signal_cli, "_dispatch", lambda args: logging.getLogger("signal").warning("hello") or 0)
    assert signal_cli.main(["nodes", "list"]) == 0
    err = capsys.readouterr().err
    assert err.endswith(" WARNING signal: hello\n")
    logfmt.parse_timestamp(err.split(" ", 1)[0])


def test_setup_leaves_a_configured_root_alone():
    """As logging.basicConfig: a test's capture (or an embedding program's handlers) stay in charge."""
    root = logging.getLogger()
    before = list(root.handlers)
    assert logfmt.setup("info", "json", stream=io.StringIO()) is None
    assert root.handlers == before


def test_meshwg_up_gives_the_daemon_its_log_flags_over_the_environment():
    from meshwg.commands.device import daemon_env

    env = daemon_env({"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "verbose"}, "error", "json")
    assert env["LOG_LEVEL"] == "error" and env["MESHWG_LOG_FORMAT"] == "json" and "WG_PROCESS_FOREGROUND" not in env
    # the CLI's defaults leave what the caller's environment says
    env = daemon_env({"LOG_LEVEL": "verbose", "MESHWG_LOG_FORMAT": "json"}, "warning", "text")
    assert env["LOG_LEVEL"] == "verbose" and env["MESHWG_LOG_FORMAT"] == "json"
    assert daemon_env({}, "warning", "text") == {"LOG_LEVEL": "warning", "MESHWG_LOG_FORMAT": "text"}
