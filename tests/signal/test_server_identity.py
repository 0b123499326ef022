"""The server's database: its identity is created only by `serve --init`, its files are 0600, admin
commands never create one, backup/restore keep what is still in the WAL, a corrupt file is one line,
and a full address pool refuses the join with a code the node stops on."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest
import trio
from sig_helpers import new_key, start_server

from meshwg.control import ControlClient, ControlConnection, JoinRefusedError
from signal_server import cli
from signal_server.server import ServerConfig, SignalServer
from signal_server.store import NoIdentity, Store, StoreError

PY = sys.executable


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(db: str, *extra: str) -> subprocess.CompletedProcess:
    """`meshwg-signal serve` that is expected to exit by itself (bounded: a server that runs is a failure)."""
    argv = [PY, "-m", "signal_server", "serve", "--db", db, "--listen", f"127.0.0.1:{free_port()}",
            "--udp", "none", "--relay-tcp", "none", "--plain-udp", "none", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


def one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


async def test_db_wal_and_shm_are_0600(nursery, tmp_path, umask022):
    h = await start_server(nursery, tmp_path)
    h.invite()  # a write through a second connection: the -wal and -shm files exist now
    for suffix in ("", "-wal", "-shm"):
        assert mode(h.db + suffix) == 0o600, suffix
    h.admin.close()


def test_wider_modes_of_an_existing_db_are_warned_about(tmp_path, caplog):
    db = str(tmp_path / "signal.db")
    Store(db, init=True).close()
    os.chmod(db, 0o644)
    with caplog.at_level(logging.INFO, logger="signal"):
        server = SignalServer(ServerConfig(db=db))
    server.store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(db in w and "0644" in w for w in warnings), warnings
    # the fingerprint (base64 public key) is logged at start
    from meshwg.config.keys import key_to_base64

    assert any(key_to_base64(server.server_pk) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("empty", [False, True])
def test_serve_without_init_needs_an_identity_and_creates_nothing(tmp_path, empty):
    db = tmp_path / "signal.db"
    if empty:
        db.write_bytes(b"")
    r = serve(str(db))
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert str(db) in line and "--init" in line
    assert sorted(os.listdir(tmp_path)) == (["signal.db"] if empty else [])
    if empty:
        assert db.stat().st_size == 0


def test_init_on_an_existing_identity_serves_it(tmp_path):
    db = str(tmp_path / "signal.db")
    st = Store(db, init=True)
    key = st.server_private_key()
    st.close()
    again = Store(db, init=True)
    assert again.server_private_key() == key and not again.created_identity
    again.close()


@pytest.mark.parametrize("argv", [["invite", "list"], ["invite", "create", "--addr", "127.0.0.1:7300"],
                                  ["invite", "revoke", "abcd"], ["nodes"], ["nodes", "remove", "x"], ["status"],
                                  ["pubkey"], ["backup", "OUT"]])
def test_admin_commands_never_create_a_database(tmp_path, capsys, argv):
    db = str(tmp_path / "nowhere.db")
    argv = [a.replace("OUT", str(tmp_path / "copy.db")) for a in argv]
    assert cli.main([*argv, "--db", db]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert db in line
    assert os.listdir(tmp_path) == []


def test_default_db_path_is_absolute():
    assert os.path.isabs(cli.DEFAULT_DB) or "MESHWG_SIGNAL_DB" in os.environ


def _join(st: Store, wall: float, prefix4, prefix6) -> None:
    from signal_server.admin import create_invite

    inv = create_invite(st, wall=wall, addrs=["127.0.0.1:7300"], reusable=True)
    st.join(new_key(), inv.invite_id, inv.secret, "kept", wall, prefix4, prefix6)


def test_backup_and_restore_keep_data_that_is_only_in_the_wal(tmp_path, capsys, umask022):
    db, out, restored = (str(tmp_path / n) for n in ("signal.db", "backup.db", "restored.db"))
    st = Store(db, init=True)
    p4, p6 = st.prefixes(os.urandom)
    _join(st, time.time(), p4, p6)
    # Precondition: the data is in the -wal only, so a copy of the main file has none of it.
    shutil.copy(db, str(tmp_path / "naive.db"))
    with pytest.raises(NoIdentity):
        Store(str(tmp_path / "naive.db"))
    assert cli.main(["backup", out, "--db", db]) == 0
    assert mode(out) == 0o600
    assert cli.main(["restore", out, "--db", restored]) == 0
    assert mode(restored) == 0o600
    assert not os.path.exists(out + "-wal")  # the backup is one self-contained file
    copy = Store(restored)
    assert copy.server_private_key() == st.server_private_key()
    assert [n.name for n in copy.list_nodes()] == ["kept"]
    copy.close()
    # restore never overwrites a database (or a stale -wal that SQLite would replay into it)
    capsys.readouterr()
    assert cli.main(["restore", out, "--db", db]) == 1
    assert "exists" in one_line_error(capsys.readouterr().err)
    assert [n.name for n in st.list_nodes()] == ["kept"]
    st.close()


def test_corrupt_header_is_one_line(tmp_path):
    db = tmp_path / "signal.db"
    db.write_bytes(b"this is not SQLite at all " * 200)
    for extra in ((), ("--init",)):
        r = serve(str(db), *extra)
        assert r.returncode == 1
        line = one_line_error(r.stderr)
        assert str(db) in line and "not a database" in line
    r = subprocess.run([PY, "-m", "signal_server", "nodes", "--db", str(db)], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 1 and "not a database" in one_line_error(r.stderr)
    with pytest.raises(StoreError):
        SignalServer(ServerConfig(db=str(db), init=True))


async def test_full_pool_refuses_the_join_and_the_node_stops(nursery, tmp_path, caplog):
    h = await start_server(nursery, tmp_path, prefix4="10.99.0.0/30")  # 2 usable addresses
    for _ in range(2):
        conn = await ControlConnection.open(h.invite(), new_key())
        await conn.aclose()
    with pytest.raises(JoinRefusedError) as info:
        await ControlConnection.open(h.invite(), new_key())
    assert info.value.code == "pool_full" and "10.99.0.0/30" in info.value.message
    # The reconnecting client (what the agent runs) stops on it instead of retrying forever.
    client = ControlClient(h.invite(), new_key(), backoff_initial=0.05, backoff_max=0.1)
    with trio.fail_after(5), pytest.raises(JoinRefusedError):
        await client.run()
    assert h.server.counters["join_refused_pool_full"] == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    h.admin.close()
