"""The agent's state directory: the node key (0600) and the cached netmap, written atomically.

The cache lets a node restarted while the signaling server is down bring up its known peers:
it holds the last welcome (addresses, STUN/relay servers), the last directory and where the control servers are
(the invite's addresses and every running server the last welcome listed).

Whoever can write into the directory can swap the key or the cache, so a directory owned by someone
else or writable by group/others is refused, and the key file is never reached through a symlink.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat

from meshwg.config import keys
from meshwg.fsutil import atomic_write

log = logging.getLogger("meshwg.agent")

KEY_FILE = "private.key"
CACHE_FILE = "netmap.json"
ROUTING_FILE = "routing.json"   # what the node advertises and which exit node it uses (a restart keeps it)


class UnsafeStateError(OSError):
    """The state directory or key file could be controlled by someone else; str() is one line."""


def ensure_dir(state_dir: str) -> None:
    """Create the directory 0700, or check an existing one: ours, not writable by group or others."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    st = os.stat(state_dir)
    if st.st_uid != os.geteuid():
        raise UnsafeStateError(f"state directory {state_dir} is owned by uid {st.st_uid}, not by this user "
                               f"(uid {os.geteuid()}); refusing to trust it")
    if st.st_mode & 0o022:
        raise UnsafeStateError(f"state directory {state_dir} is writable by group or others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}); refusing to trust it (chmod 700 it)")


def load_or_create_key(state_dir: str, random_bytes=os.urandom) -> bytes:
    """The node's WireGuard private key; created on first use. A key file others can read is tightened
    (through its own descriptor); a symlink or a non-regular file at its place is refused."""
    ensure_dir(state_dir)
    path = os.path.join(state_dir, KEY_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        key = keys.generate_private_key(random_bytes)
        # A temp file made with O_EXCL (never follows a link), renamed over the name (replaces a link).
        atomic_write(path, (keys.key_to_base64(key) + "\n").encode())
        return key
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStateError(f"key file {path} is a symbolic link; refusing to follow it") from None
        raise
    with os.fdopen(fd) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStateError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # tighten rather than refuse: the key is ours
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


def cached_servers(cache: dict | None, server_key: bytes) -> tuple:
    """The control addresses the cache keeps (the invite's and every running server a welcome listed, issue 14) when
    they are the same mesh's (its server key): a node restarted with an invite naming one server that has died
    since still finds the others. () when there are none."""
    import base64

    from meshwg.signaling.invite import split_hostport

    try:
        ctl = cache["control"]
        if base64.b64decode(ctl["server_key"], validate=True) != server_key:
            return ()
        addrs = [str(a) for a in ctl["addrs"]][:32]
        for a in addrs:
            split_hostport(a)
    except (KeyError, TypeError, ValueError):
        return ()
    return tuple(addrs)


def save_routing(state_dir: str, choice: dict) -> None:
    atomic_write(os.path.join(state_dir, ROUTING_FILE), json.dumps(choice, indent=1).encode())


def load_routing(state_dir: str) -> dict | None:
    """The saved routing choice (a dict for meshwg.mesh.routing.choice_from_json_untrusted), None if none."""
    try:
        with open(os.path.join(state_dir, ROUTING_FILE), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# What the node changed on the host (issue 12: sysctls' original values, the nftables table, the exit policy
# routing's mark), written before each change, so the next run undoes what a crash (SIGKILL, OOM) left behind.
OS_UNDO_FILE = "os-undo.json"


def save_os_undo(state_dir: str, undo: dict) -> None:
    atomic_write(os.path.join(state_dir, OS_UNDO_FILE), json.dumps(undo, indent=1).encode())


def load_os_undo(state_dir: str) -> dict | None:
    """What a previous run left to undo, None if nothing (or an unreadable file: nothing can be trusted in it)."""
    try:
        with open(os.path.join(state_dir, OS_UNDO_FILE), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_os_undo(state_dir: str) -> None:
    """Everything undone: nothing for the next run to do. Never raises (it runs while the agent stops)."""
    try:
        os.unlink(os.path.join(state_dir, OS_UNDO_FILE))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", OS_UNDO_FILE, exc)
