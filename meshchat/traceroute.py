"""Traceroute: the way to a node and back, hop by hop, with the mesh's own messages.

Rules, so that a probe costs the mesh about what it would cost to send a message there:
1. ``/trace NAME`` sends one ``TRACE`` (``dst`` the target, ``ttl0`` its starting
   ttl), routed like a direct message, and only ever to neighbours that said
   ``TRACE`` in their HELLO caps: nodes that do not speak it (a seed-design
   node) never see one.
2. Every node that handles a TRACE's first copy answers the origin with one
   ``HOP`` (``body`` the TRACE's mid, ``hop`` how many hops it came, ``end``
   1 from the target), sent to the neighbour the TRACE came from and passed
   back along the TRACE's own path, like a PONG: each node remembers, for
   ``PATH_KEEP_S``, at most ``MAX_PATHS`` of them, where each TRACE came from.
   A HOP with no way back is dropped (``dropped_no_route``), never flooded.
3. A TRACE is taken only from a neighbour that proved its address (a forged
   source gets nothing), a node answers at most ``ANSWERS_PER_S`` a second
   (bursts of twice that), and an answer is no bigger than the probe plus a
   few digits: nothing here can be made a reflector or an amplifier.
4. The origin reports the hops when the target's HOP arrives, or, without it,
   what came within ``TRACE_WAIT_S`` (at the next reaping, as unanswered pings are).
5. Nothing here touches a socket, a thread or a clock (the relay calls it
   under the node's lock with ``now``).
"""

from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Tuple

from .bucket import new_bucket, take
from .wire import Addr, Message

CAP = "TRACE"
KINDS = ("TRACE", "HOP")
TRACE_WAIT_S = 5.0
PATH_KEEP_S = 30.0
MAX_PATHS = 4096
MAX_PENDING = 16  # our own traces waiting for their answers
MAX_HOPS_KEPT = 64  # answers kept per trace (the first from each node)
ANSWERS_PER_S = 10.0


class TraceHop(NamedTuple):
    hop: int  # hops from us
    label: str
    rtt_ms: float


class TraceResult(NamedTuple):
    """The answers to our TRACE ``mid`` to ``target``, nearest first; ``complete``: the target answered."""

    target: str
    mid: str
    hops: Tuple[TraceHop, ...]
    complete: bool


class _Pending:
    __slots__ = ("target", "at", "hops")

    def __init__(self, target: str, at: float) -> None:
        self.target = target
        self.at = at
        self.hops: Dict[str, TraceHop] = {}


def hop_fields(msg: Message) -> Tuple[Optional[int], bool]:
    """A HOP's ``hop`` (1..255, else None) and whether it says it comes from the target."""
    x = msg.extra or {}
    hop = x.get("hop")
    return (hop if type(hop) is int and 1 <= hop <= 255 else None), x.get("end") == 1


class Traceroute:
    def __init__(self) -> None:
        self._pending: "OrderedDict[str, _Pending]" = OrderedDict()
        self._back: "OrderedDict[str, Tuple[Addr, float]]" = OrderedDict()  # TRACE mid -> (from, when)
        self._answers = new_bucket(ANSWERS_PER_S)

    # -- our own traces ----------------------------------------------------------------------

    def started(self, mid: str, target: str, now: float) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.popitem(last=False)
        self._pending[mid] = _Pending(target, now)

    def hop_received(self, msg: Message, now: float) -> list:
        """A HOP addressed to us: kept if it answers a trace of ours; the result once the target answered."""
        p = self._pending.get(msg.body)
        hop, end = hop_fields(msg)
        if p is None or hop is None:
            return []
        if msg.src not in p.hops and len(p.hops) < MAX_HOPS_KEPT:
            p.hops[msg.src] = TraceHop(hop, msg.src, round((now - p.at) * 1000.0, 2))
        if end and msg.src == p.target:
            del self._pending[msg.body]
            return [_result(msg.body, p, True)]
        return []

    def expire(self, now: float) -> List[TraceResult]:
        """Traces whose target did not answer in TRACE_WAIT_S: what came, reported incomplete."""
        out = []
        for mid in [m for m, p in self._pending.items() if now - p.at >= TRACE_WAIT_S]:
            out.append(_result(mid, self._pending.pop(mid), False))
        back = self._back
        while back and next(iter(back.values()))[1] < now - PATH_KEEP_S:
            back.popitem(last=False)
        return out

    # -- others' traces ------------------------------------------------------------------------

    def came_from(self, mid: str, addr: Addr, now: float) -> None:
        """The first copy of TRACE ``mid`` came from neighbour ``addr``: its HOPs go back there."""
        if len(self._back) >= MAX_PATHS:
            self._back.popitem(last=False)  # forged traces push out the oldest, not the newest
        self._back[mid] = (addr, now)

    def way_back(self, mid: str) -> Optional[Addr]:
        back = self._back.get(mid)
        return back[0] if back is not None else None

    def may_answer(self, now: float) -> bool:
        return take(self._answers, ANSWERS_PER_S, now)


def _result(mid: str, p: _Pending, complete: bool) -> TraceResult:
    return TraceResult(p.target, mid, tuple(sorted(p.hops.values(), key=lambda h: (h.hop, h.rtt_ms))), complete)
