"""The flooding decision: a datagram in, a list of actions out.

Rules, so that a mesh of these (and of seed-design nodes) behaves:
1. Every datagram received ends in exactly one outcome: handled, or dropped
   for one named reason. ``handled + sum(dropped_*) == received`` always.
2. A message id is handled once. Our own ids are recorded when we send them,
   so copies that come back from the mesh are dropped as duplicates; copies
   of an id the seen cache has forgotten are refused by its ``ts`` (seen.py).
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
4. Answering costs the mesh about what asking did, whatever a datagram claims:
   a PONG goes back only to the neighbour its PING came from, and relays send
   it on along the PING's path (they remember, for a while, where each PING
   they handled came from). A PONG for a PING we never saw (it crossed a
   seed-design node, which floods PONGs, or we forgot it) is flooded, but
   under a per-node budget, as are the PONGs we originate.
5. Admission: each configured peer has its own token bucket, always; each
   stranger address has one too (past MAX_TRACKED they share one), and
   strangers together are also held to the total (``rate_limit_total``),
   which peers' datagrams draw on without ever being refused by it.
6. Nothing here touches a socket, a thread or a clock: ``now`` (monotonic
   seconds) and ``wall`` (unix seconds, for ``ts``) are arguments, so tests
   drive it with plain values. The node calls it under its one lock.
7. Observability is told, never asked: with tracing on, ``datagram_received``
   counts each datagram, its outcome and its copies per neighbour, and the
   decision points (first copy, duplicate, refusal, relayed, shown, sent,
   retried) tell ``trace.py`` in one line each. TRACE and HOP (traceroute.py)
   go only to neighbours that speak them, like PONGs back along the path.
"""

import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from .actions import Display, Notice, Pong, Send, peek as _peek, with_ttl as _with_ttl
from .bucket import new_bucket, take
from .files import LINK_KINDS as FILE_LINK_KINDS, OFFER_KIND as FILE_OFFER_KIND
from .lazypush import CAP as LAZY_CAP, KINDS as LAZY_KINDS, LazyPush
from .membership import BASE_KINDS, DEFAULT_TTL
from .private import CAP, split_plain
from .relay_delivery import DeliveryHooks
from .relay_security import SecurityHooks
from .relay_trace import TraceHooks
from .seen import SeenCache
from .trace import Trace
from .traceroute import KINDS as TRACE_KINDS, Traceroute
from .wire import Addr, Message, WireError, canonical as _canonical, decode, encode, format_addr

__all__ = ["COUNTERS", "Display", "Notice", "Pong", "Relay", "RelayConfig", "Send", "split_body"]

MAX_SEND_BYTES = 1400  # one Ethernet frame; also under macOS's 9216-byte default
PONG_INTERVAL_S = 10.0  # answer a broadcast PING from one origin at most this often
PING_TIMEOUT_S = 30.0  # forget a PING we sent after this long
PING_ANSWER_S = 10.0  # a /ping to one node not answered in this long is reported (at the next reaping)
HEARD_KEEP_S = 600.0  # /peers forgets a stranger not heard from for this long
MAX_TRACKED = 4096  # bound on per-address tables, which spoofed sources could grow
MAX_PARTS = 1000  # a line split into more parts than this is sent without part marks
LATE_COPY_S = 10.0  # how long a message that arrived with its hops spent waits for a better copy
PONG_ANSWER_PER_S = 20.0  # PONGs a node originates a second, whatever the askers claim (bursts of 2x)
PONG_FLOOD_PER_S = 20.0  # PONGs with no known way back that a node floods a second (bursts of 2x)
SEEN_FULL_NOTICE_S = 60.0  # tell the user at most this often that young ids are being forgotten

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
    "dropped_rate_total",
    "dropped_replay",
    "dropped_pong_budget",
    "dropped_not_peer",
    "dropped_other_mesh",
    "dropped_unproven",
    "dropped_own",
    "dropped_bad_signature",  # signed, but the signature does not verify (forged, or damaged)
    "dropped_key_changed",  # signed by another key than the one pinned for its origin
    "dropped_unsigned",  # --require-signed: not verified
    "dropped_impostor",  # unsigned, under the name of an origin whose key is pinned
    "dropped_bad_box",  # a private message to us that does not open (tampered, moved, not ours)
    "dropped_unverified_ack",  # an ACK from a node whose key is pinned, not signed by that key
    "dropped_no_route",  # a traceroute answer with no way back
    "dropped_internal",  # handling it raised: a bug, contained to that datagram by the node
    "dropped_unauthenticated",  # a closed mesh: not sealed under our network key (an outsider's)
    "dropped_bulk_kind",  # came on our bulk socket (node.py) but is not FGET, FDATA or FHAVE
    "received_plaintext",  # --network-key-optional: let in unsealed (also counted as received)
    "plaintext_withheld",  # sends a plaintext datagram led to, not made (nothing answers an outsider)
    "sent",
    "link_received",
    "link_sent",
    "send_errors",
    "recv_errors",
    "pongs_unanswered",
)


@dataclass(frozen=True)
class RelayConfig:
    label: str
    ttl: int = 8  # 0: adaptive, from what membership knows of the mesh
    seen_ttl_s: float = 120.0
    seen_max: int = 100_000
    max_ttl: int = 16
    max_skew_s: float = 60.0
    max_datagram: int = 8192
    rate_limit: float = 200.0
    rate_limit_total: Optional[float] = None  # all senders together; None: 10 x rate_limit; 0: no total
    peers_only: bool = False
    display: bool = True  # False (--quiet): no CHAT is displayed, so none is counted as displayed
    require_signed: bool = False  # drop every message not verified (needs a trust layer)
    trace: bool = True  # False (--no-trace): no per-message records or per-neighbour counters (trace.py)
    flood: bool = True  # False (--lazy): lazy push to neighbours that speak it (lazypush.py; needs delivery)


if TYPE_CHECKING:
    from .delivery import Delivery
    from .files import Files
    from .membership import Membership
    from .private import Private
    from .trust import Trust


# Link-local kinds that make us send (repair answers): taken only from neighbours that proved themselves.
_NEIGHBOURS_ONLY = frozenset(("WANT", "HAVE", "SINCE") + FILE_LINK_KINDS + LAZY_KINDS)
# A file chunk from a proved neighbour draws on a budget of its own, not on the chat rate limits,
# so that a transfer does not crowd out chat (and chat does not throttle a transfer to 200 chunks/s).
FILE_DATA_PER_S = 8000.0  # FDATA admitted a second from all neighbours together (bursts of 0.1 s)
_FDATA_HEAD = b'"kind":"FDATA"'


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


class Relay(SecurityHooks, DeliveryHooks, TraceHooks):
    def __init__(
        self,
        config: RelayConfig,
        peers: Iterable[Addr] = (),
        new_mid: Callable[[], str] = lambda: uuid.uuid4().hex,
        membership: "Optional[Membership]" = None,
        delivery: "Optional[Delivery]" = None,
        trust: "Optional[Trust]" = None,
        sign: Optional[Callable[[Message], Message]] = None,
        unseal: "Optional[Callable[[bytes], Optional[Tuple[bytes, bool]]]]" = None,
        private: "Optional[Private]" = None,
        files: "Optional[Files]" = None,
    ) -> None:
        self.config = config
        self.private = private  # end-to-end boxes for direct messages (private.py): seal ours, open ours
        # Signatures (trust.py): verify first copies with ``trust``, sign what we originate with ``sign``.
        self.trust = trust
        self._sign = sign
        self.replay_before_ts: Optional[float] = None  # newest ts in history at start (see _deliver)
        # A closed mesh: a datagram to (plaintext, sealed), or None if an outsider's (crypto.opener).
        self._unseal = unseal
        # Who our neighbours are, when there is a membership layer; else the configured peers, all alive.
        self.membership = membership
        self._targets_version = -1
        # Kinds that go one hop only, and who handles them: the dispatch table for link-local kinds.
        self._link_kinds: Dict[str, Callable[..., Tuple[list, str]]] = (
            {} if membership is None else {"HELLO": membership.hello_received})
        # Acks, retries, the outbox and gap repair, when there is a delivery layer (it needs membership).
        self.delivery = delivery if membership is not None else None
        self._acks_waiting: List[Tuple[Any, float]] = []
        if self.delivery is not None:
            d = self.delivery
            self._link_kinds.update(WANT=d.want_received, HAVE=d.have_received, SINCE=d.since_received)
        # File sharing (files.py): FOFFER floods like a CHAT; FGET, FDATA and FHAVE go one hop.
        self.files = files if membership is not None else None
        self._file_data = new_bucket(FILE_DATA_PER_S, 0.1)
        self._bulk = False  # the datagram being handled came on our bulk socket (bulk_received)
        self.bulk_kind = ""  # the kind bulk_received last took ("": it took none)
        if self.files is not None:
            f = self.files
            self._link_kinds.update(FGET=f.get_received, FDATA=f.data_received, FHAVE=f.have_received)
        # Lazy push (lazypush.py): which neighbours get a broadcast's payload, which an announcement.
        self.lazy: Optional[LazyPush] = None
        if self.delivery is not None and not config.flood:
            m_, d_ = membership, self.delivery
            lp = self.lazy = LazyPush(
                config.label, new_mid,
                neighbours=lambda: [(n.addr, n.label) for n in m_.neighbours.values() if n.up and LAZY_CAP in n.caps],
                known=lambda mid: mid in self.seen, fetch=d_.buffered, version=lambda: m_.version)
            self._link_kinds.update(IHAVE=lp.ihave_received, GRAFT=lp.graft_received, PRUNE=lp.prune_received)
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
        # mid of a PING we handled -> (the neighbour its first copy came from, when); oldest first
        self._ping_from: "OrderedDict[str, Tuple[Addr, float]]" = OrderedDict()
        self._buckets: Dict[tuple, List[float]] = {}  # stranger addr -> [tokens, last refill]
        self._peer_buckets: Dict[Addr, List[float]] = {}  # never shared, never pushed out
        total = config.rate_limit_total
        self._total_rate = 10.0 * config.rate_limit if total is None else total
        self._total = _full_bucket()
        self._limited = bool(config.rate_limit or self._total_rate)
        self._answers = _full_bucket()  # PONGs we originate
        self._pong_floods = _full_bucket()  # PONGs with no way back that we flood
        self._seen_full_told: Optional[float] = None
        self._skew_told: Dict[str, float] = {}
        self._spent: Dict[str, float] = {}  # mid whose first copy came with ttl 1 -> when
        # Observability: /trace's capability (with membership), and /why's and /peers' records (trace.py).
        self.traceroute = Traceroute() if membership is not None else None
        self.trace: Optional[Trace] = None
        if config.trace:
            self.trace = Trace(links=membership.peer_rows if membership is not None else None)
            self.trace.baseline(self.counters)
        # The capabilities with timers, for next_deadline (asked on every wake-up).
        self._timed = tuple(p for p in (self.membership, self.delivery, self.files, self.lazy) if p is not None)
        for addr in peers:
            self.add_peer(addr)

    def add_peer(self, addr: Addr, now: float = 0.0) -> None:
        if self.membership is not None:
            self.membership.add_configured(addr, now)
        if addr not in self._peer_set:
            self.peers.append(addr)
            self._peer_set.add(addr)
            self._peer_by_label[format_addr(addr)] = addr
            self._peer_buckets[addr] = _full_bucket()
            self._targets.clear()

    # -- receiving -----------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Addr, now: float, wall: float) -> list:
        if self._unseal is None:
            return self._traced(data, addr, now, wall)
        # First of all: an outsider's datagram touches nothing (no stranger table, no token
        # bucket: a forged neighbour address must not drain that neighbour's; no liveness).
        # Plaintext and other keys fail on an 8-byte prefix; only our key id costs an AEAD try.
        opened = self._unseal(data)
        if opened is None:
            self.counters.received += 1
            self.counters.dropped_unauthenticated += 1
            return []
        data, sealed = opened
        if not sealed:
            return self._plaintext(data, addr, now, wall)
        actions = self._traced(data, addr, now, wall)
        for i, a in enumerate(actions):
            if type(a) is Display:
                actions[i] = a._replace(sealed=True)
        return actions

    def bulk_received(self, data: bytes, addr: Addr, now: float, wall: float) -> list:
        """A datagram from a neighbour's bulk socket (node.py), ``addr`` that neighbour's main address:
        handled as if it came from there (rate limits, unsealing, caps, tracing), but only file link
        kinds are taken from it; anything else is dropped (chat has the main socket)."""
        self._bulk = True
        self.bulk_kind = ""
        try:
            return self.datagram_received(data, addr, now, wall)
        finally:
            self._bulk = False

    def _opened(self, data: bytes, addr: Addr, now: float, wall: float) -> list:
        m = self.membership
        if m is None or addr not in m.neighbours:
            return self._received(data, addr, now, wall)
        # Before the datagram itself (which may be a goodbye): anything at all from a neighbour
        # that was down brings it back, and what waits for it goes now.
        heard = m.heard(addr, now)
        if self.delivery is not None:
            label, caps = m.label_caps(addr)
            heard.extend(self.delivery.peer_heard(label, now, wall, caps))
        actions = self._received(data, addr, now, wall)
        return self._sends(heard, now, wall) + actions if heard else actions

    def _received(self, data: bytes, addr: Addr, now: float, wall: float) -> list:
        c = self.counters
        c.received += 1
        cfg = self.config
        if addr in self.heard or len(self.heard) < MAX_TRACKED:
            self.heard[addr] = now
        if cfg.peers_only and addr not in self._peer_set:
            c.dropped_not_peer += 1
            return []
        chunk = False
        if self._limited:
            chunk = self.files is not None and self._chunk_admitted(data, addr, now)
            if not chunk and not self._admit(addr, now):
                return []
        if len(data) > cfg.max_datagram:
            c.dropped_oversize += 1
            return []
        # The canonical form (most datagrams) is parsed and validated by one expression; anything
        # else the long way, a duplicate dropped by its head first. Same outcome either way (tests).
        ids = self.seen.ids
        try:
            fast = _canonical(data.decode("utf-8"))
        except UnicodeDecodeError:
            fast = None
        if fast is not None:
            msg, head = fast
            if msg.mid in ids and msg.mid not in self._spent:
                return self._duplicate(msg.mid, addr, now, wall, msg.ttl)
        else:
            mid, head = _peek(data)
            if mid is not None and mid in ids and mid not in self._spent:
                return self._duplicate(mid, addr, now, wall, int(head.group(2)) if head is not None else None)
            try:
                msg = decode(data)
            except WireError:
                c.dropped_malformed += 1
                return []
        mid, ttl, kind = msg.mid, msg.ttl, msg.kind
        if ttl <= 0:
            c.dropped_ttl += 1
            return []
        if chunk and kind != "FDATA":
            c.dropped_rate += 1  # claimed to be a chunk to jump the queue
            return []
        if self._bulk:
            if kind not in FILE_LINK_KINDS:
                c.dropped_bulk_kind += 1
                return []
            self.bulk_kind = kind
        if kind in self._link_kinds:
            c.link_received += 1
            return self._link_local(msg, addr, len(data), now, wall)
        known = mid in ids  # nothing below adds to the seen cache before seen.add
        if known and (ttl == 1 or mid not in self._spent):
            return self._duplicate(mid, addr, now, wall, ttl)
        ts = msg.ts
        # A repaired or caught-up message is old on purpose: one hop (ttl 1), and one we asked for.
        asked = ttl == 1 and ((self.delivery is not None and self.delivery.is_late(mid, ts, now)) or
                              (kind == FILE_OFFER_KIND and self.files is not None and self.files.asked_offer(msg)))
        if abs(wall - ts) > cfg.max_skew_s and not asked:
            c.dropped_stale += 1
            if self.trace is not None:
                self.trace.refused(msg, addr, "stale", now)
            return self._tell_skew(msg, now, wall)
        if known:
            if msg.dst == self.label:  # addressed to us: it has arrived, and goes no further
                c.dropped_duplicate += 1
                if self.trace is not None:
                    self.trace.duplicate(mid, addr, now)
                return []
            if self.trust is not None and self._verified(msg, now)[2]:
                return []  # a forged copy with hops left is not relayed in the real one's place
            return self._relay_late(msg, addr, data, head, now)
        if ts <= self.seen.horizon_ts and not asked:  # maybe a copy of an id we forgot: see seen.py
            c.dropped_replay += 1
            if self.trace is not None:
                self.trace.refused(msg, addr, "replay", now)
            return []
        # Judged before it takes a seen-cache slot, so a forged copy sent first cannot silence the real one.
        verified, told, dropped = self._verified(msg, now, quiet=asked)
        if dropped:
            return told
        encrypted = None
        if msg.dst == self.label and (self.private is not None or self.trust is not None):
            msg, encrypted = self._private_in(msg, verified)
            if msg is None:  # like a bad signature: before the seen cache, so it silences nothing
                return told
        self.seen.add(msg.mid, now, ts)
        if self.trace is not None:
            self.trace.first(msg, addr, now, served=asked)
        if msg.kind == "PONG" and msg.dst != self.label:
            return self._relay_pong(msg, addr, now, data, head)
        if msg.kind in TRACE_KINDS and self.traceroute is not None:
            actions = self._traceroute(msg, addr, now, wall, data, head)
        else:
            actions = self._handle(msg, addr, now, wall, data, head, verified, encrypted, served=asked)
        return told + actions if told else actions

    def _duplicate(self, mid: str, addr: Addr, now: float, wall: float, ttl: Optional[int]) -> list:
        self.counters.dropped_duplicate += 1
        if self.trace is not None:
            self.trace.duplicate(mid, addr, now)
        return self._pruned(mid, addr, now, wall, ttl)

    def _pruned(self, mid: str, addr: Addr, now: float, wall: float, ttl: Optional[int]) -> list:
        """A duplicate payload: with lazy push, the link it came on turns lazy (a PRUNE to its sender)."""
        if self.lazy is None or addr not in self.membership.neighbours:
            return []
        return self._sends(self.lazy.duplicate(mid, addr, now, wall, ttl), now, wall)

    def _link_local(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> list:
        """A one-hop message (HELLO): never flooded, never in the seen cache; its owner decides."""
        c = self.counters
        if abs(wall - msg.ts) > self.config.max_skew_s:
            c.dropped_stale += 1
            return []
        if msg.kind in _NEIGHBOURS_ONLY and not self.membership.is_up(addr):
            c.dropped_unproven += 1  # answering a forged source would make us a reflector
            return []
        out, why = self._link_kinds[msg.kind](msg, addr, size, now, wall)
        if why:
            name = "dropped_" + why
            setattr(c, name, getattr(c, name) + 1)
            return []
        c.handled += 1
        c.consumed += 1
        return self._sends(out, now, wall)

    def _handle(self, msg: Message, addr: Addr, now: float, wall: float, data: bytes,
                head: "Optional[re.Match[bytes]]", verified: Optional[bool] = None,
                encrypted: Optional[bool] = None, served: bool = False) -> list:
        c = self.counters
        c.handled += 1
        actions: list = []
        m = self.membership
        if m is not None:
            # What an unverified message says of its sender (nick, caps) is not taken where we check
            # signatures: one forged datagram must not rename a node or make a name ambiguous.
            # A copy served to us by repair or a catch-up is old, and one hop from whoever had it: what
            # its origin says of itself is learned (a PRESENCE: its name, caps, key), not its way.
            m.learn(msg, addr, now, trusted=verified is not False, age=(wall - msg.ts) if served else None)
            if addr not in m.neighbours:
                actions.extend(self._sends(m.stranger(addr, len(data), now, wall), now, wall))
        to_me = msg.dst == self.label
        kind = msg.kind
        shown = kind == "CHAT" and (to_me or msg.dst == "") and self.config.display
        late = False
        d = self.delivery
        shown_msg = msg
        if self.private is not None and kind in ("PRESENCE", "KEY"):
            actions.extend(self._key_message(msg, verified, to_me, now, wall))
        if kind == FILE_OFFER_KIND and self.files is not None:
            actions.extend(self._sends(self.files.offer_received(msg, verified, now), now, wall))
            self.files.keep_offer(msg, min(msg.ttl, self.config.max_ttl) - 1)  # for a neighbour that lost it
        if d is not None:
            shown, late, shown_msg = self._deliver(msg, addr, data, now, wall, to_me, shown, actions)
        if shown:
            actions.append(Display(shown_msg, late, verified, encrypted=encrypted))
            c.displayed += 1
            if self.trace is not None:
                self.trace.shown(msg.mid, late)
        if kind == "PING":
            if to_me or (msg.dst == "" and self._may_answer(msg.src, now)):
                actions.extend(self._answer(msg, addr, now, wall))
            if not to_me:
                ping_from = self._ping_from
                if len(ping_from) >= MAX_TRACKED:
                    ping_from.popitem(last=False)  # forged PINGs push out the oldest, not the newest
                ping_from[msg.mid] = (addr, now)
        elif kind == "PONG" and to_me:
            sent = self._pings.get(msg.body)
            self._unanswered.pop(msg.body, None)
            if sent is not None:
                actions.append(Pong(msg.src, (now - sent) * 1000.0, msg.body))
        if not to_me:
            if msg.ttl == 1 and len(self._spent) < MAX_TRACKED:
                self._spent[msg.mid] = now
            send = self._copy(msg, addr, data, head, now)
            if send is not None:
                actions.append(send)
                c.relayed += 1
                if self.trace is not None:
                    self.trace.relayed(msg.mid, send.addrs)
                return actions
        if not shown:
            c.consumed += 1
        return actions

    def _answer(self, ping: Message, addr: Addr, now: float, wall: float) -> List[Send]:
        """A PONG for ``ping``, to the neighbour it came from only: one datagram, whatever ``src`` says."""
        m = self.membership
        if m is not None and not m.may_send(addr, "PONG"):
            return []  # a seed-design neighbour knows no PONG: it would only print an error
        if not take(self._answers, PONG_ANSWER_PER_S, now):
            self.counters.pongs_unanswered += 1
            return []
        ttl = self.config.ttl or (m.ttl_for(ping.src) if m is not None else DEFAULT_TTL)
        pong = Message(self._new_mid(), wall, ttl, "PONG", self.label, ping.src, ping.mid)
        if self._sign is not None:
            pong = self._sign(pong)
        self.seen.add(pong.mid, now, wall)
        self.counters.sent += 1
        return [Send(encode(pong), (addr,))]

    def _relay_pong(self, msg: Message, addr: Addr, now: float, data: bytes,
                    head: "Optional[re.Match[bytes]]") -> list:
        """A PONG for someone else: back along its PING's path, else a flood within budget."""
        c = self.counters
        back = self._ping_from.get(msg.body)
        if back is None:
            if not take(self._pong_floods, PONG_FLOOD_PER_S, now):
                c.dropped_pong_budget += 1
                return []
            c.handled += 1
            send = self._copy(msg, addr, data, head, now)
        else:
            c.handled += 1
            ttl = min(msg.ttl, self.config.max_ttl)
            send = None
            m = self.membership
            if ttl > 1 and back[0] != addr and (m is None or m.may_send(back[0], "PONG")):
                c.sent += 1
                send = Send(_with_ttl(data, head, msg, ttl - 1), (back[0],))
        if send is None:
            c.consumed += 1
            return []
        c.relayed += 1
        if self.trace is not None:
            self.trace.relayed(msg.mid, send.addrs)
        return [send]

    def _relay_late(self, msg: Message, addr: Addr, data: bytes, head: "Optional[re.Match[bytes]]",
                    now: float) -> list:
        """A copy with hops left of a message whose first copy had none: it goes on, once."""
        del self._spent[msg.mid]
        c = self.counters
        c.handled += 1
        send = self._copy(msg, addr, data, head, now)
        if send is None:
            c.consumed += 1
            return []
        c.relayed += 1
        c.relayed_late += 1
        if self.trace is not None:
            self.trace.relayed(msg.mid, send.addrs)
        return [send]

    def _copy(self, msg: Message, addr: Addr, data: bytes, head: "Optional[re.Match[bytes]]",
              now: float) -> Optional[Send]:
        """The copy of ``msg`` for every neighbour but the sender and the origin, if hops are left.

        A direct message whose next hop is known and alive goes to that neighbour only."""
        ttl = min(msg.ttl, self.config.max_ttl)
        if ttl <= 1:
            return None
        m = self.membership
        targets = None
        if m is not None:
            if m.version != self._targets_version:
                self._targets.clear()
                self._targets_version = m.version
            if msg.dst:
                hop = m.next_hop(msg.dst, now)
                if hop is not None and hop != addr:
                    targets = (hop,)
        if targets is None:
            targets = self._flood_targets(msg, addr)
            if self.lazy is not None and msg.kind == "CHAT" and not msg.dst:
                targets = self.lazy.split(msg.mid, targets, now, msg.ttl)  # lazy links get an IHAVE instead
        if not targets:
            return None
        self.counters.sent += len(targets)
        return Send(_with_ttl(data, head, msg, ttl - 1), targets)

    def _flood_targets(self, msg: Message, addr: Addr) -> Tuple[Addr, ...]:
        m = self.membership
        if m is None:
            origin = self._peer_by_label.get(msg.src)
            key = (addr, origin, True)
        else:
            origin = m.addr_by_label.get(msg.src)
            key = (addr, origin, msg.kind in BASE_KINDS)
        targets = self._targets.get(key)
        if targets is None:
            pool = self.peers if m is None else m.flood_targets(msg.kind)
            targets = tuple(p for p in pool if p != addr and p != origin)
            if addr in self._peer_set or (m is not None and addr in m.neighbours):
                self._targets[key] = targets  # strangers could grow it: at most 2 x neighbours² entries
        return targets

    def _admit(self, addr: Addr, now: float) -> bool:
        """Whether a datagram from ``addr`` is let in; a refusal is counted by its reason.

        A configured peer needs a token from its own bucket only; it draws on the
        total too (down to minus a burst), so strangers share what peers leave.
        A stranger needs a token from its own bucket and one from the total."""
        rate = self.config.rate_limit
        total = self._total_rate
        bucket = self._peer_buckets.get(addr)
        if bucket is None and self.membership is not None and addr in self.membership.neighbours:
            # A neighbour that proved itself is admitted like a configured one (at most --max-peers).
            bucket = self._peer_buckets[addr] = _full_bucket()
        if bucket is not None:  # the hot path: written out, as bucket.take does it
            if rate:
                tokens = bucket[0] + (now - bucket[1]) * rate
                if tokens > 2.0 * rate:
                    tokens = 2.0 * rate
                bucket[1] = now
                if tokens < 1.0:
                    bucket[0] = tokens
                    self.counters.dropped_rate += 1
                    return False
                bucket[0] = tokens - 1.0
            if total:
                t = self._total
                tokens = t[0] + (now - t[1]) * total
                if tokens > 2.0 * total:
                    tokens = 2.0 * total
                t[1] = now
                t[0] = tokens - 1.0 if tokens > 1.0 - 2.0 * total else -2.0 * total
            return True
        if rate:
            bucket = self._buckets.get(addr)
            if bucket is None:
                if len(self._buckets) >= MAX_TRACKED:
                    addr = ("*", 0)  # strangers beyond the bound share one bucket
                    bucket = self._buckets.get(addr)
                if bucket is None:
                    bucket = self._buckets[addr] = _full_bucket()
            if not take(bucket, rate, now):
                self.counters.dropped_rate += 1
                return False
        if total and not take(self._total, total, now):
            self.counters.dropped_rate_total += 1
            return False
        return True

    def _chunk_admitted(self, data: bytes, addr: Addr, now: float) -> bool:
        """An FDATA (by its head) from a proved neighbour, within the chunks' own budget."""
        if data.find(_FDATA_HEAD, 0, 160) < 0:
            return False
        m = self.membership
        return m is not None and m.is_up(addr) and take(self._file_data, FILE_DATA_PER_S, now, 0.1)

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
        self, kind: str, body: str, dst: str, now: float, wall: float,
        extra: Optional[Dict[str, Any]] = None, ttl: int = 0, plain: bool = False,
    ) -> Tuple[List[Message], list]:
        """New messages from this node (see ``_originate``), their datagrams counted per neighbour."""
        messages, sends = self._originate(kind, body, dst, now, wall, extra, ttl, plain)
        return messages, self._count_out(sends)

    def _originate(
        self, kind: str, body: str, dst: str, now: float, wall: float,
        extra: Optional[Dict[str, Any]] = None, ttl: int = 0, plain: bool = False,
    ) -> Tuple[List[Message], list]:
        """New messages from this node, split so each datagram fits MAX_SEND_BYTES.

        With a delivery layer, our CHATs get stream mids (broadcasts ``<node_id>-<seq>``, direct
        messages ``<node_id>-d<n>`` asking for an ack); what it asks for comes back with the Sends.
        With end-to-end boxes, a direct CHAT is sealed part by part, or, while its destination's key
        is unknown, held and the key asked for; ``plain`` sends it in clear (marked so). The messages
        returned are as the user wrote them (the text, not the boxes)."""
        d = self.delivery if kind == "CHAT" else None
        p = self.private if kind == "CHAT" and dst else None
        if p is not None and plain:
            extra = dict(extra or {}, plain=1)
            p = None
        sealing = p is not None and p.key_of(dst) is not None
        later: list = []  # the delivery layer's actions, after the sends

        def new_mid() -> str:
            if d is None:
                return self._new_mid()
            mid, acts = d.next_direct_mid() if dst else d.next_broadcast_mid()
            later.extend(acts)
            return mid

        mid = new_mid()
        m = self.membership
        ttl = ttl or self.config.ttl or (m.ttl_for(dst) if m is not None else DEFAULT_TTL)
        fields: Dict[str, Any] = {}
        if m is not None:
            # Extension fields: the starting ttl (others learn how far we are) and our nick.
            fields["ttl0"] = ttl
            if m.nick and kind == "CHAT":
                fields["nick"] = m.nick
        if d is not None and dst:
            fields["ack"] = 1
        if extra:
            fields.update(extra)
        sign = self._sign
        if sign is not None:
            fields["key"] = fields["sig"] = ""  # sized with a signature (signed below, part by part)
        plain_msg = Message(mid, wall, ttl, kind, self.label, dst, body, fields)

        def finish(part: Message) -> Message:
            if sealing:
                part = p.seal(part)  # type: ignore[union-attr]
            return sign(part) if sign is not None else part

        msg = finish(plain_msg)
        data = encode(msg)
        if len(data) <= MAX_SEND_BYTES:
            shown, messages = [plain_msg], [msg]
        else:
            # Each piece says it is part i of n, so a lost part shows; room is kept for the largest mark.
            room = MAX_SEND_BYTES - len(encode(msg._replace(body="", extra=dict(msg.extra, part=[MAX_PARTS, MAX_PARTS]))))
            pieces = split_plain(body, room) if sealing else split_body(body, room)
            n = len(pieces)
            # n stays far below MAX_PARTS for any line the console takes (64 KiB is at most ~320 parts).
            shown = [plain_msg._replace(mid=mid if i == 0 else new_mid(), body=piece,
                                        extra=dict(fields, part=[i + 1, n]) if n <= MAX_PARTS else fields)
                     for i, piece in enumerate(pieces)]
            messages = [finish(part) for part in shown]
        # Held for want of a key: nothing goes until it is known (private.py rule 2).
        held = p is not None and not sealing
        targets = () if held else self._origin_targets(kind, dst, now)
        sends = []
        for part, plain_part in zip(messages, shown):
            self.seen.add(part.mid, now, part.ts)
            if kind == FILE_OFFER_KIND and self.files is not None:
                self.files.keep_offer(part, part.ttl)  # as signed: for a neighbour whose copy is lost
            if kind == "PING":
                self._pings[part.mid] = now
                if dst:
                    self._unanswered[part.mid] = (now, dst)
            raw = data if part is msg else encode(part)
            part_targets = targets
            if self.lazy is not None and kind == "CHAT" and not dst:
                part_targets = self.lazy.split(part.mid, targets, now)
            if self.trace is not None:
                self.trace.originated(part, part_targets, now)
            if part_targets:
                sends.append(Send(raw, part_targets))
                self.counters.sent += len(part_targets)
            if d is not None:
                if dst:
                    member = m.members.get(dst) if m is not None else None
                    later.extend(d.direct_sent(plain_part if held else part, now,
                                               member.hops if member is not None else None,
                                               m.speaks(dst, "ACK") is True, held or m.is_down(dst)))
                else:
                    d.remember(part, raw, now)
        if held:
            p.counters["held_for_key"] += len(shown)  # type: ignore[union-attr]
            p.wait_for(dst)  # type: ignore[union-attr]
            if d is None:
                later.append(Notice(f"no key for {dst} yet, and no outbox to hold the message in: not sent"))
            caps = m.caps_of(dst) if m is not None else None
            if caps is not None and CAP not in caps:
                later.append(Notice(f"{dst} announced no key for private messages (an older or seed-design "
                                    f"node, or one without the secure extra): the message is held until it "
                                    f"has one; /msg --plain NAME text sends it in clear"))
            else:
                later.append(Notice(f"no key for {dst} yet: asked for it; the message is held and goes sealed "
                                    f"once it comes (/msg --plain NAME text sends it in clear)"))
                later.extend(self._ask_key(dst, now, wall))
        if later:
            sends.extend(self._sends(later, now, wall))
        return shown, sends

    def _origin_targets(self, kind: str, dst: str, now: float) -> Tuple[Addr, ...]:
        m = self.membership
        if m is None:
            return tuple(self.peers)
        if dst:
            hop = m.next_hop(dst, now)
            if hop is not None:
                return (hop,)
        targets = m.flood_targets(kind)
        if dst:
            # A destination that is our neighbour gets it straight, even while we think it down: on a
            # bad link it may only seem so, and a retry or an ack sent nowhere can never arrive.
            own = m.addr_by_label.get(dst)
            if own is not None and own not in targets and m.may_send(own, kind):
                targets = targets + (own,)
        return targets

    # -- housekeeping ----------------------------------------------------------

    def timers_due(self, now: float, wall: float) -> list:
        """The capabilities' timers (HELLOs, liveness, presence, beacons; retries, repair), as actions."""
        if self.membership is None:
            return []
        actions = self.membership.tick(now, wall)
        if self.delivery is not None:
            actions.extend(self.delivery.tick(now, wall))
        if self.files is not None:
            actions.extend(self.files.tick(now, wall))
        if self.lazy is not None:
            actions.extend(self.lazy.tick(now, wall))
        return self._count_out(self._sends(actions, now, wall))

    def next_deadline(self) -> Optional[float]:
        """When ``timers_due`` next has something to do; None: never, until something arrives."""
        soonest = None  # asked on every wake-up of the socket thread: no list, no min()
        for part in self._timed:
            t = part.next_deadline()
            if t is not None and (soonest is None or t < soonest):
                soonest = t
        return soonest

    def expire(self, now: float) -> list:
        """Forget what is too old to matter; the reaper calls this every few seconds.

        Returns a notice for each PING to one node that got no answer in time, and the result of
        each traceroute whose target did not answer in time."""
        late = [(mid, dst) for mid, (when, dst) in self._unanswered.items() if now - when >= PING_ANSWER_S]
        for mid, _ in late:
            del self._unanswered[mid]
        notices = []
        self.seen.expire(now)
        if self.membership is not None:
            self.membership.expire(now)
        young = self.seen.young_forgotten
        if young and (self._seen_full_told is None or now - self._seen_full_told >= SEEN_FULL_NOTICE_S):
            self._seen_full_told = now
            self.seen.young_forgotten = 0
            notices.append(Notice(
                f"under a flood: {young} message ids were forgotten before --seen-ttl to stay within "
                f"--seen-max {self.config.seen_max}; messages dated before the newest forgotten one are "
                "refused (counted as dropped replay), so none is shown twice"))
        _drop_older(self._pings, now - PING_TIMEOUT_S)
        _drop_older(self._ponged, now - PONG_INTERVAL_S)
        ping_from = self._ping_from
        while ping_from and next(iter(ping_from.values()))[1] < now - PING_TIMEOUT_S:
            ping_from.popitem(last=False)
        _drop_older(self._skew_told, now - self.config.seen_ttl_s)
        _drop_older(self._spent, now - LATE_COPY_S)
        _drop_older(self.heard, now - HEARD_KEEP_S, keep=self._peer_set)
        # A bucket refills completely in 2 s, and a full bucket is the same as none.
        stale = [a for a, (_, last) in self._buckets.items() if now - last > 2.0]
        for a in stale:
            del self._buckets[a]
        if self.membership is not None:
            neighbours = self.membership.neighbours
            if self.lazy is not None:
                self.lazy.forget(neighbours.__contains__)
            for a in [a for a in self._peer_buckets if a not in self._peer_set and a not in neighbours]:
                del self._peer_buckets[a]  # a learned neighbour that was forgotten
        notices.extend(Notice(f"no answer from {dst} to our ping within {PING_ANSWER_S:g} s") for _, dst in late)
        if self.traceroute is not None:
            notices.extend(self.traceroute.expire(now))
        if self.trace is not None:
            m = self.membership
            self.trace.forget(lambda a: a in self._peer_set or (m is not None and a in m.neighbours), now,
                              HEARD_KEEP_S)
        return notices

    def housekeep(self, now: float, wall: float) -> list:
        """The delivery layer's expiry, as actions (the reaper's job, with ``expire``)."""
        if self.delivery is None:
            return []
        return self._sends(self.delivery.housekeep(now, wall), now, wall)

    def stats(self) -> Dict[str, int]:
        out = self.counters.as_dict()
        out["seen_size"] = len(self.seen)
        if self.trust is not None:
            out.update(self.trust.counters)
            out["pins"] = len(self.trust.pins)
        if self.lazy is not None:
            out.update(("lazy_" + k, v) for k, v in self.lazy.stats().items())
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




def _full_bucket() -> List[float]:
    """A token bucket [tokens, last refill] that fills up at its first use."""
    return [0.0, float("-inf")]


def _drop_older(table: dict, cutoff: float, keep: Iterable = ()) -> None:
    for key in [k for k, when in table.items() if when < cutoff and k not in keep]:
        del table[key]
