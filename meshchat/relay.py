"""The flooding decision: a datagram in, a list of actions out.

Rules, so that a mesh of these (and of seed-design nodes) behaves:
1. Every datagram received ends in exactly one outcome: handled, or dropped
   for one named reason. ``handled + sum(dropped_*) == received`` always.
2. A message id is handled once. Our own ids are recorded when we send them,
   so copies that come back from the mesh are dropped as duplicates.
3. A message is displayed when ``dst`` is empty or our label; a copy with
   ``ttl - 1`` goes to every peer except the one it came from and its origin,
   while ``ttl - 1 > 0``. A message addressed to us has arrived and goes no
   further. So ``ttl`` N reaches exactly N hops: when the first copy of a
   message came the long way round and arrived with its hops spent (ttl 1),
   a later copy with hops left is relayed (never shown again), so nodes
   beyond us within reach of the origin are not cut off by that race. (Doing
   the same for ttl 2 closes the race one hop further, but cost 8% more
   datagrams in the benchmark's busy 50-node mesh: a few hops of slack in
   ``--ttl`` is cheaper.)
4. Nothing here touches a socket, a thread or a clock: ``now`` (monotonic
   seconds) and ``wall`` (unix seconds, for ``ts``) are arguments, so tests
   drive it with plain values. The node calls it under its one lock.
"""

import re
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from .seen import SeenCache
from .wire import MAX_MID_CHARS, Addr, Message, WireError, decode, encode, format_addr

MAX_SEND_BYTES = 1400  # one Ethernet frame; also under macOS's 9216-byte default
PONG_INTERVAL_S = 10.0  # answer a broadcast PING from one origin at most this often
PING_TIMEOUT_S = 30.0  # forget a PING we sent after this long
PING_ANSWER_S = 10.0  # a /ping to one node not answered in this long is reported (at the next reaping)
HEARD_KEEP_S = 600.0  # /peers forgets a stranger not heard from for this long
MAX_TRACKED = 4096  # bound on per-address tables, which spoofed sources could grow
LATE_COPY_S = 10.0  # how long a message that arrived with its hops spent waits for a better copy

COUNTERS = (
    "received",
    "handled",
    "displayed",
    "relayed",
    "relayed_late",
    "consumed",
    "dropped_malformed",
    "dropped_oversize",
    "dropped_duplicate",
    "dropped_stale",
    "dropped_ttl",
    "dropped_rate",
    "dropped_not_peer",
    "dropped_internal",  # handling it raised: a bug, contained to that datagram by the node
    "sent",
    "send_errors",
    "recv_errors",
)


class Send(NamedTuple):
    """Send ``data`` to each of ``addrs``."""

    data: bytes
    addrs: Tuple[Addr, ...]


class Display(NamedTuple):
    """Show ``message`` to the user."""

    message: Message


class Pong(NamedTuple):
    """A PONG answered our PING ``mid`` from ``src`` after ``rtt_ms``."""

    src: str
    rtt_ms: float
    mid: str


class Notice(NamedTuple):
    """Something the node tells its user."""

    text: str


@dataclass(frozen=True)
class RelayConfig:
    label: str
    ttl: int = 8
    seen_ttl_s: float = 120.0
    seen_max: int = 100_000
    max_ttl: int = 16
    max_skew_s: float = 60.0
    max_datagram: int = 8192
    rate_limit: float = 200.0
    peers_only: bool = False


class Counters:
    __slots__ = COUNTERS

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


# The head of a datagram as wire.encode (and the seed design) writes it. It lets
# a duplicate be dropped before decoding, and a copy be made by rewriting the
# ttl digits in place, leaving every other byte (unknown fields too) as it came.
_HEAD = re.compile(rb'\{"mid":"([^"\\]{1,%d})","ts":[-+.0-9eE]{1,40},"ttl":(-?[0-9]{1,30}),' % (4 * MAX_MID_CHARS))


def _peek(data: bytes) -> "Tuple[Optional[str], Optional[re.Match[bytes]]]":
    """The mid of a datagram in the usual compact form, and its head, without decoding it all."""
    head = _HEAD.match(data)
    if head is None:
        return None, None
    try:
        return head.group(1).decode("utf-8"), head
    except UnicodeDecodeError:
        return None, None


# Any later key that JSON could read as "ttl": written plainly, with escapes
# ("\u0074tl"), or with whitespace before its colon.
_TTL_KEY = re.compile(rb'"(?:t|\\u0074)(?:t|\\u0074)(?:l|\\u006[cC])"[ \t\n\r]*:')


def _with_ttl(data: bytes, head: "Optional[re.Match[bytes]]", msg: Message, ttl: int) -> bytes:
    """``data`` with ``ttl``: the digits rewritten in place when that is exact, else encoded anew."""
    # Exact only if the head's ttl is the one JSON decoded and no other "ttl" key
    # (a duplicate key, escaped or not, or one in a nested unknown field) could be
    # taken for it. Otherwise encode what decode validated, which always encodes.
    if head is not None and int(head.group(2)) == msg.ttl and _TTL_KEY.search(data, head.end()) is None:
        start, end = head.span(2)
        return b"%s%d%s" % (data[:start], ttl, data[end:])
    return encode(msg._replace(ttl=ttl))


def _escaped_len(ch: str) -> int:
    """Bytes ``ch`` takes inside a JSON string as ``wire.encode`` writes it."""
    o = ord(ch)
    if 0x20 <= o < 0x7F:
        return 2 if ch in '"\\' else 1
    if ch in "\n\r\t\b\f":
        return 2
    return 12 if o > 0xFFFF else 6


def split_body(body: str, room: int) -> List[str]:
    """Cut ``body`` on character boundaries into pieces that each encode in ``room`` bytes."""
    pieces: List[str] = []
    start, size = 0, 0
    for i, ch in enumerate(body):
        n = _escaped_len(ch)
        if size + n > room and i > start:
            pieces.append(body[start:i])
            start, size = i, 0
        size += n
    pieces.append(body[start:])
    return pieces


class Relay:
    def __init__(
        self,
        config: RelayConfig,
        peers: Iterable[Addr] = (),
        new_mid: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.config = config
        self.label = config.label
        self.seen = SeenCache(config.seen_ttl_s, config.seen_max)
        self.counters = Counters()
        self._new_mid = new_mid
        self.peers: List[Addr] = []
        self._peer_set: Set[Addr] = set()
        self._peer_by_label: Dict[str, Addr] = {}
        self._targets: Dict[Tuple[Addr, Optional[Addr]], Tuple[Addr, ...]] = {}  # (sender, origin) ->
        self.heard: Dict[Addr, float] = {}
        self._pings: Dict[str, float] = {}  # mid of a PING we sent -> when
        self._unanswered: Dict[str, Tuple[float, str]] = {}  # mid of a PING to one node -> (when, dst)
        self._ponged: Dict[str, float] = {}  # origin of a broadcast PING -> when we answered
        self._buckets: Dict[tuple, List[float]] = {}  # addr, or ("PONG", origin) -> [tokens, last refill]
        self._skew_told: Dict[str, float] = {}
        self._spent: Dict[str, float] = {}  # mid whose first copy came with ttl 1 -> when
        for addr in peers:
            self.add_peer(addr)

    def add_peer(self, addr: Addr) -> None:
        if addr not in self._peer_set:
            self.peers.append(addr)
            self._peer_set.add(addr)
            self._peer_by_label[format_addr(addr)] = addr
            self._targets.clear()

    # -- receiving -----------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Addr, now: float, wall: float) -> list:
        c = self.counters
        c.received += 1
        cfg = self.config
        if addr in self.heard or len(self.heard) < MAX_TRACKED:
            self.heard[addr] = now
        if cfg.peers_only and addr not in self._peer_set:
            c.dropped_not_peer += 1
            return []
        if cfg.rate_limit and not self._take_token(addr, now):
            c.dropped_rate += 1
            return []
        if len(data) > cfg.max_datagram:
            c.dropped_oversize += 1
            return []
        mid, head = _peek(data)
        if mid is not None and mid in self.seen and mid not in self._spent:
            c.dropped_duplicate += 1
            return []
        try:
            msg = decode(data)
        except WireError:
            c.dropped_malformed += 1
            return []
        if msg.ttl <= 0:
            c.dropped_ttl += 1
            return []
        if msg.mid in self.seen and (msg.ttl == 1 or msg.mid not in self._spent):
            c.dropped_duplicate += 1
            return []
        if abs(wall - msg.ts) > cfg.max_skew_s:
            c.dropped_stale += 1
            return self._tell_skew(msg, now, wall)
        if msg.mid in self.seen:
            if msg.dst == self.label:  # addressed to us: it has arrived, and goes no further
                c.dropped_duplicate += 1
                return []
            return self._relay_late(msg, addr, data, head)
        self.seen.add(msg.mid, now)
        return self._handle(msg, addr, now, wall, data, head)

    def _handle(self, msg: Message, addr: Addr, now: float, wall: float, data: bytes,
                head: "Optional[re.Match[bytes]]") -> list:
        c = self.counters
        c.handled += 1
        actions: list = []
        to_me = msg.dst == self.label
        kind = msg.kind
        shown = kind == "CHAT" and (to_me or msg.dst == "")
        if shown:
            actions.append(Display(msg))
            c.displayed += 1
        if kind == "PING":
            if to_me or (msg.dst == "" and self._may_answer(msg.src, now)):
                # Replies cost us a flood each: limited per asker like datagrams per neighbour.
                if not self.config.rate_limit or self._take_token(("PONG", msg.src), now):
                    actions.extend(self.originate("PONG", msg.mid, msg.src, now, wall)[1])
        elif kind == "PONG" and to_me:
            sent = self._pings.get(msg.body)
            self._unanswered.pop(msg.body, None)
            if sent is not None:
                actions.append(Pong(msg.src, (now - sent) * 1000.0, msg.body))
        if not to_me:
            if msg.ttl == 1 and len(self._spent) < MAX_TRACKED:
                self._spent[msg.mid] = now
            send = self._copy(msg, addr, data, head)
            if send is not None:
                actions.append(send)
                c.relayed += 1
                return actions
        if not shown:
            c.consumed += 1
        return actions

    def _relay_late(self, msg: Message, addr: Addr, data: bytes, head: "Optional[re.Match[bytes]]") -> list:
        """A copy with hops left of a message whose first copy had none: it goes on, once."""
        del self._spent[msg.mid]
        c = self.counters
        c.handled += 1
        send = self._copy(msg, addr, data, head)
        if send is None:
            c.consumed += 1
            return []
        c.relayed += 1
        c.relayed_late += 1
        return [send]

    def _copy(self, msg: Message, addr: Addr, data: bytes, head: "Optional[re.Match[bytes]]") -> Optional[Send]:
        """The copy of ``msg`` for every peer but the sender and the origin, if hops are left."""
        ttl = min(msg.ttl, self.config.max_ttl)
        if ttl <= 1:
            return None
        origin = self._peer_by_label.get(msg.src)
        key = (addr, origin)
        targets = self._targets.get(key)
        if targets is None:
            targets = tuple(p for p in self.peers if p != addr and p != origin)
            if addr in self._peer_set:  # strangers could grow it: at most peers² entries
                self._targets[key] = targets
        if not targets:
            return None
        self.counters.sent += len(targets)
        return Send(_with_ttl(data, head, msg, ttl - 1), targets)

    def _take_token(self, key: tuple, now: float) -> bool:
        """A token bucket per key: ``rate_limit`` a second, bursts of twice that."""
        rate = self.config.rate_limit
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED:
                key = ("*", 0)  # strangers beyond the bound share one bucket
                bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = [2.0 * rate, now]
        tokens = min(2.0 * rate, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _may_answer(self, origin: str, now: float) -> bool:
        last = self._ponged.get(origin)
        if last is not None and now - last < PONG_INTERVAL_S:
            return False
        if len(self._ponged) < MAX_TRACKED or last is not None:
            self._ponged[origin] = now
        return True

    def _tell_skew(self, msg: Message, now: float, wall: float) -> list:
        if msg.src in self._skew_told or len(self._skew_told) >= MAX_TRACKED:
            return []
        self._skew_told[msg.src] = now
        ahead = msg.ts - wall
        way = "ahead of" if ahead > 0 else "behind"
        return [
            Notice(
                f"clock of {msg.src} is {abs(ahead):.0f} s {way} ours; its messages are "
                f"dropped (limit {self.config.max_skew_s:g} s)"
            )
        ]

    # -- sending -------------------------------------------------------------

    def originate(
        self, kind: str, body: str, dst: str, now: float, wall: float
    ) -> Tuple[List[Message], List[Send]]:
        """New messages from this node, split so each datagram fits MAX_SEND_BYTES."""
        mid = self._new_mid()
        msg = Message(mid, wall, self.config.ttl, kind, self.label, dst, body)
        data = encode(msg)
        if len(data) <= MAX_SEND_BYTES:
            messages = [msg]
        else:
            room = MAX_SEND_BYTES - len(encode(msg._replace(body="")))
            pieces = split_body(body, room)
            messages = [msg._replace(mid=mid if i == 0 else self._new_mid(), body=p) for i, p in enumerate(pieces)]
        sends = []
        for m in messages:
            self.seen.add(m.mid, now)
            if kind == "PING":
                self._pings[m.mid] = now
                if dst:
                    self._unanswered[m.mid] = (now, dst)
            if self.peers:
                sends.append(Send(data if m is msg else encode(m), tuple(self.peers)))
                self.counters.sent += len(self.peers)
        return messages, sends

    # -- housekeeping ----------------------------------------------------------

    def expire(self, now: float) -> List[Notice]:
        """Forget what is too old to matter; the reaper calls this every few seconds.

        Returns a notice for each PING to one node that got no answer in time."""
        late = [(mid, dst) for mid, (when, dst) in self._unanswered.items() if now - when >= PING_ANSWER_S]
        for mid, _ in late:
            del self._unanswered[mid]
        self.seen.expire(now)
        _drop_older(self._pings, now - PING_TIMEOUT_S)
        _drop_older(self._ponged, now - PONG_INTERVAL_S)
        _drop_older(self._skew_told, now - self.config.seen_ttl_s)
        _drop_older(self._spent, now - LATE_COPY_S)
        _drop_older(self.heard, now - HEARD_KEEP_S, keep=self._peer_set)
        # A bucket refills completely in 2 s, and a full bucket is the same as none.
        stale = [a for a, (_, last) in self._buckets.items() if now - last > 2.0]
        for a in stale:
            del self._buckets[a]
        return [Notice(f"no answer from {dst} to our ping within {PING_ANSWER_S:g} s") for _, dst in late]

    def stats(self) -> Dict[str, int]:
        out = self.counters.as_dict()
        out["seen_size"] = len(self.seen)
        return out

    def peer_table(self, now: float) -> List[Tuple[str, bool, Optional[float]]]:
        """(address, configured, seconds since last heard or None) for /peers."""
        rows = []
        for addr in self.peers:
            last = self.heard.get(addr)
            rows.append((format_addr(addr), True, None if last is None else now - last))
        for addr, last in self.heard.items():
            if addr not in self.peers:
                rows.append((format_addr(addr), False, now - last))
        return rows


def _drop_older(table: dict, cutoff: float, keep: Iterable = ()) -> None:
    for key in [k for k, when in table.items() if when < cutoff and k not in keep]:
        del table[key]
