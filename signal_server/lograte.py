"""Rate-limited logging of repeated lines: an attacker or a full descriptor table must not turn the log into
a flood (trio's accept loop logs a traceback 10 times a second while accept() fails with EMFILE).

The first occurrence of a line is logged; the same line again at most once per `interval`, saying how
many were held back meanwhile. `RepeatLimiter` is the decision (pure, takes `now`); `RepeatFilter` applies
it to a logger's records (the way in for lines logged by code we do not own)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

__all__ = ["RepeatFilter", "RepeatLimiter", "install_repeat_filter"]


class RepeatLimiter:
    """Per key: the first occurrence passes, then at most one per `interval`. Bounded (LRU) in keys."""

    def __init__(self, interval: float, max_keys: int = 1024) -> None:
        self.interval, self.max_keys = interval, max_keys
        self._last: OrderedDict = OrderedDict()  # key -> [time last passed, suppressed since]

    def check(self, key, now: float) -> int | None:
        """None: hold this occurrence back. Else it passes; the value is how many were held back before it."""
        entry = self._last.get(key)
        if entry is None:
            self._last[key] = [now, 0]
            if len(self._last) > self.max_keys:
                self._last.popitem(last=False)
            return 0
        self._last.move_to_end(key)
        if now - entry[0] < self.interval:
            entry[1] += 1
            return None
        held, entry[0], entry[1] = entry[1], now, 0
        return held

    def log(self, logger: logging.Logger, level: int, key, now: float, msg: str, *args, **kw) -> None:
        """logger.log(level, msg, *args) unless `key` was logged less than `interval` ago."""
        held = self.check(key, now)
        if held is None:
            return
        if held:
            msg += f" ({held} similar suppressed in the last {self.interval:g} s)"
        logger.log(level, msg, *args, **kw)


class RepeatFilter(logging.Filter):
    """A logging filter: records with the same logger, level and message template are rate-limited."""

    def __init__(self, interval: float, clock=time.monotonic) -> None:
        super().__init__()
        self.limiter = RepeatLimiter(interval)
        self.clock = clock

    def filter(self, record: logging.LogRecord) -> bool:
        held = self.limiter.check((record.name, record.levelno, str(record.msg)), self.clock())
        if held is None:
            return False
        if held:
            record.msg = f"{record.getMessage()} ({held} similar suppressed in the last {self.limiter.interval:g} s)"
            record.args = None
        return True


def install_repeat_filter(logger_name: str, interval: float) -> RepeatFilter:
    """Attach one RepeatFilter to the named logger (once: a second call returns the first filter)."""
    logger = logging.getLogger(logger_name)
    for f in logger.filters:
        if isinstance(f, RepeatFilter):
            return f
    f = RepeatFilter(interval)
    logger.addFilter(f)
    return f
