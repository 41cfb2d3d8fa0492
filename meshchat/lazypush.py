"""Lazy push (Plumtree): which neighbours get a broadcast's payload at once, and which only hear of it.

Rules (after Leitao, Pereira, Rodrigues, "Epidemic Broadcast Trees", 2007):
1. Only broadcast CHATs with a stream mid (``<node_id>-<seq>``, delivery.py) are pushed lazily;
   everything else floods as before. Only neighbours that said ``LAZY`` in their HELLO caps can
   be lazy links; seed-design neighbours and older nodes get every payload (plain flooding).
2. Every link starts eager. A payload that arrives as a duplicate on an eager link makes that
   link lazy on our side, and a ``PRUNE`` tells the sender to do the same (again, at most once
   per ``PRUNE_AGAIN_S``, if its copies keep coming: a PRUNE can be lost). Two departures from
   the paper, for latency with one tree for all origins: a node keeps ``MIN_EAGER`` eager links,
   and a duplicate that came no longer a way (in hops) than the first copy prunes nothing. A pure
   spanning tree carried 66% fewer payloads than flooding in the 50-node degree-4 mesh, but its
   paths are twice as long (p50 latency 2.0x flooding's); with these, 42-46% fewer at 1.44-1.47x.
3. A lazy link gets an announcement instead: an ``IHAVE`` ``{node_id: [seq, ...]}``, batched per
   link for ``IHAVE_BATCH_S``. A node told of a message it lacks waits ``GRAFT_WAIT_S`` (the tree
   may still bring it), then sends a ``GRAFT`` for it to the first announcer, which turns that
   link eager on both sides and answers with the payload (the copy it would have pushed, so it
   goes on down the grafting node's own eager links). Unanswered, the next announcer is asked,
   ``GRAFT_TRIES`` in all; then delivery's gap repair (WANT/HAVE) is still there.
4. One tree for every origin (``per_origin=False``): the benchmark's broadcasts come from many
   origins, about one message each, and a per-origin tree would flood every origin's first
   message (see docs/scaling.md for the figures). ``per_origin=True`` keeps one per origin
   (at most ``MAX_TREES``, least recently used forgotten).
5. Sans-I/O: ``now`` and ``wall`` are arguments; it returns ``Link`` (an announcement, a graft,
   a prune) and ``Push`` (a payload) actions; the relay calls it under the node's lock. Every
   table is bounded: links by the neighbours up, missing messages by ``MAX_MISSING``, pending
   announcements by ``MAX_IHAVE_SEQS`` a link, graft answers by a token bucket.
"""

from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple

from .bucket import take
from .repair import parse_want, stream_of, valid_node_id
from .wire import Addr, Message, encode

CAP = "LAZY"
KINDS = ("IHAVE", "GRAFT", "PRUNE")
IHAVE_BATCH_S = 0.02  # announcements to one link wait this long for company
GRAFT_WAIT_S = 0.04  # after an announcement, how long the payload may still come by the tree
GRAFT_AGAIN_S = 0.25  # an unanswered GRAFT: the next announcer is asked after this
GRAFT_TRIES = 4
PRUNE_AGAIN_S = 1.0  # duplicates still coming on a link we pruned: prune it again this often at most
MAX_IHAVE_SEQS = 64  # seqs in one IHAVE or GRAFT (as WANT's MAX_WANT_SEQS: the datagram stays small)
MAX_MISSING = 4096  # messages announced to us and not yet had
MAX_ANNOUNCERS = 4  # per missing message
MAX_TREES = 256  # per-origin trees kept (per_origin only)
MIN_EAGER = 3  # a duplicate does not prune a node's links below this many eager ones (rule 2)
PRUNE_SLACK_HOPS = 0  # a duplicate prunes only if it came more than this many hops longer than the first
MAX_FIRST = 4096  # first copies' ttls kept, to judge their duplicates by
GRAFT_ANSWER_PER_S = 200.0  # payloads a node sends in answer to GRAFTs a second (bursts of 2x)
COUNTERS = ("ihaves_sent", "ihave_seqs_sent", "ihaves_received", "grafts_sent", "grafts_received",
            "graft_answered", "graft_misses", "graft_refused", "prunes_sent", "prunes_received",
            "missing_dropped", "missing_given_up", "ihave_seqs_dropped", "malformed_ihave",
            "malformed_graft")


class Link(NamedTuple):
    """A one-hop IHAVE, GRAFT or PRUNE for neighbour ``addr``."""

    data: bytes
    addr: Addr


class Push(NamedTuple):
    """A payload for ``addr``, in answer to its GRAFT (a CHAT like any other, not link chatter)."""

    data: bytes
    addr: Addr


class _Missing:
    __slots__ = ("due", "announcers", "tries")

    def __init__(self, due: float) -> None:
        self.due = due
        self.announcers: List[Addr] = []
        self.tries = 0


def parse_seqs(extra: Mapping[str, Any], field: str) -> Tuple[Optional[Dict[str, List[int]]], str]:
    """An ``ihave`` or ``graft`` field, shaped as WANT's: {node_id: [seq, ...]}, at most 64 seqs."""
    value = extra.get(field)
    if type(value) is not dict:
        return None, "field"
    return parse_want({"want": value})


class LazyPush:
    def __init__(
        self,
        label: str,
        new_mid: Callable[[], str],
        neighbours: Callable[[], Iterable[Tuple[Addr, str]]],
        known: Callable[[str], bool],
        fetch: Callable[[str], Optional[Message]],
        version: Callable[[], int] = lambda: 0,
        per_origin: bool = False,
    ) -> None:
        """``neighbours``: the up neighbours that speak LAZY, as (addr, label), asked again whenever
        ``version`` (membership's) changes; ``known``: whether we have had a message id; ``fetch``:
        a broadcast we hold (delivery's buffer), to answer a GRAFT."""
        self.label = label
        self._new_mid = new_mid
        self._neighbours = neighbours
        self._known = known
        self._fetch = fetch
        self.per_origin = per_origin
        self._lazy: "OrderedDict[str, Set[Addr]]" = OrderedDict()  # tree ("" or origin) -> lazy links
        self._pruned: Dict[Addr, float] = {}  # link -> when we last sent it a PRUNE
        self._ihave: Dict[Addr, Dict[str, List[int]]] = {}  # announcements waiting, per link
        self._ihave_count: Dict[Addr, int] = {}
        self._ihave_due = float("inf")
        self._missing: "OrderedDict[Tuple[str, int], _Missing]" = OrderedDict()
        self._bucket = [0.0, float("-inf")]
        self._version = version
        self._seen_version: Optional[int] = None
        self._speaker_table: Dict[Addr, str] = {}
        self.counters: Dict[str, int] = {k: 0 for k in COUNTERS}
        self._first: "OrderedDict[str, int]" = OrderedDict()  # mid -> the ttl its first copy came with

    @property
    def _speakers(self) -> Dict[Addr, str]:
        v = self._version()
        if v != self._seen_version:
            self._seen_version = v
            self._speaker_table = {a: label for a, label in self._neighbours()}
        return self._speaker_table

    # -- where a payload goes -------------------------------------------------------------------

    def _tree(self, origin: str, make: bool = False) -> Optional[Set[Addr]]:
        key = origin if self.per_origin else ""
        lazy = self._lazy.get(key)
        if lazy is None and make:
            if len(self._lazy) >= MAX_TREES:
                self._lazy.popitem(last=False)
            lazy = self._lazy[key] = set()
        elif lazy is not None and self.per_origin:
            self._lazy.move_to_end(key)
        return lazy

    def split(self, mid: str, targets: Tuple[Addr, ...], now: float, ttl: Optional[int] = None) -> Tuple[Addr, ...]:
        """Of the flood ``targets`` for broadcast ``mid``, those that get the payload now; the lazy
        others get ``mid`` in their next IHAVE (rules 1 and 3)."""
        key = stream_of(mid)
        if key is None:
            return targets
        if ttl is not None:
            first = self._first
            if len(first) >= MAX_FIRST:
                first.popitem(last=False)
            first[mid] = ttl
        lazy = self._tree(key[0])
        if not lazy:
            return targets
        eager = []
        speakers = self._speakers
        for a in targets:
            if a in lazy and a in speakers:
                self._announce(a, key, now)
            else:
                eager.append(a)
        return tuple(eager)

    def _announce(self, addr: Addr, key: Tuple[str, int], now: float) -> None:
        count = self._ihave_count.get(addr, 0)
        if count >= MAX_IHAVE_SEQS:
            self.counters["ihave_seqs_dropped"] += 1  # delivery's HAVE summaries still tell of it
            return
        self._ihave.setdefault(addr, {}).setdefault(key[0], []).append(key[1])
        self._ihave_count[addr] = count + 1
        if not count:
            self._ihave_due = min(self._ihave_due, now + IHAVE_BATCH_S)

    # -- what comes in --------------------------------------------------------------------------

    def duplicate(self, mid: str, addr: Addr, now: float, wall: float, ttl: Optional[int] = None) -> list:
        """A payload we had already came from ``addr``: that link goes lazy, and we say so (rule 2)."""
        key = stream_of(mid)
        label = self._speakers.get(addr) if key is not None else None
        if key is None or label is None:
            return []
        lazy = self._tree(key[0], make=True)
        assert lazy is not None
        if addr in lazy:
            last = self._pruned.get(addr)
            if last is not None and now - last < PRUNE_AGAIN_S:
                return []
        else:
            if sum(1 for a in self._speakers if a not in lazy) <= MIN_EAGER:
                return []
            first = self._first.get(mid)
            if first is not None and ttl is not None and ttl >= first - PRUNE_SLACK_HOPS:
                return []  # as short a way as the first copy's: a link worth keeping for latency
        lazy.add(addr)
        self._pruned[addr] = now
        self.counters["prunes_sent"] += 1
        extra = {"tree": key[0]} if self.per_origin else {}
        return [Link(self._link("PRUNE", label, extra, wall), addr)]

    def prune_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """A neighbour's PRUNE: it has our payloads by another way; it gets announcements from now on."""
        if self._speakers.get(addr) is None:
            return [], ""  # not (or no longer) a LAZY neighbour of ours: nothing to turn lazy
        origin = ""
        if self.per_origin:
            origin = msg.extra.get("tree") if msg.extra else None
            if not valid_node_id(origin):
                return [], "malformed"
        self.counters["prunes_received"] += 1
        lazy = self._tree(origin, make=True)  # type: ignore[arg-type]
        assert lazy is not None
        lazy.add(addr)
        return [], ""

    def ihave_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """Announcements: each message we lack is awaited ``GRAFT_WAIT_S``, then grafted (rule 3)."""
        seqs, _ = parse_seqs(msg.extra or {}, "ihave")
        if seqs is None:
            self.counters["malformed_ihave"] += 1
            return [], "malformed"
        self.counters["ihaves_received"] += 1
        missing = self._missing
        for origin, numbers in seqs.items():
            for seq in numbers:
                key = (origin, seq)
                if self._known(f"{origin}-{seq}"):
                    continue
                m = missing.get(key)
                if m is None:
                    if len(missing) >= MAX_MISSING:
                        missing.popitem(last=False)
                        self.counters["missing_dropped"] += 1
                    m = missing[key] = _Missing(now + GRAFT_WAIT_S)
                if addr not in m.announcers and len(m.announcers) < MAX_ANNOUNCERS:
                    m.announcers.append(addr)
        return [], ""

    def graft_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """A GRAFT: the link turns eager, and the asker gets each payload we hold, within a budget."""
        seqs, _ = parse_seqs(msg.extra or {}, "graft")
        if seqs is None:
            self.counters["malformed_graft"] += 1
            return [], "malformed"
        self.counters["grafts_received"] += 1
        out: list = []
        for origin, numbers in seqs.items():
            lazy = self._tree(origin)
            if lazy is not None:
                lazy.discard(addr)
            for seq in numbers:
                held = self._fetch(f"{origin}-{seq}")
                if held is None:
                    self.counters["graft_misses"] += 1
                elif not take(self._bucket, GRAFT_ANSWER_PER_S, now):
                    self.counters["graft_refused"] += 1
                else:
                    self.counters["graft_answered"] += 1
                    # The copy we would have pushed: one hop less than it came with (ours: as sent).
                    ttl = held.ttl if held.src == self.label else held.ttl - 1
                    out.append(Push(encode(held._replace(ttl=max(1, ttl))), addr))
        self._pruned.pop(addr, None)
        return out, ""

    # -- timers ---------------------------------------------------------------------------------

    def next_deadline(self) -> Optional[float]:
        t = self._ihave_due
        if self._missing:
            t = min(t, min(m.due for m in self._missing.values()))
        return None if t == float("inf") else t

    def tick(self, now: float, wall: float) -> list:
        """Announcements due, and grafts for what was announced and has not come."""
        out: list = []
        if self._ihave_due <= now:
            out.extend(self._flush(wall))
        if self._missing:
            out.extend(self._graft(now, wall))
        return out

    def _flush(self, wall: float) -> list:
        out = []
        speakers = self._speakers
        for addr, seqs in self._ihave.items():
            label = speakers.get(addr)
            if label is None:
                continue  # gone down meanwhile: it will ask by HAVE/WANT when it comes back
            self.counters["ihaves_sent"] += 1
            self.counters["ihave_seqs_sent"] += self._ihave_count.get(addr, 0)
            out.append(Link(self._link("IHAVE", label, {"ihave": seqs}, wall), addr))
        self._ihave.clear()
        self._ihave_count.clear()
        self._ihave_due = float("inf")
        return out

    def _graft(self, now: float, wall: float) -> list:
        asks: Dict[Addr, Dict[str, List[int]]] = {}
        done = []
        speakers = self._speakers
        for key, m in self._missing.items():
            if m.due > now:
                continue
            if self._known(f"{key[0]}-{key[1]}"):
                done.append(key)
                continue
            if m.tries >= GRAFT_TRIES:
                done.append(key)
                self.counters["missing_given_up"] += 1  # delivery's gap repair is still there
                continue
            live = [a for a in m.announcers if a in speakers]
            if not live:
                done.append(key)
                continue
            addr = live[m.tries % len(live)]
            m.tries += 1
            m.due = now + GRAFT_AGAIN_S
            ask = asks.setdefault(addr, {})
            if sum(len(v) for v in ask.values()) < MAX_IHAVE_SEQS:
                ask.setdefault(key[0], []).append(key[1])
        for key in done:
            del self._missing[key]
        out = []
        for addr, seqs in asks.items():
            for origin in seqs:
                lazy = self._tree(origin)
                if lazy is not None:
                    lazy.discard(addr)  # rule 3: the link we graft is eager again on our side
            self.counters["grafts_sent"] += 1
            out.append(Link(self._link("GRAFT", speakers[addr], {"graft": seqs}, wall), addr))
        return out

    def forget(self, keep: Callable[[Addr], bool]) -> None:
        """Drop what we keep for links that are no longer neighbours (the reaper's round)."""
        for lazy in self._lazy.values():
            for a in [a for a in lazy if not keep(a)]:
                lazy.discard(a)
        for a in [a for a in self._pruned if not keep(a)]:
            del self._pruned[a]

    def stats(self) -> Dict[str, int]:
        out = dict(self.counters)
        out["lazy_links"] = sum(len(s) for s in self._lazy.values())
        out["missing"] = len(self._missing)
        return out

    def _link(self, kind: str, dst: str, extra: Dict[str, Any], wall: float) -> bytes:
        return encode(Message(self._new_mid()[:16], round(wall, 3), 1, kind, self.label, dst, "", extra))
