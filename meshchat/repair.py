"""Gap repair of broadcasts: per-origin streams, WANT, HAVE and SINCE (sans-I/O).

The half of the delivery layer that makes sure no broadcast is missed; ``delivery.py`` holds the
other half (direct messages: acks, retries, outbox, store-and-forward), and its ``Delivery`` class
is built from both: ``Repair`` is a mixin that shares its ``config``, ``counters``, ``_rng``,
``_drop`` and ``_has_message``. The rules (numbered as in delivery.py):

6. Gaps. Per origin: the highest contiguous seq, the seqs received above it
   and the open gaps, never more than ``BEHIND`` below the highest seq known
   to exist (older ones are given up and counted). A gap waits
   ``GAP_WAIT_S`` (+ jitter) for reordered copies, then is asked for with a
   link-local WANT from the neighbour that showed it, then others, every
   ``WANT_RETRY_S``, ``WANT_TRIES`` times, then given up (counted) but
   remembered as lost for ``BUFFER_S``: a HAVE showing a neighbour has it
   reopens it, and while we have lost seqs our summary says so.
7. Serving. Recent broadcast datagrams are kept in memory (bounded, for
   ``BUFFER_S``) and served to a WANT unchanged but for ttl 1, under a token
   bucket of ``SERVE_PER_S``; SINCE answers come from the node (the store)
   through ``serve()`` and are paced by the same bucket.
8. Summaries. ``HAVE_SOON_S`` after a new broadcast (so a lost last message
   is asked for in seconds), else every ``HAVE_S`` (jittered), a HAVE of at most ``HAVE_ORIGINS``
   origins (each at its highest seq received with none missing below) goes
   to repair-speaking neighbours if it changed this round or the one before
   (a lost HAVE gets a second chance) or we have lost seqs: after that an
   idle mesh is quiet. A neighbour whose HAVE shows it behind us gets ours
   in reply (at most every ``HAVE_REPLY_S``) and in our next
   ``HAVE_REPEATS`` rounds. A neighbour that comes up gets one at once, and
   a SINCE if we restarted with history.

Like the rest of the layer it validates everything where it enters, bounds every table, and never
touches a socket, a thread, a clock or the disk.
"""

import math
import random
import re
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple

from .bucket import new_bucket, take
from .wire import Addr, Message, WireError, decode, encode

MAX_SEQ = 2 ** 53
JITTER = (0.8, 1.2)

BEHIND = 64  # gaps at most this far below the highest seq known
NEW_STREAM_SEQS = 16  # an origin first seen at a seq this low is taken from seq 1
MAX_STREAMS = 4096
MAX_GAPS = 4096
GAP_WAIT_S = 0.5
GAP_JITTER_S = 0.25
WANT_RETRY_S = 0.5
WANT_TRIES = 8  # at 20% loss a WANT and its answer both arrive 64% of the time: 8 tries miss 1 in 3,500
MAX_WANT_SEQS = 64
WANT_ROOM_BYTES = 1100  # the want field of one WANT stays under this (the datagram under 1400)
BUFFER_MAX = 2000
BUFFER_S = 300.0
SERVE_PER_S = 200.0
SERVE_QUEUE_MAX = 2000
SINCE_MAX = 500
SINCE_EVERY_S = 60.0  # one SINCE answer per asker this often
CATCH_UP_WINDOW_S = 60.0  # after our SINCE, old broadcasts arriving are the answer: late
CATCH_UP_S = 24 * 3600.0
HAVE_S = 30.0
HAVE_IDLE_S = 600.0  # a quiet node's next look at its summary: a new broadcast brings it forward
HAVE_SOON_S = 3.0  # after a new broadcast, a summary this soon, so a lost last message is asked for in seconds
HAVE_ORIGINS = 32
HAVE_REPEATS = 3  # unchanged HAVEs a neighbour that was behind us still gets
HAVE_REPLY_S = 10.0  # a neighbour that is behind us gets our HAVE in reply, at most this often
MAX_SINCE_ASKED = 256
SKEW_S = 60.0

_NODE_ID = re.compile(r"[0-9a-f]{16}\Z")
_STREAM_MID = re.compile(r"([0-9a-f]{16})-([1-9][0-9]{0,15})\Z")


# -- actions --------------------------------------------------------------------------------------

class Want(NamedTuple):
    """A link-local WANT: send ``data`` to ``addr``."""

    data: bytes
    addr: Addr
    wants: Dict[str, List[int]]


class Have(NamedTuple):
    data: bytes
    addr: Addr


class Since(NamedTuple):
    data: bytes
    addr: Addr


class Serve(NamedTuple):
    """A broadcast datagram with ttl 1 for the neighbour that asked for it."""

    data: bytes
    addr: Addr


class ServeSince(NamedTuple):
    """The node should call ``serve(addr, datagrams)`` with at most ``limit`` broadcasts newer than ``ts``."""

    ts: float
    addr: Addr
    limit: int


# -- validation -----------------------------------------------------------------------------------

def valid_node_id(value: object) -> bool:
    return type(value) is str and len(value) == 16 and _NODE_ID.match(value) is not None


def valid_seq(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_SEQ


def stream_of(mid: object) -> Optional[Tuple[str, int]]:
    """(origin node_id, seq) of a broadcast stream mid, else None."""
    if type(mid) is not str:
        return None
    m = _STREAM_MID.match(mid)
    if m is None:
        return None
    seq = int(m.group(2))
    return (m.group(1), seq) if seq <= MAX_SEQ else None


def parse_want(extra: Mapping[str, Any]) -> Tuple[Optional[Dict[str, List[int]]], str]:
    """The want field: {node_id: [seq, ...]}, at most MAX_WANT_SEQS seqs in all; or (None, reason)."""
    want = extra.get("want")
    if type(want) is not dict or not want:
        return None, "field"
    if len(want) > MAX_WANT_SEQS:
        return None, "count"
    out: Dict[str, List[int]] = {}
    total = 0
    for origin, seqs in want.items():
        if not valid_node_id(origin):
            return None, "id"
        if type(seqs) is not list or not seqs:
            return None, "field"
        total += len(seqs)
        if total > MAX_WANT_SEQS:
            return None, "count"
        if not all(valid_seq(s) for s in seqs):
            return None, "seq"
        out[origin] = list(dict.fromkeys(seqs))
    return out, ""


def parse_have(extra: Mapping[str, Any]) -> Tuple[Optional[Dict[str, int]], str]:
    """The have field: {node_id: highest seq}, at most HAVE_ORIGINS; or (None, reason)."""
    have = extra.get("have")
    if type(have) is not dict or not have:
        return None, "field"
    if len(have) > HAVE_ORIGINS:
        return None, "count"
    for origin, seq in have.items():
        if not valid_node_id(origin):
            return None, "id"
        if not valid_seq(seq):
            return None, "seq"
    return dict(have), ""


def parse_since(extra: Mapping[str, Any], wall: float, catch_up_s: float) -> Tuple[Optional[float], str]:
    """The since field: a wall time within the catch-up span (clamped to it); or (None, reason)."""
    ts = extra.get("since")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return None, "field"
    try:
        ts = float(ts)
    except OverflowError:
        return None, "ts"
    if not math.isfinite(ts) or ts > wall + SKEW_S or ts < 0:
        return None, "ts"
    return max(ts, wall - catch_up_s), ""


# -- state ----------------------------------------------------------------------------------------

class _Stream:
    __slots__ = ("contig", "top", "above", "gaps", "lost")

    def __init__(self, contig: int) -> None:
        self.contig = contig  # every seq up to this is received or given up
        self.top = contig  # the highest seq known to exist
        self.above: Set[int] = set()  # received, above contig
        self.gaps: Set[int] = set()  # missing, above contig, asked for (or about to be)
        self.lost: Dict[int, float] = {}  # given up after WANT_TRIES (-> when), until a HAVE reopens it

    def have(self) -> int:
        """What we can say we have: all up to here received (a lost seq holds it down, so we get help)."""
        return min(self.contig, min(self.lost) - 1) if self.lost else self.contig


class _Gap:
    __slots__ = ("due", "tries", "hint", "asked")

    def __init__(self, due: float, hint: Optional[Addr]) -> None:
        self.due = due
        self.tries = 0
        self.hint = hint
        self.asked: List[Addr] = []


class Repair:
    """Rules 6-8, mixed into ``Delivery`` (which calls ``_init_repair`` from its ``__init__``)."""

    def _init_repair(self, streams: Optional[Mapping[str, int]], last_stored_ts: Optional[float]) -> None:
        """``streams``: origin -> highest seq in history; ``last_stored_ts``: wall time of the newest
        message in history (None: nothing to catch up on)."""
        self._streams: "OrderedDict[str, _Stream]" = OrderedDict()  # least recently active first
        self._gaps: Dict[Tuple[str, int], _Gap] = {}
        self._gap_due: float = math.inf
        self._buffer: "OrderedDict[str, Tuple[float, Message]]" = OrderedDict()  # mid -> (when, msg)
        self._bucket = new_bucket(SERVE_PER_S, burst_s=1.0)
        self._serve_queue: Deque[Tuple[bytes, Addr]] = deque()
        self._have_due: Optional[float] = None
        self._have_last: Dict[str, int] = {}
        self._since_ts = last_stored_ts
        self._since_asked: Set[Addr] = set()
        self._catch_up_until = -math.inf
        self._catch_up_wall = -math.inf
        self._since_answered: Dict[Addr, float] = {}
        self._have_replied: Dict[Addr, float] = {}
        self._have_quiet = 0  # rounds since our summary last changed
        self._lost_rounds = 0  # unchanged rounds said again for the sake of seqs we gave up on
        self._behind: Dict[Addr, int] = {}  # neighbour whose HAVE showed it behind us -> rounds left to tell it
        for origin, top in (streams or {}).items():
            if valid_node_id(origin) and valid_seq(top) and len(self._streams) < MAX_STREAMS:
                self._streams[origin] = _Stream(top)

    # the mixin's contract with Delivery: what it shares
    config: Any
    counters: Dict[str, int]
    node_id: str
    _rng: random.Random
    _drop: Callable[[str, str], None]

    def _repair_sizes(self) -> Dict[str, int]:
        return dict(streams=len(self._streams), gaps=len(self._gaps), buffered=len(self._buffer),
                    serve_queue=len(self._serve_queue))

    def _repair_tick(self, now: float, wall: float) -> list:
        actions: list = []
        if now >= self._gap_due:
            actions.extend(self._ask(now, wall))
        if self._have_due is None:
            self._have_due = now + HAVE_S * self._rng.uniform(*JITTER)
        elif now >= self._have_due:
            actions.extend(self._haves(now, wall))
        if self._serve_queue:
            actions.extend(self._drain(now))
        return actions

    def _repair_deadline(self) -> float:
        times = [self._gap_due, 0.0 if self._have_due is None else self._have_due]  # not started: at once
        if self._serve_queue:
            tokens, last = self._bucket
            times.append(last + max(0.0, 1.0 - tokens) / SERVE_PER_S)
        return min(times)

    def _repair_housekeep(self, now: float) -> None:
        buf = self._buffer
        while buf and next(iter(buf.values()))[0] < now - BUFFER_S:
            buf.popitem(last=False)
        for a in [a for a, t in self._since_answered.items() if now - t >= SINCE_EVERY_S]:
            del self._since_answered[a]
        for a in [a for a, t in self._have_replied.items() if now - t >= HAVE_REPLY_S]:
            del self._have_replied[a]
        for st in self._streams.values():
            if st.lost:  # nobody holds it in memory any longer: stop asking
                st.lost = {s: t for s, t in st.lost.items() if now - t < BUFFER_S}

    def _repair_up(self, addr: Addr, label: str, now: float, wall: float) -> list:
        """A repair-speaking neighbour came up: a HAVE at once, and a SINCE if we restarted with history."""
        actions: list = []
        have = self._summary()
        if have:
            actions.append(Have(self._link("HAVE", label, {"have": have}, wall), addr))
            self.counters["haves_sent"] += 1
        if self._since_ts is not None and addr not in self._since_asked and len(self._since_asked) < MAX_SINCE_ASKED:
            self._since_asked.add(addr)
            since = max(self._since_ts, wall - self.config.catch_up_s)
            actions.append(Since(self._link("SINCE", label, {"since": round(since, 3)}, wall), addr))
            self._catch_up_until = now + CATCH_UP_WINDOW_S
            self._catch_up_wall = wall
            self.counters["since_sent"] += 1
        return actions

    # -- rule 6: gaps --------------------------------------------------------------------------------

    def is_late(self, mid: str, ts: float, now: float) -> bool:
        """Whether a broadcast arrives because we asked for it (a WANT, or our SINCE): show it as late.

        The relay may also let such a datagram past its clock-skew check: it is old on purpose."""
        key = stream_of(mid)
        if key is not None:
            g = self._gaps.get(key)
            if g is not None and g.tries:
                return True
        return now < self._catch_up_until and ts < self._catch_up_wall

    def broadcast_seen(self, msg: Message, from_addr: Addr, now: float) -> bool:
        """The first copy of a broadcast CHAT: update its origin's window, open gaps. Returns late."""
        if msg.kind != "CHAT" or msg.dst:
            return False
        late = self.is_late(msg.mid, msg.ts, now)
        if late:
            self.counters["late"] += 1
        key = stream_of(msg.mid)
        if key is None or key[0] == self.node_id:
            return late
        origin, seq = key
        st = self._stream(origin, seq, now)
        if st is None:
            return late
        if seq in st.gaps:
            self._close_gap(origin, st, seq)
            if late:
                self.counters["repaired"] += 1
        elif seq <= st.contig or seq in st.above:
            return late
        self._receive(st, seq)
        if seq > st.top:
            self._open(origin, st, seq - 1, from_addr, now)
            st.top = seq
        return late

    def _stream(self, origin: str, seq: int, now: float, touch: bool = True) -> Optional[_Stream]:
        """``origin``'s stream, made if new; ``touch``: a message of its own arrived, so it becomes
        the most recently active (a summary naming it must not: two nodes with more origins than a
        summary holds would reorder each other's lists, and their summaries would never settle)."""
        st = self._streams.get(origin)
        if st is not None:
            if touch:
                self._streams.move_to_end(origin)
            return st
        if len(self._streams) >= MAX_STREAMS:
            old, gone = self._streams.popitem(last=False)
            for s in gone.gaps:
                del self._gaps[(old, s)]
        # A stream that started within sight is taken from its start; else from here.
        st = self._streams[origin] = _Stream(0 if seq <= NEW_STREAM_SEQS else seq - 1)
        return st

    def _receive(self, st: _Stream, seq: int) -> None:
        st.above.add(seq)
        while st.contig + 1 in st.above:
            st.contig += 1
            st.above.discard(st.contig)

    def _close_gap(self, origin: str, st: _Stream, seq: int) -> None:
        st.gaps.discard(seq)
        del self._gaps[(origin, seq)]

    def _open(self, origin: str, st: _Stream, upto: int, hint: Optional[Addr], now: float) -> None:
        """Gaps for every seq up to ``upto`` not yet received, at most BEHIND below it."""
        floor = upto - BEHIND
        if st.contig < floor:
            # Given up without asking: too far behind. Counted without walking the range.
            dropped = min(floor - st.contig - sum(1 for s in st.above if s <= floor), BEHIND)
            for s in [s for s in st.gaps if s <= floor]:
                self._close_gap(origin, st, s)
            st.above = {s for s in st.above if s > floor}
            st.lost = {s: t for s, t in st.lost.items() if s > floor}
            st.contig = floor
            self.counters["gaps_given_up"] += dropped
            while st.contig + 1 in st.above:
                st.contig += 1
                st.above.discard(st.contig)
        start = max(st.contig, st.top) + 1
        for s in range(max(start, st.contig + 1), upto + 1):
            if s in st.above or s in st.gaps:
                continue
            if len(self._gaps) >= MAX_GAPS:
                self.counters["gaps_given_up"] += 1
                st.above.add(s)
                continue
            due = now + GAP_WAIT_S + self._rng.uniform(0.0, GAP_JITTER_S)
            self._gaps[(origin, s)] = _Gap(due, hint)
            st.gaps.add(s)
            self.counters["gaps_opened"] += 1
            self._gap_due = min(self._gap_due, due)
        while st.contig + 1 in st.above:
            st.contig += 1
            st.above.discard(st.contig)

    def _give_up(self, origin: str, seq: int, now: float) -> None:
        self.counters["gaps_given_up"] += 1
        st = self._streams.get(origin)
        del self._gaps[(origin, seq)]
        if st is not None:
            st.gaps.discard(seq)
            if len(st.lost) < BEHIND:
                st.lost[seq] = now
                self._round_within(now, HAVE_S)  # our summaries say we lack it, for a few rounds
            self._receive(st, seq)

    def _ask(self, now: float, wall: float) -> list:
        # Gaps due within the next wait go along: a burst lost together is asked for in one WANT.
        due = [k for k, g in self._gaps.items() if g.due <= now + GAP_WAIT_S + GAP_JITTER_S]
        if not due:
            self._gap_due = min((g.due for g in self._gaps.values()), default=math.inf)
            return []
        nbrs = {a: lb for a, lb in self._neighbours()}
        batches: Dict[Addr, Dict[str, List[int]]] = {}
        for key in sorted(due):
            g = self._gaps[key]
            if g.tries >= WANT_TRIES:
                self._give_up(key[0], key[1], now)
                continue
            g.tries += 1  # counted even with no one to ask, so an isolated node gives up
            g.due = now + WANT_RETRY_S * self._rng.uniform(*JITTER)
            if not nbrs:
                continue
            if g.hint in nbrs and not g.asked:
                addr = g.hint
            else:
                fresh = [a for a in nbrs if a not in g.asked]
                addr = self._rng.choice(fresh or list(nbrs))
            g.asked.append(addr)
            batches.setdefault(addr, {}).setdefault(key[0], []).append(key[1])
        self._gap_due = min((g.due for g in self._gaps.values()), default=math.inf)
        actions = []
        for addr, wants in batches.items():
            for part in _split_wants(wants):
                actions.append(Want(self._link("WANT", nbrs[addr], {"want": part}, wall), addr, part))
                self.counters["wants_sent"] += 1
        return actions

    def _link(self, kind: str, dst: str, extra: Dict[str, Any], wall: float) -> bytes:
        return encode(Message(self._new_mid()[:16], round(wall, 3), 1, kind, self.label, dst, "", extra))

    # -- rule 7: serving ------------------------------------------------------------------------------

    def remember(self, msg: Message, data: bytes, now: float) -> None:
        """A broadcast CHAT we handled (or originated): kept a while, to answer WANTs and SINCEs."""
        if msg.kind != "CHAT" or msg.dst:
            return
        buf = self._buffer
        buf[msg.mid] = (now, msg)
        buf.move_to_end(msg.mid)
        self.counters["remembered"] += 1
        # A new broadcast: the next summary comes soon, so that a neighbour that missed the last
        # message of a burst asks for it within seconds (nothing new: summaries stay rare).
        self._round_within(now, HAVE_SOON_S)
        while len(buf) > BUFFER_MAX:
            buf.popitem(last=False)

    def buffered(self, mid: str) -> Optional[Message]:
        """A broadcast we hold in memory (as it came to us), for lazy push to answer a GRAFT with."""
        held = self._buffer.get(mid)
        return held[1] if held is not None else None

    def want_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """A WANT from neighbour ``addr``: the datagrams we hold, ttl 1, within the serving budget."""
        wants, why = parse_want(msg.extra or {})
        if wants is None:
            self._drop("want", why)
            return [], "malformed"
        self.counters["wants_received"] += 1
        actions = []
        for origin, seqs in wants.items():
            for seq in seqs:
                held = self._buffer.get(f"{origin}-{seq}")
                data = _ttl1(held[1]) if held is not None else None
                if data is None:
                    self.counters["want_misses"] += 1
                elif not take(self._bucket, SERVE_PER_S, now, burst_s=1.0):
                    self.counters["served_refused"] += 1
                else:
                    self.counters["served"] += 1
                    actions.append(Serve(data, addr))
        return actions, ""

    def since_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """A SINCE from neighbour ``addr``: ask the node for what it holds (``ServeSince``), once a minute."""
        ts, why = parse_since(msg.extra or {}, wall, self.config.catch_up_s)
        if ts is None:
            self._drop("since", why)
            return [], "malformed"
        self.counters["since_received"] += 1
        last = self._since_answered.get(addr)
        if (last is not None and now - last < SINCE_EVERY_S) or (
                last is None and len(self._since_answered) >= MAX_SINCE_ASKED):
            self.counters["since_refused"] += 1
            return [], ""
        self._since_answered[addr] = now
        return [ServeSince(ts, addr, SINCE_MAX)], ""

    def recent_since(self, ts: float, limit: int = SINCE_MAX) -> List[bytes]:
        """Broadcast datagrams in memory newer than ``ts`` (for a node without history)."""
        out = [_ttl1(m) for _, m in self._buffer.values() if m.ts > ts]
        return [d for d in out if d is not None][-limit:]

    def serve(self, addr: Addr, datagrams: Iterable[bytes], now: float) -> None:
        """Queue the answer to a SINCE (from the store or ``recent_since``): sent paced by ``tick``."""
        for i, raw in enumerate(datagrams):
            if i >= SINCE_MAX:
                break
            try:
                msg = decode(raw)
            except (WireError, TypeError, AttributeError):
                continue
            if msg.kind not in ("CHAT", "PRESENCE") or msg.dst:  # broadcasts, and names (the node's last PRESENCEs)
                continue
            if len(self._serve_queue) >= SERVE_QUEUE_MAX:
                self.counters["serve_queue_dropped"] += 1
                continue
            self._serve_queue.append((encode(msg._replace(ttl=1)), addr))

    def _drain(self, now: float) -> list:
        out = []
        while self._serve_queue and take(self._bucket, SERVE_PER_S, now, burst_s=1.0):
            data, addr = self._serve_queue.popleft()
            out.append(Serve(data, addr))
            self.counters["served"] += 1
        return out

    # -- rule 8: summaries and catch-up ---------------------------------------------------------------

    def _summary(self) -> Dict[str, int]:
        have: Dict[str, int] = {}
        if self._seq:
            have[self.node_id] = self._seq
        for origin in reversed(self._streams):
            if len(have) >= HAVE_ORIGINS:
                break
            st = self._streams[origin]
            if st.have() > 0:
                have[origin] = st.have()
        return have

    def have_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """A HAVE from neighbour ``addr``: gaps for what it has and we do not (at most BEHIND per origin)."""
        have, why = parse_have(msg.extra or {})
        if have is None:
            self._drop("have", why)
            return [], "malformed"
        self.counters["haves_received"] += 1
        behind = False  # the neighbour lacks something we have: it gets our summary
        for origin, top in have.items():
            if origin == self.node_id:
                behind = behind or top < self._seq
                continue
            known = origin in self._streams
            st = self._stream(origin, top, now, touch=False)
            if not known and top > NEW_STREAM_SEQS:
                st.contig = st.top = top  # an origin new to us: from here on
                continue
            behind = behind or top < st.have()
            for s in [s for s in st.lost if s <= top]:  # it has what we gave up: ask again
                del st.lost[s]
                if (origin, s) not in self._gaps and len(self._gaps) < MAX_GAPS:
                    due = now + self._rng.uniform(0.0, GAP_JITTER_S)
                    self._gaps[(origin, s)] = _Gap(due, addr)
                    st.gaps.add(s)
                    self._gap_due = min(self._gap_due, due)
                    self.counters["gaps_reopened"] += 1
            if top > st.top:
                self._open(origin, st, top, addr, now)
                st.top = top
        if not behind:
            self._behind.pop(addr, None)
        elif addr in self._behind or len(self._behind) < MAX_SINCE_ASKED:
            self._behind[addr] = HAVE_REPEATS  # our next rounds tell it again, in case this reply is lost
            self._round_within(now, HAVE_S)
        last = self._have_replied.get(addr)
        if not behind or not msg.src or (last is not None and now - last < HAVE_REPLY_S):
            return [], ""
        if last is None and len(self._have_replied) >= MAX_SINCE_ASKED:
            return [], ""
        self._have_replied[addr] = now
        self.counters["haves_sent"] += 1
        return [Have(self._link("HAVE", msg.src, {"have": self._summary()}, wall), addr)], ""

    def _round_within(self, now: float, seconds: float) -> None:
        """The next summary round no later than ``seconds`` from now."""
        soon = now + seconds
        if self._have_due is None or soon < self._have_due:
            self._have_due = soon

    def _haves(self, now: float, wall: float) -> list:
        self._have_due = now + HAVE_S * self._rng.uniform(*JITTER)
        have = self._summary()
        lost = any(st.lost for st in self._streams.values())
        if have != self._have_last:
            self._have_quiet = self._lost_rounds = 0
        else:
            self._have_quiet += 1
            self._lost_rounds = self._lost_rounds + 1 if lost else 0
        # Said again in the first unchanged round, in case it was lost; and, while we miss seqs we
        # gave up on, a few rounds more (a neighbour that has them answers), then quiet: an idle
        # mesh must not keep summarising.
        changed = self._have_quiet <= 1 or (lost and self._lost_rounds <= HAVE_REPEATS)
        if not have or (not changed and not self._behind):
            # Rule 8: nothing changed (and nothing to ask for), nothing said; and no round (no
            # wake-up) until something changes, which schedules one (_soon), or a long while.
            self._have_due = now + HAVE_IDLE_S * self._rng.uniform(*JITTER)
            return []
        self._have_last = have
        actions = []
        for addr, label in self._neighbours():
            left = self._behind.get(addr)
            if not changed and not left:
                continue
            if left:
                self._behind[addr] = left - 1
            actions.append(Have(self._link("HAVE", label, {"have": have}, wall), addr))
            self.counters["haves_sent"] += 1
        for a in [a for a, n in self._behind.items() if n <= 0]:
            del self._behind[a]
        return actions


def _ttl1(msg: Message) -> Optional[bytes]:
    """``msg`` as a datagram with ttl 1 (None if it cannot be encoded: never from the wire)."""
    try:
        return encode(msg._replace(ttl=1))
    except (ValueError, TypeError, RecursionError):
        return None


def _split_wants(wants: Dict[str, List[int]]) -> List[Dict[str, List[int]]]:
    """WANT fields of at most MAX_WANT_SEQS seqs and WANT_ROOM_BYTES each."""
    parts: List[Dict[str, List[int]]] = []
    part: Dict[str, List[int]] = {}
    count = size = 0
    for origin, seqs in wants.items():
        for seq in seqs:
            cost = len(str(seq)) + 1 + (0 if origin in part else 22)
            if part and (count >= MAX_WANT_SEQS or size + cost > WANT_ROOM_BYTES):
                parts.append(part)
                part, count, size = {}, 0, 0
                cost = len(str(seq)) + 23
            part.setdefault(origin, []).append(seq)
            count += 1
            size += cost
    if part:
        parts.append(part)
    return parts
