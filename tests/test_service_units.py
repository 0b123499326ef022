"""The systemd units (meshwg/service_units.py) and `meshwg service` / `meshwg-signal service` install|uninstall
(meshwg/commands/service.py): Type=notify, ExecStart that runs this installation, hardening that keeps what the
agent does (TUN, netlink, /proc/sys/net), files and modes, systemctl only where systemd runs, and
`systemd-analyze verify` on the units as installed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshwg import service_units as U
from meshwg.commands import service as S
from conftest import require_real_components

REPO = str(Path(__file__).resolve().parents[1])
ENV = dict(os.environ, PYTHONPATH=REPO)


def _keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def _invite() -> str:
    from meshwg.signaling.invite import Invite

    return Invite(("127.0.0.1:7300",), bytes(range(32)), "abcd", b"s" * 16).encode()


def _cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=60, input=input)


def test_agent_unit_is_notify_and_keeps_tun_routes_and_sysctls():
    k = _keys(U.agent_unit(["/opt/mw/bin/meshwg"], "/etc/meshwg/meshwg.toml"))
    assert k["Type"] == ["notify"] and k["Restart"] == ["on-failure"] and k["RestartSec"] == ["5"]
    assert k["ExecStart"] == ["/opt/mw/bin/meshwg --config /etc/meshwg/meshwg.toml join"]
    assert k["StateDirectory"] == ["meshwg"] and k["RuntimeDirectory"] == ["wireguard"]
    for key, value in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("LockPersonality", "yes"), ("DeviceAllow", "/dev/net/tun rw")]:
        assert k[key] == [value], key
    assert set(k["CapabilityBoundingSet"][0].split()) >= {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(k["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}
    # What the agent does must stay possible: /proc/sys/net writes (forwarding), /dev/net/tun.
    assert "ProtectKernelTunables" not in k and "PrivateDevices" not in k
    assert "PrivateNetwork" not in k and "IPAddressDeny" not in k


def test_server_unit_is_notify_with_its_database_writable():
    k = _keys(U.server_unit(["/opt/mw/bin/meshwg-signal"], "/etc/meshwg/signal.toml"))
    assert k["Type"] == ["notify"] and k["Restart"] == ["on-failure"]
    assert k["ExecStart"] == ["/opt/mw/bin/meshwg-signal --config /etc/meshwg/signal.toml serve"]
    assert k["StateDirectory"] == ["meshwg-signal"] and k["ProtectSystem"] == ["strict"]
    assert "CAP_NET_BIND_SERVICE" in k["CapabilityBoundingSet"][0]
    assert "CAP_NET_ADMIN" not in k["CapabilityBoundingSet"][0]   # the server configures nothing
    other = _keys(U.server_unit(["/x"], "/c.toml", db="/srv/mesh/signal.db"))
    assert other["ReadWritePaths"] == ["/srv/mesh"] and "StateDirectory" not in other


def test_exec_words_are_quoted_for_systemd():
    assert U.exec_line(["/opt/my dir/meshwg", "--config", "/etc/50%/a$b.toml"]) == \
        '"/opt/my dir/meshwg" --config /etc/50%%/a$$b.toml'


def test_install_writes_unit_config_and_invite_with_their_modes(tmp_path):
    inv = tmp_path / "inv.txt"
    inv.write_text(_invite())
    cfg = tmp_path / "etc" / "meshwg.toml"
    res = _cli("meshwg", "service", "install", "--unit-dir", str(tmp_path / "units"), "--service-config", str(cfg),
               "--invite-file", str(inv), "--state-dir", str(tmp_path / "state"))
    assert res.returncode == 0, res.stderr
    unit = tmp_path / "units" / "meshwg.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    copied = tmp_path / "etc" / "invite.txt"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600 and copied.read_text().strip() == _invite()
    # The ExecStart runs this installation's meshwg.
    exec_start = _keys(unit.read_text())["ExecStart"][0].split()
    assert os.access(exec_start[0], os.X_OK) and exec_start[1:] == ["--config", str(cfg), "join"]
    # The starter config is one `meshwg join` reads: the invite file and the state directory.
    from meshwg import cli

    args = cli.parse_args(["--config", str(cfg), "join"])
    assert args.invite_file == str(copied) and args.state_dir == str(tmp_path / "state")
    # Not on systemd (this machine's PID 1 is not): one line says what to run.
    assert "systemctl daemon-reload && systemctl enable --now meshwg.service" in res.stdout


def test_install_keeps_an_existing_config(tmp_path):
    cfg = tmp_path / "meshwg.toml"
    cfg.write_text('interface = "mw1"\n')
    res = _cli("meshwg", "service", "install", "--unit-dir", str(tmp_path), "--service-config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert cfg.read_text() == 'interface = "mw1"\n'


def test_a_bad_invite_is_refused_before_anything_is_written(tmp_path):
    bad = tmp_path / "inv.txt"
    bad.write_text("not an invite")
    res = _cli("meshwg", "service", "install", "--unit-dir", str(tmp_path / "u"), "--service-config",
               str(tmp_path / "c.toml"), "--invite-file", str(bad))
    assert res.returncode == 1 and "inv.txt" in res.stderr
    assert not (tmp_path / "u").exists() and not (tmp_path / "c.toml").exists()


def _args(tmp_path, **kw):
    import argparse

    base = dict(unit_dir=str(tmp_path), service_config=str(tmp_path / "meshwg.toml"), invite_file=None,
                state_dir=U.AGENT_STATE, enable=False, now=False)
    return argparse.Namespace(**{**base, **kw})


def test_systemctl_runs_only_where_systemd_runs(tmp_path, monkeypatch):
    calls, lines = [], []
    monkeypatch.setattr(S, "SYSTEMD_UNIT_PATHS", (str(tmp_path),))
    inst = S.Installer(str(tmp_path), systemd=lambda: True, systemctl=lambda *a: calls.append(a), say=lines.append)
    S.run_agent_install(_args(tmp_path, now=True), inst)
    assert calls == [("daemon-reload",), ("enable", "--now", "meshwg.service")]
    calls.clear()
    S.run_agent_install(_args(tmp_path), inst)   # neither --enable nor --now: reload only
    assert calls == [("daemon-reload",)]
    calls.clear()
    S.run_uninstall(U.AGENT_UNIT)(_args(tmp_path), inst)
    assert calls == [("disable", "--now", "meshwg.service"), ("daemon-reload",)]
    assert not (tmp_path / "meshwg.service").exists()
    # No systemd: no systemctl at all, one line instead.
    calls.clear()
    lines.clear()
    off = S.Installer(str(tmp_path), systemd=lambda: False, systemctl=lambda *a: calls.append(a), say=lines.append)
    S.run_agent_install(_args(tmp_path, enable=True), off)
    assert calls == [] and sum("systemd is not running here" in ln for ln in lines) == 1
    assert any("systemctl daemon-reload && systemctl enable meshwg.service" in ln for ln in lines)


def test_uninstall_removes_the_unit_and_keeps_the_config(tmp_path):
    cfg = tmp_path / "meshwg.toml"
    assert _cli("meshwg", "service", "install", "--unit-dir", str(tmp_path), "--service-config",
                str(cfg)).returncode == 0
    res = _cli("meshwg", "service", "uninstall", "--unit-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "meshwg.service").exists() and cfg.exists()


def test_signal_install_with_init_creates_the_database(tmp_path):
    db, cfg = tmp_path / "sig" / "signal.db", tmp_path / "signal.toml"
    res = _cli("signal_server", "--db", str(db), "service", "install", "--init", "--unit-dir", str(tmp_path / "u"),
               "--service-config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert db.exists() and "server key" in res.stdout
    unit = _keys((tmp_path / "u" / "meshwg-signal.service").read_text())
    assert unit["ReadWritePaths"] == [str(db.parent)]
    from signal_server import cli as scli

    assert scli.parse_args(["--config", str(cfg), "serve"]).db == str(db)
    assert _cli("signal_server", "service", "uninstall", "--unit-dir", str(tmp_path / "u")).returncode == 0
    assert not (tmp_path / "u" / "meshwg-signal.service").exists()


def _verify(*units: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verifies_the_installed_units(tmp_path):
    require_real_components("systemd-analyze")
    u = tmp_path / "u"
    assert _cli("meshwg", "service", "install", "--unit-dir", str(u), "--service-config",
                str(tmp_path / "m.toml")).returncode == 0
    assert _cli("signal_server", "--db", str(tmp_path / "s.db"), "service", "install", "--unit-dir", str(u),
                "--service-config", str(tmp_path / "s.toml")).returncode == 0
    res = _verify(u / "meshwg.service", u / "meshwg-signal.service")
    # verify exits 0 on values it ignores: a warning on stderr is a failure here too.
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


@pytest.mark.parametrize("bad", [("Type=notify", "Type=notfy"), ("ProtectSystem=strict", "ProtectSystem=strictest")])
def test_systemd_analyze_catches_a_bad_unit(tmp_path, bad):
    """The check above can fail: a wrong value is on stderr."""
    require_real_components("systemd-analyze")
    unit = tmp_path / "meshwg.service"
    unit.write_text(U.agent_unit([sys.executable], "/etc/meshwg/meshwg.toml").replace(*bad))
    assert _verify(unit).stderr.strip() != ""


def test_signal_install_relay_writes_its_own_unit(tmp_path):
    """`meshwg-signal service install --relay`: meshwg-signal-relay.service runs `meshwg-signal relay` from the same
    config file, beside meshwg-signal.service; uninstall --relay removes only it."""
    db, cfg, units = tmp_path / "sig" / "signal.db", tmp_path / "signal.toml", tmp_path / "u"
    base = ("signal_server", "--db", str(db), "service")
    assert _cli(*base, "install", "--init", "--unit-dir", str(units), "--service-config", str(cfg)).returncode == 0
    res = _cli(*base, "install", "--relay", "--unit-dir", str(units), "--service-config", str(cfg))
    assert res.returncode == 0, res.stderr
    unit = _keys((units / "meshwg-signal-relay.service").read_text())
    exe = unit["ExecStart"][0].split()
    assert exe[-3:] == ["--config", str(cfg), "relay"] and unit["Type"] == ["notify"]
    assert unit["ReadWritePaths"] == [str(db.parent)] and "meshwg-signal relay" in unit["Description"][0]
    assert (units / "meshwg-signal.service").exists()  # the server's unit is left alone
    assert _keys((units / "meshwg-signal.service").read_text())["ExecStart"][0].endswith(" serve")
    res = _cli("signal_server", "service", "uninstall", "--relay", "--unit-dir", str(units))
    assert res.returncode == 0, res.stderr
    assert not (units / "meshwg-signal-relay.service").exists() and (units / "meshwg-signal.service").exists()


def test_systemd_analyze_verifies_the_relay_unit(tmp_path):
    require_real_components("systemd-analyze")
    u = tmp_path / "u"
    assert _cli("signal_server", "--db", str(tmp_path / "s.db"), "service", "install", "--relay", "--unit-dir",
                str(u), "--service-config", str(tmp_path / "s.toml")).returncode == 0
    res = _verify(u / "meshwg-signal-relay.service")
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
