"""How many rows a worker's next claim takes: about what it will start soon.

A claim leases its rows to one worker until that worker has worked through
them; rows it holds but has not started are rows that another worker, idle,
cannot take. So a claim takes one row per lane (its concurrency) and more only
while rows finish fast: enough for a short while of work at the rate the last
claim's rows went. That while is ``CLAIM_AHEAD`` seconds, or longer where a
claim itself is slow (a busy database's commit): long enough that claiming
costs at most about ``1 / CLAIM_COST_SHARE`` of a worker's time, never more
than ``MOST_AHEAD`` seconds. Rows still not started ``HAND_BACK_AFTER``
seconds after their claim are given back.
"""

from __future__ import annotations

import time

#: Seconds of work a claim takes at least, at the rate the worker's last claim
#: went: about 150 rows of a drain to a fast remote (0.3 ms a row), one row per
#: lane to a remote that takes 20 ms.
CLAIM_AHEAD = 0.05
#: A claim takes work for this many times its own round trip, so that claiming
#: costs a worker at most about 1/20 of its time.
CLAIM_COST_SHARE = 20
#: ... but never more than this many seconds of work, however slow the claim.
MOST_AHEAD = 0.5
#: A claim takes at most this many times the rows of the last one: one fast
#: claim (a batch of tombstones, a warm cache) does not lease a slow remote's
#: rows for long.
GROWTH = 4
#: The weight of the newest claim's round trip in the running estimate (one
#: slow commit does not make the next claims large).
CLAIM_TIME_WEIGHT = 0.3

#: Rows of a claim that no lane has started this long (seconds) after the
#: claim are given back: every lane is held up (an upload slower than the rows
#: before it, or hung), and another worker may be idle. Twice the most a claim
#: is sized for.
HAND_BACK_AFTER = 2 * MOST_AHEAD

#: The clock claims are timed with (tests put a clock of their own here).
clock = time.monotonic


def held_too_long(claimed_at: float) -> bool:
    """Whether rows claimed at ``claimed_at`` (a reading of :data:`clock`) and
    not started yet are to be given back."""
    return clock() - claimed_at >= HAND_BACK_AFTER


class ClaimSize:
    """The size of each claim of one drain with ``concurrency`` lanes, at most
    ``most`` rows (the batch size). Ask :meth:`next` just before each claim and
    tell :meth:`claimed` how many rows it took: a drain claims again once every
    row of its last claim has started and a lane is free, so the time between
    two claims is about the time the last one's rows took to get going."""

    def __init__(self, concurrency: int, most: int) -> None:
        self.most = max(1, most)
        self.least = max(1, min(concurrency, self.most))
        self.size = self.least
        self._asked_at = 0.0
        #: The running estimate of a claim's round trip (seconds); None: no
        #: claim yet.
        self.claim_seconds: float | None = None
        #: The rows of the last claim and when it was asked for; None after an
        #: empty claim (nothing to learn from).
        self._last: tuple[int, float] | None = None

    def next(self) -> int:
        """How many rows to claim now; the previous claim's rows have ended."""
        now = clock()
        if self._last is not None:
            rows, asked_at = self._last
            self._learn(rows, now - asked_at)
            self._last = None
        self._asked_at = now
        return self.size

    def claimed(self, rows: int) -> None:
        """The claim asked for by the last :meth:`next` took ``rows`` rows."""
        took = max(0.0, clock() - self._asked_at)
        if self.claim_seconds is None:
            self.claim_seconds = took
        else:
            self.claim_seconds += CLAIM_TIME_WEIGHT * (took - self.claim_seconds)
        self._last = (rows, self._asked_at) if rows else None

    def ahead(self) -> float:
        """Seconds of work the next claim takes, at the last claim's rate."""
        cost = CLAIM_COST_SHARE * (self.claim_seconds or 0.0)
        return min(max(CLAIM_AHEAD, cost), MOST_AHEAD)

    def _learn(self, rows: int, seconds: float) -> None:
        rate = rows / max(seconds, 1e-6)
        want = round(rate * self.ahead())
        self.size = max(self.least, min(want, rows * GROWTH, self.most))
