"""What the control client says when it cannot reach a server."""

from __future__ import annotations

import pytest
import trio

from meshwg.control import ControlConnection
from meshwg.control import client as C
from meshwg.signaling.invite import Invite


async def test_connect_timeout_is_named_in_the_error(monkeypatch):
    async def never_connects(host, port):
        await trio.sleep_forever()

    monkeypatch.setattr(C.trio, "open_tcp_stream", never_connects)
    inv = Invite(("192.0.2.1:7300",), b"\x01" * 32, "id", b"\x02" * 16)
    with pytest.raises(C.ConnectionLost) as info:
        await ControlConnection.open(inv, b"\x03" * 32, timeout=0.05)
    assert "192.0.2.1:7300: connect timed out" in str(info.value)
