"""Helper services on lab hosts: coturn as a STUN server, the stdlib probe reflector, port waits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scenarios.netns import wait_for
from scenarios.topology import Host

PROBES = str(Path(__file__).with_name("probes.py"))


def listening(host: Host, port: int, proto: str = "udp") -> bool:
    """Whether something on `host` listens on `port` (udp or tcp)."""
    flag = "-uln" if proto == "udp" else "-tln"
    out = host.ns.run("ss", "-H", flag, check=False)
    return any(line.split()[3].endswith(f":{port}") for line in out.splitlines() if len(line.split()) > 3)


def start_coturn(host: Host, *, port: int = 3478, alt_port: int = 3479, stun_only: bool = True) -> subprocess.Popen:
    """coturn on `host`, listening on all its addresses (two give RFC 3489/5780 CHANGE-REQUEST support).

    Config, log, pid file and user db live in the host's directory; stop it with host.stop(proc).
    """
    conf = host.dir / "turnserver.conf"
    lines = [f"listening-ip={ip}" for ip in [host.addr, *host.extra_addrs]]
    lines += [f"listening-port={port}", f"alt-listening-port={alt_port}", "no-tls", "no-dtls", "no-cli",
              "no-auth", "log-file=stdout", "simple-log", f"pidfile={host.dir / 'turnserver.pid'}",
              f"userdb={host.dir / 'turndb'}"]
    if stun_only:
        lines.append("stun-only")
    conf.write_text("\n".join(lines) + "\n")
    log = open(host.dir / "turnserver.log", "wb")
    proc = host.popen("turnserver", "-c", str(conf), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for(lambda: proc.poll() is not None or listening(host, port), timeout=10, what="coturn listening")
    if proc.poll() is not None:
        raise RuntimeError(f"turnserver exited ({proc.returncode}); see {host.dir / 'turnserver.log'}")
    return proc


def start_reflector(host: Host, udp: list[str], tcp: str | None = None) -> subprocess.Popen:
    """The probes.py UDP/TCP reflector on `host` (addresses as 'ip:port'); returns once it is bound."""
    argv = [sys.executable, PROBES, "echo", *[a for u in udp for a in ("--udp", u)]]
    if tcp:
        argv += ["--tcp", tcp]
    proc = host.popen(*argv, stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    if not line or "ready" not in json.loads(line):
        raise RuntimeError("probe reflector did not start")
    return proc


def probe(host: Host, *args: str, timeout: float = 20) -> dict:
    """Run one probes.py command on `host` and return its (last) JSON line."""
    out = host.run(sys.executable, PROBES, *args, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])
