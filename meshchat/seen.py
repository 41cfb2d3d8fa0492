"""The seen cache: message ids a node has already handled, and when.

A plain dict in insertion order. Ids are added with a clock that never goes
backwards (``time.monotonic()`` in the node, plain floats in tests), so the
oldest entries are always at the front: expiry and eviction walk from the
front and stop at the first entry that stays.

Replays. Forgetting an id (expired after ``ttl_s``, or evicted for room when
there are ``max_entries``) must not let it be handled again. So each id is
added with its message's ``ts`` (the sender's wall clock, as the datagram
carries it), and ``horizon_ts`` is the newest ``ts`` of any id forgotten so
far. The relay refuses a message whose id is not here and whose ``ts`` is at
or before ``horizon_ts``. Proof that a forgotten id is never handled again:
when id E (with ``ts`` T) is forgotten, the newest ``ts`` of its batch (ids
that share one time stamp, below), which is at least T, is folded into
``horizon_ts``, which never goes down; any later copy of E carries T (a copy
keeps every field but ``ttl``), and T <= ``horizon_ts``, so it is refused.
No clock is compared with another: ``ts`` only with ``ts``, so the time
stamp sharing, the reaper's interval, ``--max-skew`` and the monotonic
clock's relation to the wall clock do not enter it.
Normal traffic is not refused: without a flood, an id is forgotten at least
``ttl_s - STAMP_RESOLUTION_S`` after it was recorded, and it was accepted
with ``ts`` within ``max_skew`` of our clock then; so ``horizon_ts`` trails
our clock by at least ``ttl_s - max_skew - STAMP_RESOLUTION_S`` (59.5 s with
the defaults, 120 and 60), and only messages about as old as ``--max-skew``
allows (which the clock check refuses anyway from 60 s) fall under it (a
step back of our wall clock narrows that margin by the step). Under
a flood that evicts ids much younger than ``ttl_s``, the horizon comes
close to our clock (or past it, if the flood is dated ahead): the node then
refuses older-dated messages rather than show anything twice (it fails
closed), and ``young_forgotten`` counts the evicted ids so the user can be
told.

Not locked itself: the node guards it, together with the rest of the relay
state, with one lock shared by the socket, reaper and main threads.
"""

from itertools import islice
from typing import Dict, List

# When full, drop this share of the oldest at once, so that eviction costs
# one scan per batch instead of one scan per new id.
EVICT_FRACTION = 0.05
# Ids recorded within this long of each other share one time object, which
# saves a float (24 bytes) per entry; expiry is this much less exact.
STAMP_RESOLUTION_S = 0.5


class SeenCache:
    def __init__(self, ttl_s: float, max_entries: int) -> None:
        if ttl_s <= 0 or max_entries <= 0:
            raise ValueError("ttl_s and max_entries must be positive")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._when: Dict[str, float] = {}
        self.ids = self._when  # read-only: the relay's hot path asks ``mid in ids`` without a method call
        self._stamp = float("-inf")
        # Per time stamp (oldest first), the newest ts of the ids recorded under it:
        # one small list per half second, not a float per id.
        self._batches: Dict[float, List[float]] = {}
        self._batch: List[float] = [float("-inf")]
        self.horizon_ts = float("-inf")  # newest ts of any id forgotten
        self.young_forgotten = 0  # ids evicted for room before ttl_s (the caller resets it)

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, mid: object) -> bool:
        return mid in self._when

    def add(self, mid: str, now: float, ts: float) -> bool:
        """Record ``mid`` of a message dated ``ts`` (its sender's wall clock); True if it was new."""
        when = self._when
        if mid in when:
            return False
        if len(when) >= self.max_entries:
            self._drop_oldest(max(1, int(self.max_entries * EVICT_FRACTION)), now)
        if now - self._stamp >= STAMP_RESOLUTION_S:
            self._stamp = now
            self._batch = self._batches[now] = [ts]
        elif ts > self._batch[0]:
            self._batch[0] = ts
        when[mid] = self._stamp
        return True

    def expire(self, now: float) -> int:
        """Forget ids older than ``ttl_s``; returns how many went."""
        cutoff = now - self.ttl_s
        old: List[str] = []
        for mid, when in self._when.items():
            if when > cutoff:
                break
            old.append(mid)
        self._forget(old)
        return len(old)

    def _drop_oldest(self, count: int, now: float) -> None:
        old = list(islice(self._when, count))
        cutoff = now - self.ttl_s
        if old and self._when[old[-1]] > cutoff:  # the newest evicted is young: count those that are
            self.young_forgotten += sum(1 for mid in old if self._when[mid] > cutoff)
        self._forget(old)

    def _forget(self, mids: List[str]) -> None:
        """Drop ``mids`` (the oldest, in order), moving their batches' newest ts into the horizon."""
        if not mids:
            return
        when, batches = self._when, self._batches
        horizon = self.horizon_ts
        last = None
        for mid in mids:
            stamp = when.pop(mid)
            if stamp is not last:  # ids of one batch share the stamp object
                last = stamp
                newest = batches[stamp][0]
                if newest > horizon:
                    horizon = newest
        self.horizon_ts = horizon
        # Batches left with no id go, except the current one, which new ids may still join.
        keep = next(iter(when.values()), self._stamp)
        gone = []
        for stamp in islice(batches, len(batches) - 1):
            if stamp >= keep:
                break
            gone.append(stamp)
        for stamp in gone:
            del batches[stamp]
