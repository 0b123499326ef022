"""`meshwg leave`: deregister this node from its mesh and remove its state (issue 15).

With an agent running, it is asked over its status socket: it sends the leave on its control session and stops.
With none, the leave goes over a control session opened with the state directory's key to the server its last
welcome named. The server removes the node as `meshwg-signal nodes remove` does (peers see it go) and says so;
then the node's files go from the state directory (the directory too when nothing else is in it). A server that
refuses or cannot be reached is one line, and the state stays unless --force.
"""

from __future__ import annotations

import os
import sys
import time

from meshwg.commands.mesh import DEFAULT_IFACE, DEFAULT_STATE_DIR, _iface
from meshwg.errors import UserError

AGENT_TIMEOUT = 20.0  # the agent's leave: its control session's answer (5 s) and a reconnect's worth
STOP_DEADLINE = 10.0  # the agent stops this soon after it left


def _args(p) -> None:
    p.add_argument("--interface", "-i", type=_iface, default=None,
                   help=f"the running agent's interface (default: the one agent running, else {DEFAULT_IFACE})")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"state directory (default {DEFAULT_STATE_DIR})")
    p.add_argument("--keep-state", action="store_true",
                   help="keep the state directory's files (the key is no longer registered: a rejoin needs an invite)")
    p.add_argument("--force", action="store_true",
                   help="remove the state even when the server could not be told (it keeps the node until "
                        "`meshwg-signal nodes remove`)")


def node_files() -> tuple[str, ...]:
    from meshwg.io.agent import agent_state as S

    return S.KEY_FILE, S.CACHE_FILE, S.ROUTING_FILE


def _running_agent(iface: str | None) -> str | None:
    from meshwg.io.ipc import status_server

    running = status_server.running_agents()
    if iface is not None:
        return iface if iface in running else None
    if len(running) > 1:
        raise UserError(f"leave: agents run on {', '.join(running)}: choose one with -i")
    return running[0] if running else None


def _leave_through_agent(iface: str) -> None:
    from meshwg.io.ipc import status_server

    try:
        reply = status_server.query(iface, {"op": "leave"}, timeout=AGENT_TIMEOUT)
    except (OSError, ValueError) as err:
        raise UserError(f"leave: cannot ask the agent on {iface}: {err}") from None
    if "error" in reply:
        raise UserError(f"leave: {reply['error']}")
    deadline = time.monotonic() + STOP_DEADLINE
    while iface in status_server.running_agents():  # it stops once the server confirmed
        if time.monotonic() > deadline:
            raise UserError(f"leave: the node left the mesh but the agent on {iface} did not stop within "
                            f"{STOP_DEADLINE:g} s; its state is kept")
        time.sleep(0.05)


def _leave_directly(state_dir: str) -> None:
    import trio

    from meshwg.control import ControlConnection, ControlError, JoinRefusedError
    from meshwg.io.agent import agent_state as S
    from meshwg.io.agent.agent import cached_invite

    if not os.path.exists(os.path.join(state_dir, S.KEY_FILE)):
        raise UserError(f"leave: {state_dir} holds no node key: this node has not joined (or --state-dir is wrong)")
    invite = cached_invite(S.load_cache(state_dir))
    if invite is None:
        raise UserError(f"leave: {state_dir} holds no registration (no netmap): nothing tells which server to tell")
    try:
        key = S.load_or_create_key(state_dir)  # exists: loaded, with the directory's safety checks
    except OSError as err:
        raise UserError(f"leave: {err}") from None

    async def leave() -> None:
        conn = await ControlConnection.open(invite, key)
        try:
            await conn.leave()
        finally:
            await conn.aclose()

    try:
        trio.run(leave)
    except JoinRefusedError as err:  # the server (its key proven) does not admit us: we are no member already
        print(f"meshwg: leave: the server no longer admits this node ({err}); it is no member", file=sys.stderr)
    except ControlError as err:
        raise UserError(f"leave: {err}") from None


def remove_state(state_dir: str) -> list[str]:
    """The node's files gone from state_dir, and the directory when it is then empty; the names removed."""
    removed = []
    for name in node_files():
        try:
            os.unlink(os.path.join(state_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(state_dir)  # only an empty one: other things kept there stay, and so does it
    except OSError:
        pass
    return removed


def run_leave(args) -> int:
    iface = _running_agent(args.interface)
    left = True
    try:
        if iface is not None:
            _leave_through_agent(iface)
        else:
            _leave_directly(args.state_dir)
    except UserError as err:
        if not args.force or args.keep_state:
            raise UserError(f"{err}; the node's state in {args.state_dir} is kept") from None
        print(f"meshwg: {err}; --force: removing the node's state all the same", file=sys.stderr)
        left = False
    what = "left the mesh" if left else "the server was not told"
    if args.keep_state:
        print(f"{what}; the state in {args.state_dir} is kept (--keep-state)")
    else:
        removed = remove_state(args.state_dir)
        print(f"{what}; removed {', '.join(removed) or 'nothing'} from {args.state_dir}")
    return 0


COMMANDS = {
    "leave": ("Leave the mesh: the server forgets this node (peers see it go) and its state is removed.",
              _args, run_leave),
}
