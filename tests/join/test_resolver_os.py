"""meshwg.io.oscfg.resolver (`meshwg join --accept-dns`, issue 15): the resolv.conf change is undone at exit and
after a crash, never clobbers a file someone rewrote since; systemd-resolved gets per-link DNS for the domain only.
On temporary files and a fake command runner: nothing here touches the host's resolver."""

from __future__ import annotations

import subprocess

from meshwg.io.oscfg import resolver as R

ORIGINAL = "# from DHCP\nnameserver 192.0.2.53\nsearch lan example.org\noptions edns0\n"


def make(tmp_path, **kw):
    conf = tmp_path / "resolv.conf"
    if not conf.exists():
        conf.write_text(ORIGINAL)
    return conf, R.SystemResolver("mw0", str(tmp_path / "state"), resolv_conf=str(conf), use_resolved=False, **kw)


def test_resolv_conf_change_puts_us_first_and_is_undone_at_close(tmp_path):
    conf, res = make(tmp_path)
    res.apply("mesh.internal", "100.64.0.1")
    lines = conf.read_text().splitlines()
    assert lines[0].startswith(R.MARKER)
    assert lines[1] == "nameserver 100.64.0.1" and lines[2] == "search mesh.internal lan example.org"
    assert "nameserver 192.0.2.53" in lines and "options edns0" in lines and "search lan example.org" not in lines
    res.apply("mesh.internal", "100.64.0.7")   # our address changed: from the original again, not stacked
    assert conf.read_text().count("nameserver") == 2 and "nameserver 100.64.0.7" in conf.read_text()
    res.close()
    assert conf.read_text() == ORIGINAL
    assert not (tmp_path / "state" / R.UNDO_FILE).exists()


def test_a_crashed_run_is_undone_at_the_next_start(tmp_path):
    conf, res = make(tmp_path)
    res.apply("mesh.internal", "100.64.0.1")
    assert (tmp_path / "state" / R.UNDO_FILE).exists()   # written before the change
    del res                                              # killed: no close()
    _, again = make(tmp_path)
    again.recover()
    assert conf.read_text() == ORIGINAL
    assert not (tmp_path / "state" / R.UNDO_FILE).exists()


def test_a_file_rewritten_since_is_left_alone(tmp_path):
    conf, res = make(tmp_path)
    res.apply("mesh.internal", "100.64.0.1")
    conf.write_text("nameserver 198.51.100.1\n")   # DHCP renewed the lease meanwhile
    res.close()
    assert conf.read_text() == "nameserver 198.51.100.1\n"


def test_names_off_undoes(tmp_path):
    conf, res = make(tmp_path)
    res.apply("mesh.internal", "100.64.0.1")
    res.apply("", None)
    assert conf.read_text() == ORIGINAL


def test_systemd_resolved_per_link_for_the_domain_only(tmp_path):
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    res = R.SystemResolver("mw0", str(tmp_path / "state"), resolv_conf=str(tmp_path / "none"), run=run,
                           use_resolved=True)
    res.apply("mesh.internal", "100.64.0.1")
    assert calls == [["resolvectl", "dns", "mw0", "100.64.0.1"], ["resolvectl", "domain", "mw0", "~mesh.internal"],
                     ["resolvectl", "default-route", "mw0", "false"]]
    res.close()
    assert calls[-1] == ["resolvectl", "revert", "mw0"]
    res.apply("mesh.internal", "100.64.0.1")
    del res                                     # a crash: the next start reverts the link
    again = R.SystemResolver("mw0", str(tmp_path / "state"), run=run, use_resolved=True)
    again.recover()
    assert calls[-1] == ["resolvectl", "revert", "mw0"]


def test_resolved_not_used_from_another_network_namespace(monkeypatch):
    monkeypatch.setattr(R.shutil, "which", lambda name: "/usr/bin/" + name)
    ran = []
    monkeypatch.setattr(R, "_same_netns", lambda: False)
    assert R.resolved_usable(lambda argv, **kw: ran.append(argv)) is False and not ran


async def test_an_agent_without_accept_dns_still_undoes_a_crashed_runs_change(tmp_path):
    """A run with --accept-dns was killed; the next start has no --accept-dns: the host's file is restored anyway
    (the undo file names the file it changed, here a temporary one)."""
    from meshwg.io.agent.agent import Agent
    from meshwg.signaling.invite import Invite

    conf, res = make(tmp_path)
    res.apply("mesh.internal", "100.64.0.1")
    del res                                              # killed: no close()
    assert conf.read_text() != ORIGINAL
    agent = Agent(Invite(("192.0.2.1:7300",), bytes(range(32)), "", b""), name=None, state_dir=str(tmp_path / "state"),
                  iface="mw0", accept_dns=False)
    await agent._dns_start()
    assert conf.read_text() == ORIGINAL
    assert not (tmp_path / "state" / R.UNDO_FILE).exists()
