"""The agent's state directory: the node key (0600) and the cached netmap, written atomically.

The cache lets a node restarted while the signaling server is down bring up its known peers:
it holds the last welcome (addresses, STUN/relay servers) and the last directory.
"""

from __future__ import annotations

import json
import os

from meshwg.config import keys
from meshwg.io.fsutil import atomic_write

KEY_FILE = "private.key"
CACHE_FILE = "netmap.json"


def ensure_dir(state_dir: str) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)


def load_or_create_key(state_dir: str, random_bytes=os.urandom) -> bytes:
    """The node's WireGuard private key; created on first use. Refuses a key file others can read."""
    ensure_dir(state_dir)
    path = os.path.join(state_dir, KEY_FILE)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        key = keys.generate_private_key(random_bytes)
        atomic_write(path, (keys.key_to_base64(key) + "\n").encode())
        return key
    if st.st_mode & 0o077:
        os.chmod(path, 0o600)  # tighten rather than refuse: the key is ours
    with open(path) as f:
        return keys.key_from_base64(f.read().strip())


def save_cache(state_dir: str, welcome: dict, peers: list[dict], **extra) -> None:
    """welcome: plain dict (JSON-able); peers: [{key(b64), name, ipv4, ipv6, candidates}]; extra: more keys."""
    data = json.dumps({"version": 1, "welcome": welcome, "peers": peers, **extra}, indent=1).encode()
    atomic_write(os.path.join(state_dir, CACHE_FILE), data)


def load_cache(state_dir: str) -> dict | None:
    """The cached {"welcome", "peers"} or None; a corrupt cache is ignored (it is only a cache)."""
    try:
        with open(os.path.join(state_dir, CACHE_FILE), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != 1:
        return None
    if not isinstance(data.get("welcome"), dict) or not isinstance(data.get("peers"), list):
        return None
    return data
