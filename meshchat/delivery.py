"""Delivery: acknowledged direct messages, the outbox, store-and-forward, and gap repair of broadcasts.

Rules, so that nothing sent is missed and nothing is shown twice:
1. Streams. Our broadcast CHATs get ``mid = "<node_id>-<seq>"``, seq 1, 2, 3, ...;
   our direct messages ``"<node_id>-d<n>"`` (a counter of their own, so relays
   see no gaps for directs they never carry). Both counters survive restarts:
   they are reserved ``SEQ_BLOCK`` ahead through the store (``MetaPut``), so a
   crash leaves at most a bounded hole, never a reused mid; ``close()`` writes
   the exact values back so a clean restart leaves none.
2. Acks. A direct CHAT of ours carries ``"ack": 1``. Its destination answers
   every copy (first and duplicates) with an ``Ack`` (kind ACK, body the
   original mid), at most one per mid per ``ACK_EVERY_S``, and shows it once:
   keyed by the original mid (``re``, or the mid before ``~``), in a bounded
   set plus the store's history (``has_message``).
3. Retries are new datagrams: mid ``"<orig>~<try>"``, extra ``re`` (and the
   original ts in ``ots``), so no seen cache on the way swallows them. The
   first after ``1 s + 0.2 s x hops``, doubling with jitter, ``TRIES`` in
   all, and only to destinations known to speak ACK: one of unknown
   capabilities gets the first try only (a seed-design node would show every
   retry). A message waiting is reported ``Undelivered(held=True)`` once (at
   once if its destination is down or unknown) and kept in the outbox.
4. Outbox. Held messages go to the store (``OutboxPut``/``OutboxDrop``), at
   most ``OUTBOX_PER_DST`` per destination (oldest dropped, reported), for
   ``hold_s``; each is sent again as a retry when its destination is heard
   from and speaks ACK (``peer_heard``), at most once per backoff interval,
   and reported ``Delivered`` when acked.
5. Store-and-forward. Direct want-ack messages we relay for a destination not
   heard from lately are kept (bounded) and handed over, as a fresh datagram
   (new mid, fresh ts, same ``re`` key), when it is heard from again, at most
   ``HANDOVERS`` times, or until its ACK passes through us.
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
9. Everything that arrives is validated field by field where it enters;
   anything malformed is dropped and counted by reason and nothing here
   raises on input. Every table is bounded.
10. Nothing here touches a socket, a thread, a clock or the disk: ``now``
   (monotonic) and ``wall`` are arguments; the node calls it under its one
   lock and drives ``tick`` from its select() timeout at ``next_deadline()``.
"""

import math
import random
import re
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple

from .bucket import new_bucket, take
from .wire import MAX_MID_CHARS, Addr, Message, WireError, decode, encode

CAPS = ("ACK", "REPAIR")  # what a HELLO should add to its caps for this layer
MAX_SEQ = 2 ** 53
SEQ_BLOCK = 64  # seqs reserved in the store at a time
SEQ_LOW = 16  # reserve more when fewer than this are left
ACK_EVERY_S = 0.5
ACKS_PER_S = 50.0  # acks a node sends a second in all (each costs a routed or flooded message)
FIRST_RETRY_S = 1.0
PER_HOP_S = 0.2
UNKNOWN_HOPS = 4
TRIES = 5
MAX_RETRY_WAIT_S = 16.0
JITTER = (0.8, 1.2)
MAX_TRYING = 1000  # direct messages waiting for an ack at once; beyond, straight to the outbox
OUTBOX_PER_DST = 100
MAX_OUTBOX = 10_000
OUTBOX_RESEND_MAX_S = 60.0
HOLD_S = 24 * 3600.0
RELAY_HOLD_MAX = 1000
RELAY_HOLD_PER_DST = 100
HANDOVERS = 3
HANDOVER_GAP_S = 10.0
DELIVERED_MAX = 10_000  # keys of direct messages shown, for "at most once" without history
ACKED_MAX = 4096  # per-mid ack rate limit entries
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
_RETRY_MID = re.compile(r"([0-9a-f]{16}-d[1-9][0-9]{0,15}x[0-9a-f]{8})~[0-9a-z]{1,16}\Z")

KINDS = ("ack", "want", "have", "since", "direct")
REASONS = ("field", "id", "seq", "count", "ts")
COUNTERS = (
    "acks_sent", "acks_rate_limited", "acks_received", "acks_unknown", "acks_relayed",
    "direct_shown", "direct_duplicate", "retries", "delivered", "undelivered", "held",
    "outbox_resent", "outbox_dropped", "outbox_expired",
    "relay_held", "relay_handed_over", "relay_held_dropped", "relay_held_expired",
    "gaps_opened", "gaps_given_up", "gaps_reopened", "repaired", "late", "wants_sent", "wants_received",
    "want_misses", "served", "served_refused", "serve_queue_dropped",
    "haves_sent", "haves_received", "since_sent", "since_received", "since_refused",
    "remembered", "seq_reserved",
) + tuple(f"dropped_{k}_{r}" for k in KINDS for r in REASONS)


# -- actions --------------------------------------------------------------------------------------

class Store(NamedTuple):
    """Hand ``item`` (one of the items below) to the store's writer."""

    item: Any


class MetaPut(NamedTuple):
    key: str  # "seq" or "dseq": the highest reserved value
    value: int


class OutboxPut(NamedTuple):
    mid: str
    dst: str
    raw: bytes  # the original datagram (decode it at start to rebuild the outbox)
    created: float  # wall
    tries: int


class OutboxDrop(NamedTuple):
    mid: str


class HeldPut(NamedTuple):
    """A direct message held for a destination on someone else's behalf."""

    mid: str  # the key (original mid)
    dst: str
    raw: bytes
    created: float  # wall


class HeldDrop(NamedTuple):
    mid: str


class Delivered(NamedTuple):
    mid: str
    dst: str
    tries: int
    rtt_ms: float  # since the latest try (which try was acked cannot be told)


class Undelivered(NamedTuple):
    mid: str
    dst: str
    tries: int
    held: bool  # True: in the outbox, will be tried again; False: given up (expired or pushed out)


class Ack(NamedTuple):
    """Originate kind ACK, dst ``dst``, body ``mid``, routed like any direct message."""

    dst: str
    mid: str


class Resend(NamedTuple):
    """Send ``message`` (our retry: fresh mid and ts) to ``dst`` like a direct message we originate."""

    message: Message
    dst: str


class Forward(NamedTuple):
    """Send ``message`` (a held copy: fresh mid and ts) to ``dst`` like a direct message we originate."""

    message: Message
    dst: str


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


@dataclass(frozen=True)
class DeliveryConfig:
    label: str
    node_id: str
    hold_s: float = HOLD_S
    catch_up_s: float = CATCH_UP_S


class OutboxItem(NamedTuple):
    """An outbox row as the store gives it back at start."""

    mid: str
    dst: str
    raw: bytes
    created: float
    tries: int


class HeldItem(NamedTuple):
    mid: str
    dst: str
    raw: bytes
    created: float


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


def direct_key(msg: Message) -> str:
    """The mid a direct message is shown once by: ``re`` (or the mid before ``~``) of a retry, else its own.

    The node should store shown direct messages under this mid, so ``has_message`` finds them."""
    re_ = msg.extra.get("re") if msg.extra else None
    if type(re_) is str and 0 < len(re_) <= MAX_MID_CHARS and msg.mid.startswith(re_ + "~"):
        return re_
    m = _RETRY_MID.match(msg.mid)  # a seed-design node on the way strips re, never the mid
    return m.group(1) if m is not None else msg.mid


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

class _Out:
    """A direct message of ours: waiting for its ack (trying), or in the outbox (held)."""

    __slots__ = ("mid", "dst", "msg", "tries", "last_at", "due", "first_wait", "ack_caps", "held")

    def __init__(self, msg: Message, tries: int, now: float, first_wait: float, ack_caps: bool) -> None:
        self.mid = msg.mid
        self.dst = msg.dst
        self.msg = msg
        self.tries = tries
        self.last_at = now
        self.due = now + first_wait
        self.first_wait = first_wait
        self.ack_caps = ack_caps
        self.held = False


class _Held:
    """A direct message kept for someone else's destination."""

    __slots__ = ("key", "msg", "created", "handovers", "due")

    def __init__(self, key: str, msg: Message, created: float) -> None:
        self.key = key
        self.msg = msg
        self.created = created
        self.handovers = 0
        self.due = float("-inf")


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


class Delivery:
    def __init__(
        self,
        config: DeliveryConfig,
        next_seq: int = 1,
        next_dseq: int = 1,
        outbox: Iterable[OutboxItem] = (),
        held: Iterable[HeldItem] = (),
        streams: Optional[Mapping[str, int]] = None,
        last_stored_ts: Optional[float] = None,
        has_message: Callable[[str], bool] = lambda mid: False,
        neighbours: Callable[[], Iterable[Tuple[Addr, str]]] = lambda: (),
        rng: Optional[random.Random] = None,
        new_mid: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        """``next_seq``/``next_dseq``: the first counters to use (the store's reserved values + 1);
        ``streams``: origin -> highest seq in history; ``last_stored_ts``: wall time of the newest
        message in history (None: nothing to catch up on); ``neighbours``: the up neighbours that
        speak REPAIR, as (addr, label)."""
        if not valid_node_id(config.node_id):
            raise ValueError("node_id must be 16 lower-case hex characters")
        self.config = config
        self.label = config.label
        self.node_id = config.node_id
        self._rng = rng or random.Random()
        self._new_mid = new_mid
        self._has_message = has_message
        self._neighbours = neighbours
        self.counters: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._seq = self._seq_reserved = max(0, next_seq - 1)
        self._dseq = self._dseq_reserved = max(0, next_dseq - 1)
        # A direct mid ends in 8 random hex digits: only a node that saw the message can acknowledge it.
        self._own_mid = re.compile(re.escape(config.node_id) + r"-d[1-9][0-9]{0,15}x[0-9a-f]{8}\Z")
        # direct messages of ours
        self._trying: Dict[str, _Out] = {}
        self._outbox: Dict[str, "OrderedDict[str, _Out]"] = {}  # dst -> mid -> held message
        self._outbox_size = 0
        self._retry_due: float = math.inf
        # direct messages to us
        self._shown: "OrderedDict[str, None]" = OrderedDict()
        self._acked: "OrderedDict[str, float]" = OrderedDict()
        self._ack_bucket = new_bucket(ACKS_PER_S, burst_s=1.0)
        # direct messages held for others
        self._held: Dict[str, "OrderedDict[str, _Held]"] = {}  # dst -> key -> held copy
        self._held_size = 0
        # broadcast streams
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
        for item in outbox:
            self._load_outbox(item)
        for item in held:
            self._load_held(item)

    # -- counters --------------------------------------------------------------------------------

    def _drop(self, kind: str, reason: str) -> None:
        self.counters[f"dropped_{kind}_{reason}"] += 1

    def stats(self) -> Dict[str, int]:
        out = dict(self.counters)
        out.update(trying=len(self._trying), outbox=self._outbox_size, relay_holding=self._held_size,
                   streams=len(self._streams), gaps=len(self._gaps), buffered=len(self._buffer),
                   serve_queue=len(self._serve_queue))
        return out

    # -- rule 1: mids ----------------------------------------------------------------------------

    def next_broadcast_mid(self) -> Tuple[str, list]:
        """The mid of our next broadcast CHAT, and store actions to reserve more seqs when due."""
        self._seq += 1
        actions = []
        if self._seq + SEQ_LOW > self._seq_reserved:
            self._seq_reserved = self._seq + SEQ_BLOCK
            self.counters["seq_reserved"] += 1
            actions.append(Store(MetaPut("seq", self._seq_reserved)))
        return f"{self.node_id}-{self._seq}", actions

    def next_direct_mid(self) -> Tuple[str, list]:
        """The mid of our next direct message, and store actions to reserve more when due."""
        self._dseq += 1
        actions = []
        if self._dseq + SEQ_LOW > self._dseq_reserved:
            self._dseq_reserved = self._dseq + SEQ_BLOCK
            self.counters["seq_reserved"] += 1
            actions.append(Store(MetaPut("dseq", self._dseq_reserved)))
        return f"{self.node_id}-d{self._dseq}x{self._rng.getrandbits(32):08x}", actions

    def close(self) -> list:
        """A clean stop: write back the counters as used, so the next run leaves no hole."""
        return [Store(MetaPut("seq", self._seq)), Store(MetaPut("dseq", self._dseq))]

    # -- rules 2-4: our direct messages ------------------------------------------------------------

    def direct_sent(self, msg: Message, now: float, hops: Optional[int], dst_caps_known_ack: bool,
                    dst_down: bool) -> list:
        """We sent direct message ``msg`` (first try, with ``"ack": 1``): track it until acked."""
        if self._own_mid.match(msg.mid) is None or not msg.dst or msg.mid in self._trying:
            return []
        hops = hops if type(hops) is int and 0 < hops <= 255 else UNKNOWN_HOPS
        o = _Out(msg, 1, now, FIRST_RETRY_S + PER_HOP_S * hops, dst_caps_known_ack)
        if dst_down or len(self._trying) >= MAX_TRYING:
            return self._hold(o, now)
        self._trying[msg.mid] = o
        self._retry_due = min(self._retry_due, o.due)
        # On disk from the first try: a crash while it is being retried must not lose it.
        return [Store(OutboxPut(o.mid, o.dst, encode(o.msg), o.msg.ts, o.tries))]

    def _retry_message(self, o: _Out, wall: float) -> Message:
        o.tries += 1
        extra = dict(o.msg.extra)
        extra["re"] = o.mid
        extra.setdefault("ots", o.msg.ts)
        return o.msg._replace(mid=f"{o.mid}~{o.tries}", ts=wall, extra=extra)

    def _hold(self, o: _Out, now: float) -> list:
        """Into the outbox: reported once, stored, sent again when the destination is heard from."""
        self._trying.pop(o.mid, None)
        o.held = True
        o.due = now  # the next peer_heard may resend at once
        self.counters["undelivered"] += 1
        box = self._outbox.get(o.dst)
        if box is None and self._outbox_size >= MAX_OUTBOX:  # full of other destinations' messages
            self.counters["outbox_dropped"] += 1
            return [Undelivered(o.mid, o.dst, o.tries, False)]
        if box is None:
            box = self._outbox[o.dst] = OrderedDict()
        actions: list = [Undelivered(o.mid, o.dst, o.tries, True)]
        while box and (len(box) >= OUTBOX_PER_DST or self._outbox_size >= MAX_OUTBOX):
            _, old = box.popitem(last=False)  # the oldest for this destination goes
            self._outbox_size -= 1
            self.counters["outbox_dropped"] += 1
            actions += [Undelivered(old.mid, old.dst, old.tries, False), Store(OutboxDrop(old.mid))]
        box[o.mid] = o
        self._outbox_size += 1
        self.counters["held"] += 1
        actions.append(Store(OutboxPut(o.mid, o.dst, encode(o.msg), o.msg.ts, o.tries)))
        return actions

    def _load_outbox(self, item: OutboxItem) -> None:
        try:
            msg = decode(item.raw)
        except (WireError, TypeError, AttributeError):
            self.counters["outbox_dropped"] += 1
            return
        if self._own_mid.match(msg.mid) is None or msg.dst != item.dst or not msg.dst:
            self.counters["outbox_dropped"] += 1
            return
        box = self._outbox.setdefault(msg.dst, OrderedDict())
        if len(box) >= OUTBOX_PER_DST or self._outbox_size >= MAX_OUTBOX:
            self.counters["outbox_dropped"] += 1
            return
        tries = item.tries if type(item.tries) is int and 0 < item.tries < 10_000 else 1
        o = _Out(msg, tries, 0.0, FIRST_RETRY_S + PER_HOP_S * UNKNOWN_HOPS, False)
        o.held = True
        o.due = -math.inf
        box[msg.mid] = o
        self._outbox_size += 1

    def ack_received(self, msg: Message, now: float) -> list:
        """An ACK addressed to us: the direct message it names is delivered."""
        mid = msg.body
        if msg.kind != "ACK" or type(mid) is not str or self._own_mid.match(mid) is None:
            self._drop("ack", "id")
            return []
        self.counters["acks_received"] += 1
        o = self._trying.pop(mid, None)
        actions: list = [Store(OutboxDrop(mid))] if o is not None else []
        if o is None:
            box = self._outbox.get(msg.src) if msg.src else None
            o = box.pop(mid, None) if box is not None else None
            if o is None:
                for dst, b in self._outbox.items():  # the ACK's src may be written differently
                    o = b.pop(mid, None)
                    if o is not None:
                        box = b
                        break
            if o is None:
                self.counters["acks_unknown"] += 1  # an ack for a copy already acked
                return []
            self._outbox_size -= 1
            if not box:
                self._outbox.pop(o.dst, None)
            actions.append(Store(OutboxDrop(mid)))
        self.counters["delivered"] += 1
        return [Delivered(mid, o.dst, o.tries, round(max(0.0, now - o.last_at) * 1000.0, 1))] + actions

    def peer_heard(self, label: str, now: float, wall: float, caps: Optional[Iterable[str]]) -> list:
        """Anything from ``label`` (as neighbour, HELLO, PRESENCE, a CHAT it sent): hand over what waits for it."""
        box = self._outbox.get(label)
        held = self._held.get(label)
        if box is None and held is None:
            return []
        if caps is None or "ACK" not in caps:
            return []  # a seed-design node would show every copy
        actions: list = []
        if box is not None:
            for o in box.values():
                if now >= o.due:
                    actions.append(Resend(self._retry_message(o, wall), o.dst))
                    o.last_at = now
                    wait = min(o.first_wait * 2.0 ** min(o.tries, 16), OUTBOX_RESEND_MAX_S)
                    o.due = now + wait * self._rng.uniform(*JITTER)
                    self.counters["outbox_resent"] += 1
        if held is not None:
            for h in list(held.values()):
                if now >= h.due:
                    actions.append(Forward(self._handover_message(h, wall), label))
                    h.handovers += 1
                    h.due = now + HANDOVER_GAP_S * 2 ** (h.handovers - 1)
                    self.counters["relay_handed_over"] += 1
                    if h.handovers >= HANDOVERS:
                        del held[h.key]
                        self._held_size -= 1
                        actions.append(Store(HeldDrop(h.key)))
            if not held:
                del self._held[label]
        return actions

    def due_now(self, dst: str) -> None:
        """What waits in the outbox for ``dst`` may go at its next chance (its key just came: private.py)."""
        for o in self._outbox.get(dst, {}).values():
            o.due = -math.inf

    # -- rule 2: direct messages to us -------------------------------------------------------------

    def direct_received(self, msg: Message, now: float) -> Tuple[bool, list]:
        """A direct CHAT addressed to us (the relay accepted its mid): show it?, and the ack to send."""
        key = direct_key(msg)
        extra = msg.extra or {}
        if "re" in extra and key != extra.get("re"):
            self._drop("direct", "field")
        show = key not in self._shown and not (self._has_message(key) or
                                                 (key != msg.mid and self._has_message(msg.mid)))
        if show:
            self._shown[key] = None
            if len(self._shown) > DELIVERED_MAX:
                self._shown.popitem(last=False)
            self.counters["direct_shown"] += 1
        else:
            self.counters["direct_duplicate"] += 1
        want = extra.get("ack")
        if want is None:
            return show, []
        if type(want) is not int or want != 1 or not msg.src:
            self._drop("direct", "field")
            return show, []
        last = self._acked.get(key)
        if (last is not None and now - last < ACK_EVERY_S) or not take(self._ack_bucket, ACKS_PER_S, now, burst_s=1.0):
            self.counters["acks_rate_limited"] += 1  # per message, and in all: forged DMs flood no ACKs
            return show, []
        self._acked[key] = now
        self._acked.move_to_end(key)
        if len(self._acked) > ACKED_MAX:
            self._acked.popitem(last=False)
        self.counters["acks_sent"] += 1
        return show, [Ack(msg.src, key)]

    # -- rule 5: store-and-forward ------------------------------------------------------------------

    def relayed_direct(self, msg: Message, data: bytes, now: float, wall: float, dst_recently_heard: bool) -> list:
        """A direct want-ack CHAT for someone else passed through us (or could not): keep it if its
        destination has not been heard from lately."""
        if (dst_recently_heard or msg.kind != "CHAT" or not msg.dst or msg.dst == self.label
                or msg.src == self.label or type((msg.extra or {}).get("ack")) is not int
                or msg.extra["ack"] != 1):
            return []
        key = direct_key(msg)
        box = self._held.get(msg.dst)
        if box is not None and key in box:
            return []
        actions: list = []
        if box is None:
            box = self._held[msg.dst] = OrderedDict()
        while box and (len(box) >= RELAY_HOLD_PER_DST or self._held_size >= RELAY_HOLD_MAX):
            old, _ = box.popitem(last=False)
            self._held_size -= 1
            self.counters["relay_held_dropped"] += 1
            actions.append(Store(HeldDrop(old)))
        if self._held_size >= RELAY_HOLD_MAX:
            self.counters["relay_held_dropped"] += 1
            if not box:
                del self._held[msg.dst]
            return actions
        box[key] = _Held(key, msg, wall)
        self._held_size += 1
        self.counters["relay_held"] += 1
        actions.append(Store(HeldPut(key, msg.dst, data, wall)))
        return actions

    def _load_held(self, item: HeldItem) -> None:
        try:
            msg = decode(item.raw)
        except (WireError, TypeError, AttributeError):
            self.counters["relay_held_dropped"] += 1
            return
        box = self._held.setdefault(msg.dst, OrderedDict()) if msg.dst else None
        if box is None or len(box) >= RELAY_HOLD_PER_DST or self._held_size >= RELAY_HOLD_MAX:
            self.counters["relay_held_dropped"] += 1
            return
        created = item.created if type(item.created) is float else 0.0
        box[direct_key(msg)] = _Held(direct_key(msg), msg, created)
        self._held_size += 1

    def _handover_message(self, h: _Held, wall: float) -> Message:
        extra = dict(h.msg.extra)
        sig = extra.pop("sig", None)
        if sig is not None:
            # The origin's signature covers the mid and ts it signed, which a hand-over changes: it
            # travels as ``osig`` with them (``hmid``, ``hts``), so the destination still checks it
            # (trust.py rule 6).
            extra.update(osig=sig, hmid=h.msg.mid, hts=h.msg.ts)
        extra["re"] = h.key
        extra.setdefault("ots", h.msg.ts)
        mid = f"{h.key}~h{self._rng.getrandbits(32):x}"
        return h.msg._replace(mid=mid, ts=wall, extra=extra)

    def ack_relayed(self, msg: Message) -> list:
        """An ACK for someone else passed through us: its message needs no hand-over."""
        self.counters["acks_relayed"] += 1
        box = self._held.get(msg.src)
        if box is None or type(msg.body) is not str or msg.body not in box:
            return []
        del box[msg.body]
        self._held_size -= 1
        if not box:
            del self._held[msg.src]
        return [Store(HeldDrop(msg.body))]

    # -- rule 6: gaps ---------------------------------------------------------------------------------

    def in_history(self, mid: str) -> bool:
        """Whether ``mid`` was shown or sent before (in this run's store, or an earlier run's)."""
        return self._has_message(mid)

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
            if msg.kind != "CHAT" or msg.dst:
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

    def neighbour_up(self, addr: Addr, label: str, now: float, wall: float) -> list:
        """A repair-speaking neighbour came up: a HAVE at once, and a SINCE if we restarted with history;
        and a direct message for it still being retried goes at the next tick, not after its backoff."""
        actions: list = []
        for o in self._trying.values():
            if o.dst == label and o.due > now:
                o.due = now
                self._retry_due = now
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

    # -- timers -----------------------------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> list:
        actions: list = []
        if now >= self._retry_due:
            actions.extend(self._retries(now, wall))
        if now >= self._gap_due:
            actions.extend(self._ask(now, wall))
        if self._have_due is None:
            self._have_due = now + HAVE_S * self._rng.uniform(*JITTER)
        elif now >= self._have_due:
            actions.extend(self._haves(now, wall))
        if self._serve_queue:
            actions.extend(self._drain(now))
        return actions

    def _retries(self, now: float, wall: float) -> list:
        actions: list = []
        for o in [o for o in self._trying.values() if o.due <= now]:
            if o.ack_caps and o.tries < TRIES:
                actions.append(Resend(self._retry_message(o, wall), o.dst))
                o.last_at = now
                wait = min(o.first_wait * 2.0 ** (o.tries - 1), MAX_RETRY_WAIT_S)
                o.due = now + wait * self._rng.uniform(*JITTER)
                self.counters["retries"] += 1
            else:
                actions.extend(self._hold(o, now))
        self._retry_due = min((o.due for o in self._trying.values()), default=math.inf)
        return actions

    def housekeep(self, now: float, wall: float) -> list:
        """Expiry (the outbox past --hold-hours, held messages, old buffers and marks): the reaper's job.

        Run by the node's reaper every few seconds, not from ``tick``: a timer of its own would wake
        every idle node's socket thread every few seconds for nothing."""
        actions: list = []
        buf = self._buffer
        while buf and next(iter(buf.values()))[0] < now - BUFFER_S:
            buf.popitem(last=False)
        hold = self.config.hold_s
        for dst, box in list(self._outbox.items()):
            for o in [o for o in box.values() if wall - o.msg.ts > hold]:
                del box[o.mid]
                self._outbox_size -= 1
                self.counters["outbox_expired"] += 1
                actions += [Undelivered(o.mid, o.dst, o.tries, False), Store(OutboxDrop(o.mid))]
            if not box:
                del self._outbox[dst]
        for dst, held in list(self._held.items()):
            for h in [h for h in held.values() if wall - h.created > hold]:
                del held[h.key]
                self._held_size -= 1
                self.counters["relay_held_expired"] += 1
                actions.append(Store(HeldDrop(h.key)))
            if not held:
                del self._held[dst]
        acked = self._acked
        while acked and next(iter(acked.values())) < now - ACK_EVERY_S:
            acked.popitem(last=False)
        for a in [a for a, t in self._since_answered.items() if now - t >= SINCE_EVERY_S]:
            del self._since_answered[a]
        for a in [a for a, t in self._have_replied.items() if now - t >= HAVE_REPLY_S]:
            del self._have_replied[a]
        for st in self._streams.values():
            if st.lost:  # nobody holds it in memory any longer: stop asking
                st.lost = {s: t for s, t in st.lost.items() if now - t < BUFFER_S}
        return actions

    def next_deadline(self) -> Optional[float]:
        times = [self._retry_due, self._gap_due]
        times.append(0.0 if self._have_due is None else self._have_due)  # not started: at once
        if self._serve_queue:
            tokens, last = self._bucket
            times.append(last + max(0.0, 1.0 - tokens) / SERVE_PER_S)
        t = min(times)
        return None if t == math.inf else t


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
