"""The one-line STATUS= text `systemctl status` shows for the agent and the server (meshwg/sdnotify.py sends it).
Pure: the shells pass in what they counted."""

from __future__ import annotations


def count_paths(rows) -> tuple[int, int, int]:
    """(direct, relayed, idle) of the agent's peer status rows (meshwg.mesh.node status: path, active, plain).
    Idle as `meshwg status` shows it: not direct, nothing sent or probed."""
    direct = relayed = idle = 0
    for r in rows:
        if r.get("path") == "direct":
            direct += 1
        elif not r.get("plain") and r.get("active") is False:
            idle += 1
        else:
            relayed += 1
    return direct, relayed, idle


def _peers(direct: int, relayed: int, idle: int) -> str:
    n = direct + relayed + idle
    if n == 0:
        return "no peers yet"
    text = f"{n} peer{'' if n == 1 else 's'}: {direct} direct, {relayed} relayed"
    return text + (f", {idle} idle" if idle else "")


def agent_status(*, welcomed: bool, connected: bool, failures: int, direct: int = 0, relayed: int = 0,
                 idle: int = 0) -> str:
    """welcomed: the node has a welcome (from the server or its cache); failures: connection attempts that failed
    since the last welcome (the one under way is failures + 1)."""
    attempt = failures + 1
    if not welcomed:
        return "connecting to the signal server" + (f" (attempt {attempt})" if failures else "")
    peers = _peers(direct, relayed, idle)
    if connected:
        return peers
    return f"reconnecting (attempt {attempt}); {peers}"


def mbit_per_s(bytes_before: int, bytes_now: int, seconds: float) -> float:
    """The relay's rate between two readings of its byte counter (0 for no time or a counter that went back)."""
    if seconds <= 0 or bytes_now < bytes_before:
        return 0.0
    return (bytes_now - bytes_before) * 8 / seconds / 1e6


def server_status(*, control: bool, nodes_connected: int, relay_sessions: int, mbit: float) -> str:
    """control: `serve` (False: `meshwg-signal relay`, which holds no control sessions)."""
    relay = f"{relay_sessions} relay session{'' if relay_sessions == 1 else 's'}, relaying {mbit:.1f} Mbit/s"
    if not control:
        return "relay only: " + relay
    return f"{nodes_connected} node{'' if nodes_connected == 1 else 's'} connected, {relay}"
