"""The seen cache: message ids a node has already handled, and when.

A plain dict in insertion order. Ids are added with a clock that never goes
backwards (``time.monotonic()`` in the node, plain floats in tests), so the
oldest entries are always at the front: expiry and eviction walk from the
front and stop at the first entry that stays.

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
        self._stamp = float("-inf")

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, mid: object) -> bool:
        return mid in self._when

    def add(self, mid: str, now: float) -> bool:
        """Record ``mid``; True if it was new."""
        when = self._when
        if mid in when:
            return False
        if len(when) >= self.max_entries:
            self._drop_oldest(max(1, int(self.max_entries * EVICT_FRACTION)))
        if now - self._stamp >= STAMP_RESOLUTION_S:
            self._stamp = now
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
        for mid in old:
            del self._when[mid]
        return len(old)

    def _drop_oldest(self, count: int) -> None:
        for mid in list(islice(self._when, count)):
            del self._when[mid]
