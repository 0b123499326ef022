"""The NAT lab topology: an "internet" namespace, NAT routers (nestable), hosts, all torn down on exit.

    with Lab() as lab:
        server = lab.public_host("signal", extra_addrs=1)        # 203.0.113.x on the internet
        home = lab.router("home", NatType.PORT_RESTRICTED)      # public 198.51.100.x, LAN 192.168.x.0/24
        cgn = lab.router("cgn", NatType.SYMMETRIC, cgn=True)    # LAN in 100.64.0.0/10
        inner = lab.router("inner", NatType.PORT_RESTRICTED, upstream=cgn)   # double NAT
        laptop = lab.host("laptop", home)
        print(laptop.run("ip", "-br", "addr"))                   # a command on the host, its output
        proc = laptop.popen("some-daemon")                       # a process on the host, stopped on close

Layout: the internet namespace holds a bridge `br0` with 198.51.100.1/24 (where routers' public
addresses live) and 203.0.113.1/24 (public servers) and routes between them. Each router has `wan0`
towards its upstream and a bridge `lan0` that its hosts and nested routers plug into. A host has `eth0`.

Every process runs "on a host" through `Host.argv`: inside the host's network namespace and a private
mount namespace where the host's own directory is bound over /run/wireguard, so wireguard-go UAPI
sockets of different hosts never clash (`ip netns exec` does not separate /var/run/wireguard) while all
commands on one host (daemon, `wg`, status queries) still see the same sockets.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scenarios.nat import NatType, ruleset
from scenarios.netns import RUN_ID, Netns, kill_namespace_pids, sh, veth

# Bridges get this fixed, locally administered MAC (each bridge is its own L2 segment; see Lab.__init__).
BRIDGE_MAC = "02:6d:77:67:00:01"
INTERNET_ROUTERS_NET = "198.51.100"   # routers' public addresses (TEST-NET-2)
INTERNET_SERVERS_NET = "203.0.113"    # public servers (TEST-NET-3)
# Directories each host gets privately (bind-mounted from its own lab directory).
PRIVATE_DIRS = ("/run/wireguard",)

def _new_ns() -> Netns:
    return Netns("m")


@dataclass
class Host:
    """A machine: its own network namespace with `eth0`, behind `router` (None = on the internet)."""

    name: str
    ns: Netns
    addr: str                    # its own address (private behind a NAT, public on the internet)
    router: "Router | None"
    dir: Path                    # per-host scratch directory (state dirs, logs, private /run/wireguard)
    extra_addrs: list[str] = field(default_factory=list)

    @property
    def nat_label(self) -> str:
        """Its NAT path from the host outwards, e.g. 'port-restricted' or 'port-restricted+symmetric'."""
        labels, router = [], self.router
        while router is not None:
            labels.append(router.nat.value + ("(cgn)" if router.cgn else ""))
            router = router.upstream
        return "+".join(labels) or NatType.NONE.value

    def argv(self, *cmd: str) -> list[str]:
        """argv that runs `cmd` on this host (its network namespace, its private /run/wireguard)."""
        binds = " && ".join(
            f'mount --bind "{self.dir / "run" / Path(d).name}" {d}' for d in PRIVATE_DIRS
        )
        script = f'{binds} && exec "$@"'
        return self.ns.argv("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "host-sh", *cmd)

    def shell_command(self, *cmd: str) -> str:
        """A shell command line that runs `cmd` (default: an interactive bash) on this host."""
        return shlex.join(self.argv(*(cmd or ("bash",))))

    def run(self, *cmd: str, check: bool = True, input: bytes | None = None, timeout: float = 30) -> str:
        """Run a command on this host and return its stdout (raises on failure when check)."""
        return sh(self.argv(*cmd), check=check, input=input, timeout=timeout)

    def run_proc(self, *cmd: str, input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command on this host; return the completed process (returncode, stdout, stderr as bytes)."""
        return subprocess.run(self.argv(*cmd), input=input, capture_output=True, timeout=timeout)

    def popen(self, *cmd: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start a long-running process on this host; it is stopped by PID when the lab closes."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        return self.ns.spawn(self.argv(*cmd), env=full_env, **kwargs)

    def stop(self, proc: subprocess.Popen, timeout: float = 5) -> None:
        """Stop a process started with popen (SIGTERM to its process group, then SIGKILL)."""
        self.ns.stop(proc, timeout)


@dataclass
class Router:
    """A NAT router: `wan0` towards its upstream (internet or another router), bridge `lan0` inside."""

    name: str
    nat: NatType
    ns: Netns
    wan_ip: str                  # its outside address (public, or inside its upstream's LAN)
    lan_prefix: str              # first three octets of its /24 LAN
    upstream: "Router | None"
    cgn: bool = False
    hairpin: bool = False
    _next_lan: itertools.count = field(default_factory=lambda: itertools.count(2), repr=False)

    @property
    def lan_gw(self) -> str:
        return f"{self.lan_prefix}.1"

    @property
    def public_ip(self) -> str:
        """The address the internet sees for hosts behind this router (outermost router's WAN)."""
        router = self
        while router.upstream is not None:
            router = router.upstream
        return router.wan_ip

    def flush_conntrack(self) -> None:
        """Forget every tracked flow (old ones survive rule changes); exit 1 just means the table was empty."""
        self.ns.run("conntrack", "-F", check=False)


class Lab:
    """Builds and owns a whole topology. Close it (context manager) to remove everything it created."""

    def __init__(self, *, mtu: int = 1500, workdir: str | os.PathLike | None = None, handle_signals: bool = True):
        self.mtu = mtu
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Router] = {}
        self._namespaces: list[Netns] = []
        self._sweep: list[Netns] = []     # namespaces whose leftover processes close() stops (sweep_on_close)
        self._closed = False
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"meshwg-lab-{RUN_ID}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._old_handlers: dict[int, object] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        atexit.register(self.close)
        for d in PRIVATE_DIRS:
            os.makedirs(d, exist_ok=True)   # the mount point; hosts bind their own directory over it
        self._next_router_ip = itertools.count(10)
        self._next_server_ip = itertools.count(10)
        self._next_lan = itertools.count(1)
        self._next_port = itertools.count(1)
        try:
            self.internet = self._add_ns()
            # A fixed MAC: a bridge without one takes the lowest MAC of its ports, so plugging in a new
            # router can change the gateway's MAC under every host's ARP entry and black-hole traffic.
            self.internet.run("ip", "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge")
            self.internet.run("ip", "link", "set", "br0", "mtu", str(mtu), "up")
            self.internet.run("ip", "addr", "add", f"{INTERNET_ROUTERS_NET}.1/24", "dev", "br0")
            self.internet.run("ip", "addr", "add", f"{INTERNET_SERVERS_NET}.1/24", "dev", "br0")
            self._enable_forwarding(self.internet, "br0")
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------------------------

    def public_host(self, name: str, *, extra_addrs: int = 0) -> Host:
        """A host with a public address on the internet (servers: signal, STUN, relay)."""
        return self._guarded(self._public_host, name, extra_addrs)

    def router(self, name: str, nat: NatType | str, *, upstream: Router | None = None, cgn: bool = False,
               hairpin: bool = False) -> Router:
        """A NAT router on the internet (or behind `upstream` for double NAT). cgn=True uses 100.64.x.0/24."""
        return self._guarded(self._router, name, NatType(nat), upstream, cgn, hairpin)

    def host(self, name: str, router: Router | None = None) -> Host:
        """A host behind `router` (None: directly on the internet, same as public_host)."""
        if router is None:
            return self.public_host(name)
        return self._guarded(self._host_behind, name, router)

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except BaseException:
            self.close()
            raise

    def _public_host(self, name: str, extra_addrs: int) -> Host:
        self._check_name(name)
        ns = self._add_ns()
        ips = [f"{INTERNET_SERVERS_NET}.{next(self._next_server_ip)}" for _ in range(1 + extra_addrs)]
        self._plug(self.internet, "br0", ns, "eth0", [f"{ip}/24" for ip in ips])
        ns.run("ip", "route", "add", "default", "via", f"{INTERNET_SERVERS_NET}.1")
        host = Host(name, ns, ips[0], None, self._host_dir(name), ips[1:])
        self.hosts[name] = host
        return host

    def _router(self, name: str, nat: NatType, upstream: Router | None, cgn: bool, hairpin: bool) -> Router:
        self._check_name(name)
        if nat is NatType.NONE:
            raise ValueError("a router needs a NAT type; use public_host() for a host without NAT")
        ns = self._add_ns()
        if upstream is None:
            wan_ip, gw = f"{INTERNET_ROUTERS_NET}.{next(self._next_router_ip)}", f"{INTERNET_ROUTERS_NET}.1"
            self._plug(self.internet, "br0", ns, "wan0", [f"{wan_ip}/24"])
        else:
            wan_ip, gw = f"{upstream.lan_prefix}.{next(upstream._next_lan)}", upstream.lan_gw
            self._plug(upstream.ns, "lan0", ns, "wan0", [f"{wan_ip}/24"])
        ns.run("ip", "route", "add", "default", "via", gw)
        k = next(self._next_lan)
        lan_prefix = f"100.64.{k}" if cgn else f"192.168.{k}"
        ns.run("ip", "link", "add", "lan0", "address", BRIDGE_MAC, "type", "bridge")  # fixed: see br0
        ns.run("ip", "link", "set", "lan0", "mtu", str(self.mtu), "up")
        ns.run("ip", "addr", "add", f"{lan_prefix}.1/24", "dev", "lan0")
        self._enable_forwarding(ns, "lan0")
        ns.run("nft", "-f", "-", input=ruleset(nat, wan_ip, hairpin=hairpin).encode())
        router = Router(name, nat, ns, wan_ip, lan_prefix, upstream, cgn, hairpin)
        self.routers[name] = router
        return router

    def _host_behind(self, name: str, router: Router) -> Host:
        self._check_name(name)
        ns = self._add_ns()
        addr = f"{router.lan_prefix}.{next(router._next_lan)}"
        self._plug(router.ns, "lan0", ns, "eth0", [f"{addr}/24"])
        ns.run("ip", "route", "add", "default", "via", router.lan_gw)
        host = Host(name, ns, addr, router, self._host_dir(name))
        self.hosts[name] = host
        return host

    def sweep_on_close(self, host: Host) -> None:
        """`host` runs daemons that detach from what popen started (wg-quick starts wireguard-go, which forks
        away): close() stops every process still in its namespace, by PID, before deleting it."""
        self._sweep.append(host.ns)

    def _check_name(self, name: str) -> None:
        if name in self.hosts or name in self.routers:
            raise ValueError(f"duplicate lab node name {name!r}")

    def _add_ns(self) -> Netns:
        ns = _new_ns()
        self._namespaces.append(ns)
        return ns

    def _plug(self, parent: Netns, bridge: str, child: Netns, child_if: str, child_addrs: Sequence[str]) -> None:
        port = f"p{next(self._next_port)}"
        veth(parent, port, [], child, child_if, child_addrs, mtu=self.mtu)
        parent.run("ip", "link", "set", port, "master", bridge)

    def _host_dir(self, name: str) -> Path:
        path = self.workdir / name
        for d in PRIVATE_DIRS:
            (path / "run" / Path(d).name).mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _enable_forwarding(ns: Netns, bridge: str) -> None:
        # Hairpin routing out of the interface a packet came in on must not trigger ICMP redirects
        # (the kernel ORs "all" with the interface's own value, so the existing bridge needs it too).
        ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
               "net.ipv4.conf.default.send_redirects=0", f"net.ipv4.conf.{bridge}.send_redirects=0")
        # With br_netfilter loaded, frames switched between two LAN ports would cross the router's
        # forward chain (and conntrack); a real home switch does not filter, so turn that off here.
        ns.run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0",
               "net.bridge.bridge-nf-call-arptables=0", check=False)

    # -- inspection ---------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return [ns.name for ns in self._namespaces]

    def manifest(self) -> dict:
        """What exists, for --keep and for `python -m scenarios down`."""
        return {
            "run_id": RUN_ID,
            "workdir": str(self.workdir),
            "internet": self.internet.name,
            "routers": {r.name: {"ns": r.ns.name, "nat": r.nat.value, "wan_ip": r.wan_ip,
                                 "lan": f"{r.lan_prefix}.0/24"} for r in self.routers.values()},
            "hosts": {h.name: {"ns": h.ns.name, "addr": h.addr, "nat": h.nat_label} for h in self.hosts.values()},
            "namespaces": self.namespaces,
            "sweep": [ns.name for ns in self._sweep],
            "pids": [p.pid for ns in self._namespaces for p in ns._procs if p.poll() is None],
        }

    def write_manifest(self) -> Path:
        path = self.workdir / "lab.json"
        path.write_text(json.dumps(self.manifest(), indent=2))
        return path

    def detach(self) -> None:
        """Leave everything up (for --keep): close() becomes a no-op for this object."""
        self._closed = True
        atexit.unregister(self.close)
        self._restore_signals()

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process by PID, delete every namespace (and so every veth), remove the workdir."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        errors = []
        for ns in self._sweep:
            try:
                kill_namespace_pids(ns)
            except Exception as err:   # keep going: the namespaces must still go
                errors.append(err)
        self._sweep.clear()
        for ns in reversed(self._namespaces):
            try:
                ns.close()
            except Exception as err:   # keep going: the other namespaces must still go
                errors.append(err)
        self._namespaces.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._restore_signals()
        if errors:
            raise RuntimeError(f"lab teardown had errors: {errors}")

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        # Turn SIGTERM/SIGHUP into an exception so `with Lab()` / finally blocks tear down as for Ctrl-C.
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def teardown_manifest(path: str | os.PathLike) -> list[str]:
    """Remove a lab left up with --keep, from its lab.json: stop its PIDs, then whatever else still runs in its
    namespaces (daemons like wireguard-go, or what someone started in a host's shell), delete its namespaces."""
    data = json.loads(Path(path).read_text())
    for pid in data.get("pids", []):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for name in data["namespaces"]:
        kill_namespace_pids(name)
        sh(["ip", "netns", "del", name], check=False)
    shutil.rmtree(data["workdir"], ignore_errors=True)
    return data["namespaces"]
