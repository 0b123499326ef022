"""Address allocation from configured prefixes. Pure.

A node's address is derived from a hash of its public key (stable across re-joins), then linear probing
skips addresses in use, so an address is never handed to two existing nodes.
"""

from __future__ import annotations

import hashlib
import ipaddress


class PoolExhausted(RuntimeError):
    """Every usable address of the prefix is taken."""


def parse_prefix(text: str):
    net = ipaddress.ip_network(text, strict=True)
    if net.num_addresses < 4:
        raise ValueError(f"prefix {text} is too small")
    return net


def allocate(prefix, key: bytes, is_taken, n_taken: int):
    """First free host address of prefix, starting at a key-derived offset. Raises when full.

    is_taken(addr) -> bool; n_taken bounds the probing (at most n_taken + 1 candidates are checked).
    """
    usable = prefix.num_addresses - 2  # network and last address stay unused (broadcast for IPv4)
    first = int(prefix.network_address) + 1
    start = int.from_bytes(hashlib.blake2s(key, digest_size=16, person=b"mwgipam").digest(), "big") % usable
    for i in range(min(usable, n_taken + 1)):
        addr = ipaddress.ip_address(first + (start + i) % usable)
        if not is_taken(addr):
            return addr
    raise PoolExhausted(f"address pool {prefix} is exhausted")


def default_ula48(random16: bytes):
    """An RFC 4193 fd00::/8 /48 with a random 40-bit global id."""
    gid = random16[:5]
    return ipaddress.ip_network(bytes([0xFD]) + gid + bytes(10), strict=False).supernet(new_prefix=48)
