"""Network namespaces for tests and the NAT lab: create, run commands in, and always remove.

Names carry a per-run random suffix so parallel runs never clash. Processes started in a namespace
are tracked by PID and stopped by PID on close; nothing is ever killed by name.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence

RUN_ID = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
_name_counter = itertools.count(1)


def unique_name(prefix: str) -> str:
    """A namespace/interface name unique to this run: prefix + RUN_ID + a per-process counter.

    At most 15 chars (IFNAMSIZ): the prefix is cut to 3. The counter, not chance, keeps the names
    of one process apart; RUN_ID keeps processes (and parallel runs) apart."""
    return f"{prefix[:3]}{RUN_ID}{next(_name_counter) % 0xFFFF:x}"


def sh(cmd: Sequence[str], *, check: bool = True, input: bytes | None = None, timeout: float = 30) -> str:
    proc = subprocess.run(list(cmd), input=input, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace")


class Netns:
    """One network namespace. Use as a context manager, or call close() in a finally."""

    def __init__(self, prefix: str = "mwg"):
        self.name = unique_name(prefix)
        sh(["ip", "netns", "add", self.name])
        self._procs: list[subprocess.Popen] = []
        self.run("ip", "link", "set", "lo", "up")

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, input: bytes | None = None, timeout: float = 30) -> str:
        return sh(self.argv(*cmd), check=check, input=input, timeout=timeout)

    def popen(self, *cmd: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        return self.spawn(self.argv(*cmd), env=env, **kwargs)

    def spawn(self, argv: Sequence[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start a full argv that enters this namespace itself (e.g. one built on argv()), tracked as popen's."""
        proc = subprocess.Popen(list(argv), env=env, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 5) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout)
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in list(self._procs):
            self.stop(proc)
        sh(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def veth(a: Netns, a_if: str, a_addrs: Sequence[str], b: Netns, b_if: str, b_addrs: Sequence[str], mtu: int = 1500) -> None:
    """Join two namespaces with a veth pair and give each end its addresses (CIDR strings)."""
    tmp_a, tmp_b = unique_name("va"), unique_name("vb")
    sh(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
    sh(["ip", "link", "set", tmp_a, "netns", a.name])
    sh(["ip", "link", "set", tmp_b, "netns", b.name])
    for ns, tmp, name, addrs in ((a, tmp_a, a_if, a_addrs), (b, tmp_b, b_if, b_addrs)):
        ns.run("ip", "link", "set", tmp, "name", name)
        ns.run("ip", "link", "set", name, "mtu", str(mtu))
        for addr in addrs:
            family = "-6" if ":" in addr else "-4"
            ns.run("ip", family, "addr", "add", addr, "dev", name, *(["nodad"] if family == "-6" else []))
        ns.run("ip", "link", "set", name, "up")


def namespace_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out if pid.isdigit()]


def kill_namespace_pids(ns: "Netns | str", timeout: float = 3.0) -> None:
    """Stop every process left in a namespace this run created, by PID (SIGTERM, then SIGKILL after `timeout`).

    For daemons that are not our children: wg-quick's wireguard-go, anything started by hand in a kept lab."""
    name = ns if isinstance(ns, str) else ns.name
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in namespace_pids(name):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and namespace_pids(name):
            time.sleep(0.05)
        if not namespace_pids(name):
            return


def wait_for(predicate, timeout: float = 10, interval: float = 0.05, what: str = "condition"):
    """Poll predicate until it returns a truthy value; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
