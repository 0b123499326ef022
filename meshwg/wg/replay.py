"""Sliding replay window, RFC 6479 as in wireguard-go `replay/replay.go` (WireGuard whitepaper §5.4.6)."""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REPLAY_BLOCKS, REPLAY_WINDOW

_BLOCK_MASK = REPLAY_BLOCKS - 1


class ReplayWindow:
    """Accepts each counter at most once within the last 8128; call only after the packet authenticated."""

    __slots__ = ("last", "blocks")

    def __init__(self) -> None:
        self.last = 0
        self.blocks = [0] * REPLAY_BLOCKS

    def validate(self, counter: int, limit: int = REJECT_AFTER_MESSAGES) -> bool:
        if counter >= limit:
            return False
        block = counter >> 6
        last = self.last
        if counter > last:
            # Zero the blocks the window slides over (all of them at most once).
            current = last >> 6
            diff = block - current
            if diff > REPLAY_BLOCKS:
                diff = REPLAY_BLOCKS
            blocks = self.blocks
            for i in range(current + 1, current + diff + 1):
                blocks[i & _BLOCK_MASK] = 0
            self.last = counter
        elif last - counter > REPLAY_WINDOW:
            return False
        index = block & _BLOCK_MASK
        bit = 1 << (counter & 63)
        old = self.blocks[index]
        if old & bit:
            return False
        self.blocks[index] = old | bit
        return True
