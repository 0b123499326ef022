"""A process's resident memory and CPU time from /proc, for the benchmarks.

A daemon started with `ip netns exec` has the PID of that command (it execs the daemon)."""

from __future__ import annotations

import os


def rss_kb(pid: int) -> int:
    """VmRSS in KiB (0 when the process has none, e.g. a zombie)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # the command name may hold spaces or ')'
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
