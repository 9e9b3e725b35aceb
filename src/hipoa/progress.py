"""Progress logging with rate and ETA for long steps (synth, ingest, crop, train, predict)."""

from __future__ import annotations

import logging
import time



def format_seconds(s: float) -> str:
    """Seconds as ``H:MM:SS`` (``?`` for NaN or infinity), as every progress line and ETA shows them."""
    if s != s or s == float("inf"):  # NaN / inf
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}"


class Progress:
    """Log ``what: done/total (pct) rate unit/s, elapsed, ETA`` at most every ``every_s`` seconds.

    Use ``update(n)`` after each unit of work and ``close()`` at the end (it always logs a final line).
    """

    def __init__(
        self,
        total: int,
        what: str,
        logger: logging.Logger,
        unit: str = "items",
        every_s: float = 10.0,
    ) -> None:
        self.total = int(total)
        self.what = what
        self.logger = logger
        self.unit = unit
        self.every_s = every_s
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start
        self.logger.info("%s: starting, %d %s", what, self.total, unit)

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        left = (self.total - self.done) / rate if rate and rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
            f"{rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {format_seconds(left)}"
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.logger.info(self._line())

    def close(self) -> float:
        """Log the final line and return the overall rate (units per second)."""
        elapsed = time.monotonic() - self.start
        self.logger.info(self._line().replace(f", ETA {format_seconds(0)}", "") + " - done")
        return self.done / elapsed if elapsed > 0 else float("nan")
