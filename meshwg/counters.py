"""The counter convention, and the one function that merges components' counters for `meshwg status`. Pure.

Every component exposes `counters: collections.Counter[str]`. A key is snake_case `<verb>_<object>[_<reason>]`:
`drop_<reason>` for every datagram, packet or message lost or refused (the only keys a "drops" view shows),
other verbs for what was done (`send_disco_ping`, `recv_stun`, `limit_probe_ip`, `switch_path`, ...).
`merge` flattens several components into `<component>.<key>`, zero counts left out.

Reason-only drop tables kept for their own users (WireGuardCore.drops, DiscoCodec.drops: `core.drops["replay"]`)
join through `as_drops`, which names their keys the same way.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

DROP = "drop_"


def as_drops(reasons: Mapping[str, int]) -> collections.Counter:
    """A reason -> count table as convention keys: `replay` -> `drop_replay` (an already prefixed key stays)."""
    return collections.Counter({k if k.startswith(DROP) else DROP + k: v for k, v in reasons.items() if v})


def merge(components: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """{"node": node.counters, "driver": driver.counters, ...} -> {"node.drop_x": 3, "driver.send_y": 1, ...}."""
    return {f"{name}.{key}": n for name, table in components.items() for key, n in sorted(table.items()) if n}


def drops(merged: Mapping[str, int]) -> dict[str, int]:
    """Only the drops of a merged view (or of one component's counters)."""
    return {k: v for k, v in merged.items() if k.rpartition(".")[2].startswith(DROP)}

