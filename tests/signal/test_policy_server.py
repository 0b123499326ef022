"""The access policy on a running server (issue 13, server side): three nodes' control connections record every
message the server sends them; a denied pair never hears of each other (in any message), an allowed pair gets
"accept" with the policy's ports; a changed file applies within 1 s and removes/reveals entries; a bad file keeps
the previous policy; SIGHUP reloads a file whose change the mtime check cannot see; punches and sealed messages
toward a hidden peer are refused; tags from invites and `nodes tag/untag` move peers in and out; `policy check`
prints who may reach whom, and a bad file is one line, exit 2 (also at `serve` start)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import msgpack
import trio
from plain_helpers import recording_node
from sig_helpers import new_key, start_server, wait_until
from test_plain_cli import run_cli

from meshwg.signaling import protocol as P
from meshwg.signaling.invite import join_hostport
from signal_server import cli
from signal_server.admin import create_invite
from signal_server.store import Store

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def write(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def heard_of(node, key: bytes) -> bool:
    """`key` anywhere in what the server sent `node` but the refusals echoing the key it asked for itself."""
    return any(key in msgpack.packb(m, use_bin_type=True) for m in node.messages
               if m.get("type") not in ("punch_fail", "seal_fail"))


def own(row) -> list:
    return [f"{row.ipv4}/32", f"{row.ipv6}/128"]


async def within_1s(pred) -> float:
    t0 = time.monotonic()
    await wait_until(pred, timeout=1.0)
    return time.monotonic() - t0


async def policy_mesh(nursery, tmp_path, text: str = "", **kw):
    """A server started with the policy `text` (empty: no rule, nobody sees anybody) and nodes a, b, c."""
    path = tmp_path / "policy.toml"
    write(path, text)
    h = await start_server(nursery, tmp_path, policy=str(path), **kw)
    inv = h.invite(reusable=True)
    nodes = {n: await recording_node(nursery, inv, n) for n in "abc"}
    rows = {r.name: r for r in h.admin.list_nodes()}
    return h, path, nodes, rows


AB_SSH = "[[rule]]\nfrom = ['a']\nto = ['b']\nports = ['tcp:22', 'tcp:2200-2299']\n"


async def test_denied_pairs_never_hear_of_each_other_and_reloads_apply_within_1s(nursery, tmp_path):
    h, path, nodes, rows = await policy_mesh(nursery, tmp_path)
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    await within_1s(lambda: all(h.server.directory.nodes[n.key].online for n in (a, b, c)))
    assert a.entries == b.entries == c.entries == {}  # no rule: nobody

    write(path, AB_SSH)
    took = await within_1s(lambda: a.key in b.entries and b.key in a.entries)
    assert b.entries[a.key]["accept"] == [[6, 22, 22, own(rows["b"])[0]], [6, 22, 22, own(rows["b"])[1]],
                                          [6, 2200, 2299, own(rows["b"])[0]], [6, 2200, 2299, own(rows["b"])[1]]]
    assert a.entries[b.key]["accept"] == []  # b may open nothing towards a
    assert c.entries == {} and c.key not in a.entries and c.key not in b.entries
    print(f"policy reload reached both nodes in {took * 1000:.0f} ms")

    # A punch towards a peer it cannot see is refused as if the peer did not exist, and so is a sealed message.
    await c.conn.send({"type": P.T_PUNCH_REQUEST, "peer": a.key})
    await c.conn.send({"type": P.T_SEAL_SEND, "to": b.key, "blob": b"hello"})
    await wait_until(lambda: {m.get("type") for m in c.messages} >= {"punch_fail", "seal_fail"})
    assert [m["reason"] for m in c.messages if m.get("type") in ("punch_fail", "seal_fail")] == ["unknown_peer"] * 2
    assert not any(m.get("type") in (P.T_SEALED, "punch") for m in a.messages + b.messages)

    # The policy changes: a may reach c now, not b. b loses a, a loses b and gains c, c gains a.
    write(path, "[[rule]]\nfrom = ['a']\nto = ['c']\nports = ['udp:53']\n")
    await within_1s(lambda: b.key not in a.entries and a.key not in b.entries and c.key in a.entries
                    and a.key in c.entries)
    assert c.entries[a.key]["accept"] == [[17, 53, 53, own(rows["c"])[0]], [17, 53, 53, own(rows["c"])[1]]]
    # b and c never saw each other's key, in any message since they connected.
    assert not heard_of(b, c.key) and not heard_of(c, b.key)

    # A bad file: one log line, the previous policy stays.
    errors = h.server.counters["policy_reload_errors"]
    write(path, "[[rule]]\nfrom = ['a']\nto = ['nobody']\n")
    await wait_until(lambda: h.server.counters["policy_reload_errors"] == errors + 1)
    await c.conn.send({"type": P.T_PUNCH_REQUEST, "peer": a.key})  # still allowed: a punch goes through
    await wait_until(lambda: any(m.get("type") == "punch" for m in c.messages))
    # ... carrying a's entry as c's directory has it, accept list included (none would read as "no policy")
    punched = [P.unpack_entry_untrusted(m["peer"]) for m in c.messages if m.get("type") == "punch"][0]
    assert punched["accept"] == c.entries[a.key]["accept"]
    assert c.key in a.entries and a.key not in b.entries

    # Fixed: applies; everything allowed in one rule shows every pair, with any-protocol accept lists.
    write(path, "[[rule]]\nfrom = ['*']\nto = ['*']\n")
    await within_1s(lambda: b.key in c.entries and c.key in b.entries and b.key in a.entries)
    assert c.entries[b.key]["accept"] == [[0, 0, 65535, own(rows["c"])[0]], [0, 0, 65535, own(rows["c"])[1]]]


async def test_tags_from_invites_and_the_cli_move_peers_in_and_out(nursery, tmp_path, capsys):
    path = tmp_path / "policy.toml"
    write(path, "")
    h = await start_server(nursery, tmp_path, policy=str(path))
    ops = h.invite(reusable=True, tag="ops")
    plain = h.invite(reusable=True)
    a = await recording_node(nursery, ops, "a")
    b = await recording_node(nursery, plain, "b")
    c = await recording_node(nursery, plain, "c")
    assert h.admin.get_node(a.key).tags == ("ops",)
    # its own tags are in its welcome (for `meshwg status`); none: no field
    assert h.server.control_listener._welcome(h.server.sessions[a.key])["tags"] == ["ops"]
    assert "tags" not in h.server.control_listener._welcome(h.server.sessions[b.key])
    write(path, "[[rule]]\nfrom = ['tag:ops']\nto = ['tag:web']\nports = ['tcp:443']\n")
    await wait_until(lambda: h.server.counters["policy_reload_errors"] == 1)  # no node nor invite has tag web...
    h.invite(tag="web")
    os.utime(path)  # ...until an invite gives it
    await wait_until(lambda: h.server.counters["policy_loads"] >= 2)
    assert a.entries == b.entries == c.entries == {}  # no node is web yet

    code, out, err = await run_cli(capsys, h, "nodes", "tag", "b", "web", "blue")
    assert code == 0 and "b: tags web,blue" in out, err
    await within_1s(lambda: a.key in b.entries and b.key in a.entries)
    assert b.entries[a.key]["accept"][0][:3] == [6, 443, 443] and a.entries[b.key]["tags"] == ["web", "blue"]
    assert c.entries == {}
    code, out, _ = await run_cli(capsys, h, "nodes", "list")
    line = next(ln for ln in out.splitlines() if " b " in ln)
    assert line.split()[-2] == "web,blue" and next(ln for ln in out.splitlines() if " a " in ln).split()[-2] == "ops"
    assert out.splitlines()[0].split()[-2:] == ["TAGS", "ROUTES"]

    code, out, _ = await run_cli(capsys, h, "nodes", "untag", "b", "web")
    assert code == 0 and "b: tags blue" in out
    await within_1s(lambda: a.key not in b.entries and b.key not in a.entries)
    assert not heard_of(c, a.key) and not heard_of(c, b.key)

    code, out, err = await run_cli(capsys, h, "nodes", "tag", "b", "Not A Tag")
    assert code == 2 and out == "" and err.count("\n") == 1 and "bad tag 'Not A Tag'" in err
    assert h.admin.get_node(b.key).tags == ("blue",)
    code, _, err = await run_cli(capsys, h, "invite", "create", "--tag", "x y")
    assert code == 2 and "bad tag 'x y'" in err


async def test_policy_check_prints_who_may_reach_whom_and_one_line_errors(nursery, tmp_path, capsys):
    h, path, nodes, rows = await policy_mesh(nursery, tmp_path)
    good = tmp_path / "good.toml"
    write(good, "[groups]\nfront = ['a', 'b']\n\n[[rule]]\nfrom = ['group:front']\nto = ['c']\nports = ['tcp:80']\n"
                "\n[[rule]]\nfrom = ['c']\nto = ['a']\n")
    code, out, err = await run_cli(capsys, h, "policy", "check", str(good))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{good}: ok, 2 rules; 3 nodes, 0 plain peers"
    assert lines[-3:] == ["a  - . x", "b  . - x", "c  x . -"]
    assert h.server.directory.acl.pf.rules == ()  # nothing applied: the server's file is the empty one

    bad = tmp_path / "bad.toml"
    write(bad, "[[rule]]\nfrom = ['a']\nto = ['c']\n\n[[rule]]\nfrom = ['a']\nto = ['c']\nports = ['tcp:99999']\n")
    code, out, err = await run_cli(capsys, h, "policy", "check", str(bad))
    assert code == 2 and out == "" and err == f"meshwg-signal: {bad}:5: bad port 'tcp:99999' (a port or a range " \
                                               "lo-hi within 0-65535)\n"
    code, _, err = await run_cli(capsys, h, "policy", "check", str(tmp_path / "missing.toml"))
    assert code == 2 and err.count("\n") == 1 and "missing.toml: cannot read" in err

    # serve with a bad policy: a fatal one-line error before anything listens
    code, out, err = await run_cli(capsys, h, "serve", "--listen", f"127.0.0.1:{free_port()}", "--udp", "none", "--relay-tcp",
                                   "none", "--plain-udp", "none", "--policy", str(bad))
    assert code == 2 and err.strip().endswith(f"{bad}:5: bad port 'tcp:99999' (a port or a range lo-hi within "
                                              "0-65535)") and "Traceback" not in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sighup_reloads_a_change_the_mtime_check_cannot_see(nursery, tmp_path):
    db, path = str(tmp_path / "signal.db"), tmp_path / "policy.toml"
    write(path, "")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "signal_server", "serve", "--init", "--db", db, "--listen",
                             f"127.0.0.1:{port}", "--udp", "none", "--relay-tcp", "none", "--plain-udp", "none",
                             "--policy", str(path), "--log-level", "info"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        with trio.fail_after(15):
            while b"serving:" not in (tmp_path / "serve.log").read_bytes():
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                await trio.sleep(0.05)
        admin = Store(db)
        inv = create_invite(admin, wall=time.time(), reusable=True, addrs=[join_hostport("127.0.0.1", port)])
        a = await recording_node(nursery, inv, "a", new_key())
        b = await recording_node(nursery, inv, "b", new_key())
        write(path, "[[rule]]\nfrom = ['a']\nto = ['b']\nports = ['tcp:22']\n")
        await within_1s(lambda: a.key in b.entries)
        assert b.entries[a.key]["accept"][0][:3] == [6, 22, 22]
        # Same size, same inode, the old mtime put back: only SIGHUP can tell.
        st = os.stat(path)
        with open(path, "r+") as f:
            f.write("[[rule]]\nfrom = ['a']\nto = ['b']\nports = ['tcp:23']\n")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        await trio.sleep(0.5)  # five mtime checks of the server: none sees it
        assert b.entries[a.key]["accept"][0][:3] == [6, 22, 22]
        proc.send_signal(signal.SIGHUP)
        await within_1s(lambda: b.entries[a.key]["accept"][0][:3] == [6, 23, 23])
        assert proc.poll() is None
        admin.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def test_serve_cli_passes_the_policy_file(tmp_path):
    args = cli.build_parser().parse_args(["serve", "--policy", "/etc/p.toml"])
    args.db = "x"
    assert cli.server_config(args, True).policy == "/etc/p.toml"


async def test_plain_peers_fall_under_the_policy_and_the_ingress_targets_follow(nursery, tmp_path, capsys):
    h, path, nodes, rows = await policy_mesh(nursery, tmp_path, plain_udp=("127.0.0.1", 0))
    a, b = nodes["a"], nodes["b"]
    code, _, err = await run_cli(capsys, h, "plain", "add", "phone", "--to", "a", "--to", "b", "--tag", "family")
    assert code == 0, err
    [phone] = h.admin.list_plain()
    assert phone.tags == ("family",)
    code, out, _ = await run_cli(capsys, h, "plain", "list")
    assert out.splitlines()[1].endswith(" family")
    await wait_until(lambda: h.server.directory.plain)
    assert not h.server.plain.targets  # no rule: the plain port routes to nobody
    write(path, "[[rule]]\nfrom = ['tag:family']\nto = ['a']\nports = ['tcp:22']\n")
    await within_1s(lambda: phone.key in a.entries and set(h.server.plain.targets) == {a.key})
    assert a.entries[phone.key]["accept"] == [[6, 22, 22, own(rows["a"])[0]], [6, 22, 22, own(rows["a"])[1]]]
    assert a.entries[phone.key]["tags"] == ["family"] and not heard_of(b, phone.key)
    write(path, "[[rule]]\nfrom = ['b']\nto = ['phone']\n")  # b may reach it: b sees it, the ingress has no target
    await within_1s(lambda: phone.key in b.entries and phone.key not in a.entries and not h.server.plain.targets)
    assert b.entries[phone.key]["accept"] == []


async def test_a_name_the_policy_uses_is_not_handed_to_the_next_node_asking_for_it(nursery, tmp_path):
    # Review finding: rule rights follow names; after `a` is removed (the policy still names it), anyone with an
    # invite joining as "a" must not inherit a's rights or visibility. An administrator's rename still gives it.
    h, path, nodes, rows = await policy_mesh(nursery, tmp_path)
    write(path, AB_SSH)
    b = nodes["b"]
    await within_1s(lambda: nodes["a"].key in b.entries)
    h.admin.remove(rows["a"].node_id, time.time())
    await within_1s(lambda: nodes["a"].key not in b.entries)
    newcomer = await recording_node(nursery, h.invite(reusable=True), "a")
    await within_1s(lambda: h.server.directory.nodes.get(newcomer.key) is not None
                    and h.server.directory.nodes[newcomer.key].online)
    assert h.admin.get_node(newcomer.key).name == "a-2"
    await trio.sleep(0.3)  # a change feed poll or three: nothing reaches b
    assert newcomer.key not in b.entries and not heard_of(b, newcomer.key)
