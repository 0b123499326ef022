"""Review (broken network, crashes) of `join --accept-dns`'s resolv.conf change: a file DHCP rewrote is not
clobbered by our next change, nothing is changed that could not be undone, a crash in the middle of a write
leaves no empty file behind for good, a symlink and the file's mode are kept, and an agent in another network
namespace that sees the host's own file does not edit it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from meshwg.io.oscfg import resolver as R

ORIGINAL = "# from DHCP\nnameserver 192.0.2.53\nsearch lan\n"


def make(tmp_path, conf=None):
    conf = conf or tmp_path / "resolv.conf"
    if not conf.exists():
        conf.write_text(ORIGINAL)
    return conf, R.SystemResolver("mw0", str(tmp_path / "state"), resolv_conf=str(conf), use_resolved=False)


def test_a_file_dhcp_rewrote_is_not_clobbered_by_our_next_change(tmp_path):
    conf, res = make(tmp_path)
    res.apply("mesh.internal", "100.64.0.1")
    conf.write_text("nameserver 198.51.100.1\n")      # the lease renewed on another network: a new nameserver
    res.apply("mesh.internal", "100.64.0.7")           # then our address changed
    text = conf.read_text()
    assert "nameserver 198.51.100.1" in text and "192.0.2.53" not in text and "nameserver 100.64.0.7" in text
    res.close()
    assert conf.read_text() == "nameserver 198.51.100.1\n"   # DHCP's, not the stale original


def test_nothing_changed_when_the_undo_cannot_be_saved(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text(ORIGINAL)
    (tmp_path / "state").write_text("a file where the state directory should be")
    res = R.SystemResolver("mw0", str(tmp_path / "state"), resolv_conf=str(conf), use_resolved=False)
    res.apply("mesh.internal", "100.64.0.1")
    assert conf.read_text() == ORIGINAL   # a crash now would leave a change nothing can undo


def test_an_empty_file_left_by_a_crash_mid_write_is_restored(tmp_path):
    conf, res = make(tmp_path)
    res.apply("mesh.internal", "100.64.0.1")
    conf.write_text("")            # killed between the truncate and the write (or a power cut before writeback)
    _, again = make(tmp_path)
    again.recover()
    assert conf.read_text() == ORIGINAL


def test_the_write_is_atomic_keeps_a_symlink_and_the_mode(tmp_path):
    target = tmp_path / "run" / "resolv.conf"
    target.parent.mkdir()
    target.write_text(ORIGINAL)
    os.chmod(target, 0o644)
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    before = os.stat(target).st_ino
    _, res = make(tmp_path, conf=link)
    res.apply("mesh.internal", "100.64.0.1")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert os.stat(target).st_ino != before           # replaced whole (rename), never truncated in place
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert "nameserver 100.64.0.1" in target.read_text()
    res.close()
    assert target.read_text() == ORIGINAL and link.is_symlink()


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and ip")
def test_an_agent_in_another_netns_does_not_edit_the_hosts_own_file(tmp_path):
    """`ip netns exec NS meshwg join --accept-dns` without /etc/netns/NS/resolv.conf sees the host's file: our
    nameserver (reachable only inside NS) first there would stall every lookup of the host."""
    conf = tmp_path / "resolv.conf"
    conf.write_text(ORIGINAL)
    ns = f"rvwdns{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = textwrap.dedent(f"""
            from meshwg.io.oscfg import resolver as R
            r = R.SystemResolver("mw0", {str(tmp_path / "state")!r}, resolv_conf={str(conf)!r}, use_resolved=False)
            r.apply("mesh.internal", "100.64.0.1")
        """)
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(R.__file__)))))
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, timeout=30, cwd=repo)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert conf.read_text() == ORIGINAL
