"""Delivery: acknowledged direct messages, the outbox, store-and-forward; with repair.py, gap repair.

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
6.-8. Gaps, serving and summaries of broadcasts: ``repair.py`` (the ``Repair`` mixin this
   class is built with; its module says the rules).
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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple

from .bucket import new_bucket, take
from .repair import CATCH_UP_S, JITTER, Repair, valid_node_id
from .wire import MAX_MID_CHARS, Addr, Message, WireError, decode, encode

CAPS = ("ACK", "REPAIR")  # what a HELLO should add to its caps for this layer
SEQ_BLOCK = 64  # seqs reserved in the store at a time
SEQ_LOW = 16  # reserve more when fewer than this are left
ACK_EVERY_S = 0.5
ACKS_PER_S = 50.0  # acks a node sends a second in all (each costs a routed or flooded message)
FIRST_RETRY_S = 1.0
PER_HOP_S = 0.2
UNKNOWN_HOPS = 4
TRIES = 5
MAX_RETRY_WAIT_S = 16.0
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

def direct_key(msg: Message) -> str:
    """The mid a direct message is shown once by: ``re`` (or the mid before ``~``) of a retry, else its own.

    The node should store shown direct messages under this mid, so ``has_message`` finds them."""
    re_ = msg.extra.get("re") if msg.extra else None
    if type(re_) is str and 0 < len(re_) <= MAX_MID_CHARS and msg.mid.startswith(re_ + "~"):
        return re_
    m = _RETRY_MID.match(msg.mid)  # a seed-design node on the way strips re, never the mid
    return m.group(1) if m is not None else msg.mid


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


class Delivery(Repair):
    """Rules 1-5 here, 6-8 from ``Repair``: one object per node, driven by relay.py and node.py."""

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
        self._init_repair(streams, last_stored_ts)
        for item in outbox:
            self._load_outbox(item)
        for item in held:
            self._load_held(item)

    # -- counters --------------------------------------------------------------------------------

    def _drop(self, kind: str, reason: str) -> None:
        self.counters[f"dropped_{kind}_{reason}"] += 1

    def stats(self) -> Dict[str, int]:
        out = dict(self.counters)
        out.update(trying=len(self._trying), outbox=self._outbox_size, relay_holding=self._held_size)
        out.update(self._repair_sizes())
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

    # -- both halves -----------------------------------------------------------------------------------

    def in_history(self, mid: str) -> bool:
        """Whether ``mid`` was shown or sent before (in this run's store, or an earlier run's)."""
        return self._has_message(mid)

    def neighbour_up(self, addr: Addr, label: str, now: float, wall: float) -> list:
        """A repair-speaking neighbour came up: a HAVE at once, and a SINCE if we restarted with history;
        and a direct message for it still being retried goes at the next tick, not after its backoff."""
        actions: list = []
        for o in self._trying.values():
            if o.dst == label and o.due > now:
                o.due = now
                self._retry_due = now
        actions.extend(self._repair_up(addr, label, now, wall))
        return actions

    # -- timers -----------------------------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> list:
        actions: list = []
        if now >= self._retry_due:
            actions.extend(self._retries(now, wall))
        actions.extend(self._repair_tick(now, wall))
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
        self._repair_housekeep(now)
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
        return actions

    def next_deadline(self) -> Optional[float]:
        t = min(self._retry_due, self._repair_deadline())
        return None if t == math.inf else t

