"""The token bucket every room rate-limits with: ``[tokens, last refill]`` in a list, refilled at
``rate`` a second up to ``burst`` seconds' worth. No I/O and no clock: ``now`` is an argument."""

from typing import List


def new_bucket(rate: float, burst_s: float = 2.0) -> List[float]:
    """A full bucket: its first take always succeeds."""
    return [rate * burst_s, float("-inf")]


def take(bucket: List[float], rate: float, now: float, burst_s: float = 2.0) -> bool:
    """Take one token from ``bucket``; False (and nothing taken) when it is empty."""
    tokens = bucket[0] + (now - bucket[1]) * rate
    if tokens > burst_s * rate:
        tokens = burst_s * rate
    bucket[1] = now
    if tokens < 1.0:
        bucket[0] = tokens
        return False
    bucket[0] = tokens - 1.0
    return True
