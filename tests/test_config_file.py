"""Config files for both programs (issue 15): keys from the parsers, values checked as flags are, flags override,
every mistake one line naming file, line and key; global flags on either side of the command; --version."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwg import cli as meshwg_cli
from meshwg import cli_config
from signal_server import cli as signal_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_default_files(monkeypatch, tmp_path):
    """A config file on the test machine's /etc never leaks into a test."""
    monkeypatch.setattr(meshwg_cli, "DEFAULT_CONFIG", str(tmp_path / "absent-meshwg.toml"))
    monkeypatch.setattr(signal_cli, "DEFAULT_CONFIG", str(tmp_path / "absent-signal.toml"))
    monkeypatch.delenv("MESHWG_INVITE", raising=False)


def write(tmp_path, text: str, name: str = "c.toml", mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def signal_args(*argv):
    return signal_cli.parse_args(list(argv), warn=pytest.fail)


def meshwg_args(*argv, warn=pytest.fail):
    return meshwg_cli.parse_args(list(argv), warn=warn)


SIGNAL = """\
db = "/srv/top.db"
log-level = "warning"

[serve]
relay-node-rate = 200
relay-node-pps = 50000
relay-total-rate = 0
listen = ["127.0.0.1:7300", "[::1]:7300"]
udp = "127.0.0.1:3478"
sync = "full"
stun-alt-port = "none"
init = true
heartbeat = 5

[relay]
db = "/srv/relay.db"
relay-node-rate = 300.5

[invite.create]
reusable = true
expires = "7d"
auto-approve-routes = ["10.0.0.0/24"]
"""


# --- values reach the arguments, flags override ---------------------------------------------------------------


def test_file_values_reach_the_server_configuration(tmp_path):
    path = write(tmp_path, SIGNAL)
    args = signal_args("--config", path, "serve")
    assert (args.db, args.log_level, args.init, args.sync) == ("/srv/top.db", "warning", True, "full")
    assert args.listen == ["127.0.0.1:7300", "[::1]:7300"] and args.udp == ["127.0.0.1:3478"]  # one value: one item
    cfg = signal_cli.server_config(args, control=True)
    # through the parser's own types: 200 -> 200.0 Mbit/s (float), "none" -> None (the alternate port's type)
    assert type(cfg.relay_node_rate) is float and cfg.relay_node_rate == 200.0 and cfg.relay_node_pps == 50000.0
    assert cfg.relay_total_rate == 0.0 and cfg.stun_alt_port is None and cfg.heartbeat == 5.0
    assert cfg.control == [("127.0.0.1", 7300), ("::1", 7300)] and cfg.synchronous == "FULL"
    relay = signal_args("--config", path, "relay")
    assert relay.db == "/srv/relay.db" and relay.relay_node_rate == 300.5  # the [relay] table over the top level
    inv = signal_args("--config", path, "invite", "create")
    assert (inv.reusable, inv.expires, inv.auto_approve_routes, inv.db) == (True, "7d", ["10.0.0.0/24"], "/srv/top.db")
    assert signal_args("--config", path, "nodes", "list").db == "/srv/top.db"  # shared keys serve every command


def test_flags_override_the_file_wherever_they_stand(tmp_path):
    path = write(tmp_path, SIGNAL)
    args = signal_args("--config", path, "serve", "--relay-node-rate", "50", "--listen", "0.0.0.0:7300", "--db", "x",
                       "--sync", "normal")
    assert (args.relay_node_rate, args.db, args.sync) == (50.0, "x", "normal")
    assert args.listen == ["0.0.0.0:7300"]  # replaced, not added to the file's list
    assert args.udp == ["127.0.0.1:3478"] and args.init is True  # what the command line left alone
    assert signal_args("--db", "a", "--config", path, "nodes", "list").db == "a"
    assert signal_args("--config", path, "invite", "--db", "b", "create").db == "b"
    assert signal_args("nodes", "list", "--config", path, "--db", "c").db == "c"
    # a flag given with the parser's default value still wins over the file
    assert signal_args("--config", path, "serve", "--sync", "normal").sync == "normal"


def test_meshwg_join_keys_flags_and_the_invite(tmp_path):
    path = write(tmp_path, """\
interface = "mesh1"
log-level = "info"
[join]
invite = "mwg1_fromfile"
name = "laptop"
listen-port = 51820
advertise-routes = "10.0.0.0/24,10.1.0.0/24"
advertise-exit-node = true
[set]
advertise-exit-node = "off"
""")
    args = meshwg_args("--config", path, "join")
    assert (args.invite, args.name, args.listen_port, args.interface) == ("mwg1_fromfile", "laptop", 51820, "mesh1")
    assert args.advertise_exit_node == "on" and args.log_level == "info"  # a store_const flag: true gives it
    assert meshwg_args("--config", path, "set").advertise_exit_node == "off"  # the same key, set's own kind
    assert meshwg_args("--config", path, "status").interface == "mesh1"
    over = meshwg_args("join", "--config", path, "-i", "x0", "--listen-port", "0", "--log-level", "debug")
    assert (over.interface, over.listen_port, over.log_level) == ("x0", 0, "debug")
    # an invite given one way on the command line (or in the environment) hides the file's: join refuses two
    assert meshwg_args("--config", path, "join", "--invite-file", "inv.txt").invite is None
    assert meshwg_args("--config", path, "join", "mwg1_cli").invite == "mwg1_cli"


def test_a_top_level_key_serves_each_command_by_its_own_type(tmp_path, capsys):
    # advertise-exit-node: a flag for join, on|off for set; at the top level a value goes to those it fits.
    flag = write(tmp_path, "advertise-exit-node = true\n", name="flag.toml")
    assert meshwg_args("--config", flag, "join").advertise_exit_node == "on"
    assert meshwg_args("--config", flag, "set").advertise_exit_node is None  # not an on|off: set's default
    word = write(tmp_path, 'advertise-exit-node = "off"\n', name="word.toml")
    assert meshwg_args("--config", word, "set").advertise_exit_node == "off"
    assert meshwg_args("--config", word, "join").advertise_exit_node is None
    bad = write(tmp_path, 'name = "x"\nadvertise-exit-node = ["on"]\n', name="bad.toml")
    assert meshwg_cli.main(["--config", bad, "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meshwg: {bad}:2: advertise-exit-node: fits none of its commands: ") and err.count("\n") == 1
    assert "join: expected true or false, not a list" in err and "set: expected one value, not a list" in err


def test_invite_from_the_environment_hides_the_files(tmp_path, monkeypatch):
    path = write(tmp_path, '[join]\ninvite = "mwg1_fromfile"\nname = "laptop"\n')
    assert meshwg_args("--config", path, "join").invite == "mwg1_fromfile"
    monkeypatch.setenv("MESHWG_INVITE", "mwg1_env")
    args = meshwg_args("--config", path, "join")
    assert args.invite is None and args.name == "laptop"  # join then reads $MESHWG_INVITE


def test_default_file_is_read_when_present_and_missing_is_fine(tmp_path, monkeypatch, capsys):
    assert signal_args("nodes", "list").config_file is None
    default = write(tmp_path, 'db = "/srv/default.db"\n', name="signal.toml")
    monkeypatch.setattr(signal_cli, "DEFAULT_CONFIG", default)
    assert signal_args("nodes", "list").db == "/srv/default.db"
    other = write(tmp_path, 'db = "/srv/other.db"\n', name="other.toml")
    assert signal_args("--config", other, "nodes", "list").db == "/srv/other.db"  # --config replaces the default


def test_global_flags_before_or_after_the_command(tmp_path):
    p = signal_cli.build_parser()
    for argv in (["--db", "X", "nodes", "list"], ["nodes", "list", "--db", "X"], ["nodes", "--db", "X", "list"],
                 ["--db", "X", "routes", "list"], ["plain", "--db", "X", "list"], ["--db", "X", "status"]):
        assert p.parse_args(argv).db == "X", argv
    assert p.parse_args(["--log-level", "debug", "serve"]).log_level == "debug"
    m = meshwg_cli.build_parser()
    for argv in (["--log-level", "debug", "status"], ["status", "--log-level", "debug"],
                 ["scenario", "run", "x", "--log-level", "debug"]):
        assert m.parse_args(argv).log_level == "debug", argv
    assert m.parse_args(["status"]).log_level == "warning"  # the copies after the command keep the default


@pytest.mark.parametrize("main, program", [(signal_cli.main, "meshwg-signal"), (meshwg_cli.main, "meshwg")])
def test_version(main, program, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"{program} {importlib.metadata.version('meshwg')}")
    assert out.count("\n") == 1


# --- one line naming the file, the line and the key -------------------------------------------------------------


ERRORS = [
    ("[serve]\nrelay-node-rat = 3\n", "{f}:2: [serve] unknown key 'relay-node-rat' (did you mean 'relay-node-rate'?)"),
    ("db = 'x'\n\n[srve]\nlisten = []\n", "{f}:3: unknown table 'srve' (did you mean 'serve'?)"),
    ("[serve]\n\nrelay-node-rate = true\n",
     "{f}:3: [serve] relay-node-rate: expected a string or a number, not a boolean"),
    ("[serve]\nrelay-node-rate = 0\n",
     "{f}:2: [serve] relay-node-rate: invalid value 0: expected a number above zero, not '0'"),
    ("[serve]\nsync = 'fast'\n", "{f}:2: [serve] sync: invalid value 'fast' (choose from 'normal', 'full')"),
    ("[serve]\nstun-alt-port = 70000\n", "{f}:2: [serve] stun-alt-port: invalid value 70000: port 70000 out of range"),
    ("[serve]\nlisten = [{a = 1}]\n", "{f}:2: [serve] listen: expected a string or a number, not a table"),
    ("[serve]\nheartbeat = [1, 2]\n", "{f}:2: [serve] heartbeat: expected one value, not a list"),
    ("# a comment\n[invite.create]\nreusable = 'yes'\n",
     "{f}:3: [invite.create] reusable: expected true or false, not a string"),
    ("relay-node-rate = 'fast'\n", "{f}:1: relay-node-rate: invalid value 'fast': expected a number, not 'fast'"),
    ("serve = 3\n", "{f}:1: [serve]: expected a table, not a whole number"),
    ("[nodes.list]\ncolour = 1\n", "{f}:2: [nodes.list] unknown key 'colour'"),
    ("[serve]\nlisten = \n", "{f}:2: not valid TOML: Invalid value (column 10)"),
    ("db = 'a'\ndb = 'b'\n", "{f}:2: not valid TOML: Cannot overwrite a value (column 9)"),
    ("[serve]\nname = \"bad\nline\"\n", "{f}:2: not valid TOML: Illegal character '\\n' (column 12)"),
]


@pytest.mark.parametrize("text, expected", ERRORS)
def test_each_mistake_is_one_line_naming_file_line_and_key(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    assert signal_cli.main(["--config", path, "status"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "meshwg-signal: " + expected.format(f=path) + "\n"


def test_meshwg_mistakes_and_a_missing_named_file(tmp_path, capsys):
    path = write(tmp_path, "[join]\nlisten-port = 'many'\n")
    assert meshwg_cli.main(["--config", path, "status"]) == 2
    assert capsys.readouterr().err == (f"meshwg: {path}:2: [join] listen-port: invalid value 'many': invalid int "
                                       "value: 'many'\n")
    path = write(tmp_path, "interface = 'not an interface!'\n")
    assert meshwg_cli.main(["--config", path, "genkey"]) == 2
    assert capsys.readouterr().err == (f"meshwg: {path}:1: interface: invalid value 'not an interface!': bad interface "
                                       "name 'not an interface!' (1-15 of a-z A-Z 0-9 _=+.-)\n")
    missing = str(tmp_path / "nope.toml")
    assert meshwg_cli.main(["--config", missing, "genkey"]) == 2
    assert capsys.readouterr().err == f"meshwg: {missing}: cannot read: no such file\n"
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"db = 'x'\n\xff\n")
    assert signal_cli.main(["--config", str(bad), "status"]) == 2
    assert capsys.readouterr().err == f"meshwg-signal: {bad}:2: not UTF-8 text\n"


def test_an_invite_readable_by_others_is_warned_about(tmp_path):
    warnings = []
    path = write(tmp_path, '[join]\ninvite = "mwg1_secret"\n', mode=0o644)
    meshwg_args("--config", path, "status", warn=warnings.append)
    assert warnings == [f"warning: {path} holds the invite and other users can read it (chmod 600 {path})"]
    warnings.clear()
    meshwg_args("--config", write(tmp_path, '[join]\ninvite = "mwg1_secret"\n', name="ok.toml"), "status",
                warn=warnings.append)
    meshwg_args("--config", write(tmp_path, 'name = "x"\n', name="plain.toml", mode=0o644), "status",
                warn=warnings.append)
    assert warnings == []  # mode 0600, or no secret in it


def test_keys_come_from_the_parser_itself():
    """Every kind of option a parser may grow becomes a key with its own conversion; required ones do not."""
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("c")
    c.add_argument("--on", action="store_true")
    c.add_argument("--off", action="store_false")
    c.add_argument("--verbose", "-v", action="count", default=0)
    c.add_argument("--tag", action="append", type=int)
    c.add_argument("--many", action="extend", nargs="+")
    c.add_argument("--pair", nargs=2, type=float)
    c.add_argument("--color", action=argparse.BooleanOptionalAction)
    c.add_argument("--must", required=True)
    c.add_argument("thing", nargs="?", choices=["a", "b"])
    cfg = cli_config.load(p, b"[c]\non = true\noff = true\nverbose = 2\ntag = [1, '2']\nmany = ['x', 'y']\n"
                             b"pair = [1, 2.5]\ncolor = false\nthing = 'b'\n", "t.toml")
    args = p.parse_args(["c", "--must", "m"])
    cli_config.apply(p, cfg, args, set())
    assert (args.on, args.off, args.verbose, args.tag, args.many) == (True, False, 2, [1, 2], ["x", "y"])
    assert (args.pair, args.color, args.thing) == ([1.0, 2.5], False, "b")
    for text, expected in ((b"[c]\nmust = 'x'\n", "t.toml:2: [c] unknown key 'must'"),
                           (b"[c]\npair = [1]\n", "t.toml:2: [c] pair: expected 2 items, not 1"),
                           (b"[c]\nthing = 'z'\n", "t.toml:2: [c] thing: invalid value 'z' (choose from 'a', 'b')"),
                           (b"[c]\nno-color = true\n", "t.toml:2: [c] unknown key 'no-color' (did you mean 'color'?)")):
        with pytest.raises(cli_config.ConfigError) as info:
            cli_config.load(p, text, "t.toml")
        assert str(info.value) == expected


@pytest.mark.parametrize("name, build", [("signal.toml", signal_cli.build_parser),
                                         ("meshwg.toml", meshwg_cli.build_parser)])
def test_shipped_examples_parse(name, build):
    path = ROOT / "examples" / name
    cfg = cli_config.load(build(), path.read_bytes(), str(path))
    assert cfg.tables[()] and not cfg.secrets  # the example keeps its invite in a file, commented out here


def test_shipped_examples_reach_the_arguments(monkeypatch):
    monkeypatch.setattr(signal_cli, "DEFAULT_CONFIG", str(ROOT / "examples" / "signal.toml"))
    args = signal_args("serve")
    assert (args.advertise, args.relay_node_rate, args.db) == ("vpn.example.org", 400.0,
                                                               "/var/lib/meshwg-signal/signal.db")
    monkeypatch.setattr(meshwg_cli, "DEFAULT_CONFIG", str(ROOT / "examples" / "meshwg.toml"))
    args = meshwg_args("join")
    assert (args.invite_file, args.name, args.listen_port) == ("/etc/meshwg/invite.txt", "laptop", 51820)


def test_the_readme_examples_parse():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Config files"):]
    blocks = [b.split("```", 1)[0] for b in section.split("```toml\n")[1:3]]
    assert "signal.toml" in blocks[0] and "meshwg.toml" in blocks[1]
    cli_config.load(signal_cli.build_parser(), blocks[0].encode(), "signal.toml")
    cli_config.load(meshwg_cli.build_parser(), blocks[1].encode(), "meshwg.toml")


# --- whatever the text, the one-line error or nothing -----------------------------------------------------------

_SIGNAL_PARSER = signal_cli.build_parser()
_MESHWG_PARSER = meshwg_cli.build_parser()
_KEYS = sorted({k for p in (_SIGNAL_PARSER, _MESHWG_PARSER) for n in cli_config._Node(p, ()).subtree() for k in n.keys})
_TABLES = ["serve", "relay", "join", "set", "invite", "invite.create", "nodes.list", "netcheck", "srve", "a.b.c"]

_toml_str = st.text(max_size=10).map(lambda t: json.dumps(t, ensure_ascii=False))  # a TOML basic string
_names = st.one_of(st.sampled_from(_KEYS), st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True), _toml_str)
_scalars = st.one_of(st.integers(min_value=-10**6, max_value=10**6).map(str),
                     st.floats(allow_nan=False).map(lambda f: "inf" if f == float("inf") else "-inf"
                                                    if f == float("-inf") else repr(f)),
                     st.sampled_from(["true", "false", "nan", "1979-05-27T07:32:00Z", "07:32:00", "{}", "{a = 1}",
                                      "'none'", "'auto'", "'0.0.0.0:7300'", "'10.0.0.0/24'", "'fast'", "'full'"]),
                     _toml_str)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
                       max_leaves=6)
_entries = st.dictionaries(_names, _values, max_size=4).map(lambda d: "".join(f"{k} = {v}\n" for k, v in d.items()))
_tables = st.dictionaries(st.sampled_from(_TABLES), _entries, max_size=3)
_toml = st.tuples(_entries, _tables).map(lambda e: e[0] + "".join(f"[{t}]\n{body}" for t, body in e[1].items()))
_junk = st.one_of(st.text(max_size=20), _entries, st.sampled_from(["[[serve]]", "[" * 600, "a = " + "[" * 3000, "# comment",
                                                          "n = " + "9" * 5000]))
_files = st.one_of(_toml, _toml,  # TOML mostly, to reach the checks past tomllib
                   st.lists(_junk, max_size=8).map("\n".join), st.text(max_size=200))


@settings(max_examples=300)
@given(_files, st.sampled_from([("serve",), ("relay",), ("invite", "create"), ("nodes", "list"), ("status",)]))
def test_any_text_gives_the_one_line_error_or_checked_values(text, command):
    for parser in (_SIGNAL_PARSER, _MESHWG_PARSER):
        try:
            cfg = cli_config.load(parser, text.encode("utf-8", "surrogatepass"), "f.toml")
        except cli_config.ConfigError as exc:
            msg = str(exc)
            assert msg.startswith("f.toml") and "\n" not in msg and "\r" not in msg
            continue
        if parser is _SIGNAL_PARSER:  # a file that passed applies without error
            args = parser.parse_args([*command, "--db", "x"])
            cli_config.apply(parser, cfg, args, {"db"})
            assert args.db == "x"
