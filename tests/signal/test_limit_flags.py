"""The flood limits are operator settings: `serve`/`relay` flags reach the server's configuration, and a
nonsensical value is refused by the parser with the flag named."""

from __future__ import annotations

import pytest

from signal_server.cli import build_parser, server_config


def _cfg(*argv: str, control: bool = True):
    args = build_parser().parse_args(["serve" if control else "relay", "--db", "/nonexistent/x.db", *argv])
    return server_config(args, control)


def test_defaults_match_the_documented_limits():
    cfg = _cfg()
    assert (cfg.max_unauthenticated, cfg.max_unauthenticated_per_source) == (512, 16)
    assert (cfg.accept_rate, cfg.accept_burst) == (10.0, 40.0)
    assert cfg.relay_tcp_max is None and cfg.relay_tcp_max_per_source is None  # from the descriptor limit


def test_flags_reach_the_configuration():
    cfg = _cfg("--max-unauthenticated", "2000", "--max-unauthenticated-per-source", "300", "--accept-rate", "50",
               "--relay-tcp-max", "900", "--relay-tcp-max-per-source", "30")
    assert (cfg.max_unauthenticated, cfg.max_unauthenticated_per_source) == (2000, 300)
    assert (cfg.accept_rate, cfg.accept_burst) == (50.0, 200.0)
    assert (cfg.relay_tcp_max, cfg.relay_tcp_max_per_source) == (900, 30)
    relay = _cfg("--accept-rate", "5", "--relay-tcp-max", "100", control=False)
    assert not relay.control_enabled and relay.accept_rate == 5.0 and relay.relay_tcp_max == 100


@pytest.mark.parametrize("argv", [["--accept-rate", "0"], ["--accept-rate", "nan"], ["--accept-rate", "inf"],
                                  ["--max-unauthenticated-per-source", "0"], ["--relay-tcp-max", "-3"],
                                  ["--relay-tcp-max", "many"], ["--heartbeat", "nan"], ["--heartbeat", "0"]])
def test_nonsense_is_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _cfg(*argv)
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err
