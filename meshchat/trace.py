"""Observability: what happened to each message, and how each neighbour's link is doing.

Rules, so that the records can be trusted and never cost the relay much:
1. The relay feeds a ``Trace`` at its decision points (a datagram in, its
   outcome, a first copy, a duplicate, a refusal, the copies sent on, what
   was shown, what we originated and retried, what was acknowledged), and
   only when tracing is on: with ``--no-trace`` the relay holds None and
   pays one attribute test per datagram.
2. Per-message records keep the last ``MAX_RECORDS`` messages (the oldest
   go first) and at most ``MAX_DUPS_KEPT`` duplicates each (the rest are
   only counted). Per-neighbour counters are kept for neighbours only
   (configured peers and those that proved themselves); every other address
   shares one ``strangers`` row, so forged sources cannot grow the table.
3. Drops are counted per neighbour by the relay's own reason names, taken
   from the relay's counters as they move (``dropped``), so the per-neighbour
   figures always add up to the node-wide ones in /stats.
4. Nothing here touches a socket, a thread or a clock: ``now`` is an
   argument. The node calls it under its one lock; ``neighbour_rows`` and
   ``why`` return plain data (snapshots) for the console and the metrics.
"""

import operator
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from .wire import Addr, Message, format_addr

MAX_RECORDS = 4096  # messages remembered for /why
MAX_DUPS_KEPT = 8  # duplicates remembered per message (all are counted)
MAX_LINKS = 512  # neighbours with counters of their own; beyond, they share the strangers' row
STRANGERS: Addr = ("*", 0)
LOSS_FLAG = 0.10  # a neighbour losing this share of its HELLOs is flagged
DUP_FLAG_OVER = 0.25  # a duplicate share this far above the neighbours' median is flagged
MIN_FLAG_DATAGRAMS = 20  # a neighbour's dup share is judged after this many datagrams from it

# The relay's drop reasons but duplicate (counted on its own, it is the common case) and internal
# (the node counts it after the relay raised, outside any datagram's outcome).
DROP_REASONS = ("malformed", "oversize", "stale", "ttl", "rate", "rate_total", "replay", "pong_budget",
                "not_peer", "other_mesh", "unproven", "own", "no_route")
_drops = operator.attrgetter(*("dropped_" + r for r in DROP_REASONS))


class Link:
    """One neighbour's counters (or the strangers', all together)."""

    __slots__ = ("addr", "rx", "tx", "dups", "drops", "last")

    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.rx = 0  # datagrams in
        self.tx = 0  # datagrams out
        self.dups = 0  # copies of messages we already had
        self.drops: Dict[str, int] = {}
        self.last = 0.0


# A record is a list, cheap to make on the relaying path (a class with slots costs several times more
# to build); these name its places.
KIND, SRC, DST, AT, FROM, TTL, TTL0, DUPS, DUP_COUNT, RELAYED, SHOWN, REFUSED, OWN, RETRIES, ACKED = range(15)
NOT_SHOWN, SHOWN_NOW, SHOWN_LATE = 0, 1, 2


def _record(msg: Message, addr: Optional[Addr], now: float) -> list:
    """A new record: ``addr`` the neighbour of the first copy (None: ours), ``now`` when it came."""
    x = msg.extra
    return [msg.kind, msg.src, msg.dst, now, addr, msg.ttl, x.get("ttl0") if x else None, None, 0, (),
            NOT_SHOWN, "", False, None, None]


def hops_of(msg: Message) -> Optional[int]:
    """How many hops ``msg`` has come, from the starting ttl it carries (``ttl0``), if valid."""
    return _hops(msg.ttl, msg.extra.get("ttl0") if msg.extra else None)


def _hops(ttl: int, ttl0: Any) -> Optional[int]:
    if type(ttl0) is int and ttl <= ttl0 <= 255:
        return ttl0 - ttl + 1
    return None


class Trace:
    def __init__(self, links: Optional[Callable[[float], List[Dict[str, Any]]]] = None,
                 max_records: int = MAX_RECORDS) -> None:
        """``links(now)``: membership's rows per neighbour (state, rtt, loss), merged into ours."""
        self._links_of = links
        self.max_records = max_records
        self.records: "OrderedDict[str, list]" = OrderedDict()  # mid -> record (see KIND, SRC, ...)
        self.links: Dict[Addr, Link] = {}
        self.strangers = Link(STRANGERS)
        self.last_shown: Optional[str] = None
        self._drops_seen: Optional[tuple] = None

    # -- fed by the relay: links (the relay reads ``links`` itself on its hot path) ----------------

    def new_link(self, addr: Addr, neighbour: bool) -> Link:
        """The row for ``addr``, not seen before: its own if it is a neighbour (within MAX_LINKS),
        else the strangers' (never kept per address: forged sources cannot grow the table)."""
        if not neighbour or len(self.links) >= MAX_LINKS:
            return self.strangers
        link = self.links[addr] = Link(addr)
        return link

    def link_in(self, addr: Addr, neighbour: bool, now: float) -> Link:
        """A datagram arrived from ``addr``: counted in its row, which is returned."""
        link = self.links.get(addr) or self.new_link(addr, neighbour)
        link.rx += 1
        link.last = now
        return link

    def dropped(self, link: Link, counters: Any) -> None:
        """The datagram just counted in ``link`` was dropped: charge it whichever reasons moved."""
        now = _drops(counters)
        before = self._drops_seen
        self._drops_seen = now
        if before is None:
            return  # the first drop we see only sets the baseline: drops before tracing began are not ours
        for reason, a, b in zip(DROP_REASONS, before, now):
            if a != b:
                link.drops[reason] = link.drops.get(reason, 0) + b - a

    def baseline(self, counters: Any) -> None:
        self._drops_seen = _drops(counters)

    def sent(self, addrs: Tuple[Addr, ...]) -> None:
        links = self.links
        for addr in addrs:
            link = links.get(addr)
            if link is not None:
                link.tx += 1

    # -- fed by the relay: messages -----------------------------------------------------------

    def _keep(self, mid: str, rec: list) -> list:
        records = self.records
        if len(records) >= self.max_records:
            records.popitem(last=False)  # the oldest goes first
        records[mid] = rec
        return rec

    def first(self, msg: Message, addr: Addr, now: float, served: bool = False) -> None:
        """The first copy of ``msg`` came from ``addr`` (the relaying path: written out, no calls);
        ``served``: a copy served by repair, whose ttl says nothing of the way it came."""
        records = self.records
        if len(records) >= self.max_records:
            records.popitem(last=False)
        x = msg.extra
        ttl0 = x.get("ttl0") if x and not served else None
        records[msg.mid] = [msg.kind, msg.src, msg.dst, now, addr, msg.ttl, ttl0, None,
                            0, (), NOT_SHOWN, "", False, None, None]

    def duplicate(self, mid: Optional[str], addr: Addr, now: float) -> None:
        rec = self.records.get(mid) if mid is not None else None
        if rec is None:
            return
        rec[DUP_COUNT] += 1
        dups = rec[DUPS]
        if dups is None:
            rec[DUPS] = [(addr, now)]
        elif len(dups) < MAX_DUPS_KEPT:
            dups.append((addr, now))

    def refused(self, msg: Message, addr: Addr, reason: str, now: float) -> None:
        """A message dropped before it was taken (stale, a replay): remembered with its reason."""
        if msg.mid in self.records:
            self.duplicate(msg.mid, addr, now)  # a later copy of one we took: it is that message's story
            return
        self._keep(msg.mid, _record(msg, addr, now))[REFUSED] = reason

    def relayed(self, mid: str, addrs: Tuple[Addr, ...]) -> None:
        rec = self.records.get(mid)
        if rec is not None:
            done = rec[RELAYED]
            rec[RELAYED] = addrs if not done else done + tuple(a for a in addrs if a not in done)

    def shown(self, mid: str, late: bool) -> None:
        rec = self.records.get(mid)
        if rec is not None:
            rec[SHOWN] = SHOWN_LATE if late else SHOWN_NOW
        self.last_shown = mid

    def originated(self, msg: Message, addrs: Tuple[Addr, ...], now: float) -> None:
        rec = self.records.get(msg.mid) or self._keep(msg.mid, _record(msg, None, now))
        rec[OWN] = True
        rec[RELAYED] = tuple(addrs)
        if msg.kind == "CHAT":
            self.last_shown = msg.mid  # /why alone: the last line on the screen, ours included

    def retried(self, msg: Message, addrs: Tuple[Addr, ...], now: float) -> None:
        """A retry (or a hand-over) of the message whose original id is in ``re``."""
        key = msg.extra.get("re") if msg.extra else None
        rec = self.records.get(key) if isinstance(key, str) else None
        if rec is None:
            return
        if rec[RETRIES] is None:
            rec[RETRIES] = []
        if len(rec[RETRIES]) < MAX_DUPS_KEPT:
            rec[RETRIES].append((msg.mid, now, tuple(addrs)))

    def acked(self, mid: str, tries: int, rtt_ms: float, now: float) -> None:
        rec = self.records.get(mid)
        if rec is not None:
            rec[ACKED] = (tries, rtt_ms, now)

    # -- read by the node ---------------------------------------------------------------------

    def find(self, prefix: str) -> Tuple[Optional[str], str]:
        """The id of the record whose mid starts with ``prefix`` (the last shown, if empty), or why none."""
        if not prefix:
            if self.last_shown is None or self.last_shown not in self.records:
                return None, "no message shown yet that is still remembered; /why MID names one"
            return self.last_shown, ""
        if prefix in self.records:
            return prefix, ""
        found = [mid for mid in self.records if mid.startswith(prefix)]
        if not found:
            return None, (f"no message {prefix!r} among the last {len(self.records)} this node "
                          f"handled (it keeps the last {self.max_records:,})")
        if len(found) > 1:
            return None, f"{prefix!r} is the start of {len(found)} message ids; give more of it"
        return found[0], ""

    def why(self, mid: str, now: float, name: Callable[[Addr], str] = format_addr) -> Dict[str, Any]:
        """Record ``mid`` as plain data: times are seconds ago, or milliseconds after the first arrival."""
        rec = self.records[mid]
        at = rec[AT]

        def after(t: float) -> float:
            return round((t - at) * 1000.0, 1)

        out: Dict[str, Any] = {
            "mid": mid, "kind": rec[KIND], "src": rec[SRC], "dst": rec[DST], "own": rec[OWN],
            "age_s": round(now - at, 1),
            "first_from": None if rec[FROM] is None else name(rec[FROM]),
            "ttl": rec[TTL], "hops": None if rec[OWN] else _hops(rec[TTL], rec[TTL0]),
            "duplicates": [{"from": name(a), "after_ms": after(t)} for a, t in rec[DUPS] or ()],
            "duplicates_total": rec[DUP_COUNT],
            "relayed_to": [name(a) for a in rec[RELAYED]],
            "shown": rec[SHOWN] != NOT_SHOWN, "late": rec[SHOWN] == SHOWN_LATE, "dropped": rec[REFUSED] or None,
        }
        if rec[OWN]:
            out["retries"] = [{"mid": m, "after_ms": after(t), "to": [name(a) for a in to]}
                              for m, t, to in rec[RETRIES] or ()]
            acked = rec[ACKED]
            out["acked"] = None if acked is None else {
                "tries": acked[0], "rtt_ms": acked[1], "after_ms": after(acked[2])}
        return out

    def neighbour_rows(self, now: float) -> List[Dict[str, Any]]:
        """A row per neighbour (membership's fields, and ours: in, out, dups, dup share, drops, flags).
        Stable names: the metrics read them (and ``strangers_row`` for the rest)."""
        base = self._links_of(now) if self._links_of is not None else []
        rows = []
        listed = set()
        for row in base:
            row = dict(row)
            addr = _addr_key(row.get("addr"))
            listed.add(addr)
            rows.append(self._counted(row, self.links.get(addr)))
        for addr, link in self.links.items():
            if addr not in listed:  # configured without membership, or forgotten by membership lately
                rows.append(self._counted({"addr": format_addr(addr), "label": format_addr(addr), "nick": "",
                                           "configured": False,
                                           "state": "gone" if self._links_of is not None else "-",
                                           "last_heard_s": round(now - link.last, 1), "rtt_ms": None,
                                           "loss": None}, link))
        _flag(rows)
        return rows

    def strangers_row(self, now: float) -> Dict[str, Any]:
        """Everything from addresses that are not neighbours, as one row like a neighbour's (``addr`` "*")."""
        s = self.strangers
        return self._counted({"addr": "*", "label": "strangers", "nick": "", "configured": False, "state": "-",
                              "last_heard_s": round(now - s.last, 1) if s.rx else None, "rtt_ms": None,
                              "loss": None}, s)

    @staticmethod
    def _counted(row: Dict[str, Any], link: Optional[Link]) -> Dict[str, Any]:
        rx = link.rx if link else 0
        dups = link.dups if link else 0
        row.update({"in": rx, "out": link.tx if link else 0, "dups": dups,
                    "dup_share": round(dups / rx, 3) if rx else None,
                    "drops": dict(link.drops) if link else {}, "flags": []})
        return row

    def forget(self, keep: Callable[[Addr], bool], now: float, idle_s: float) -> None:
        """Drop the rows of addresses no longer neighbours and quiet for ``idle_s`` (the reaper's call)."""
        for addr in [a for a, link in self.links.items() if not keep(a) and now - link.last > idle_s]:
            del self.links[addr]


def _addr_key(text: Any) -> Optional[Addr]:
    if not isinstance(text, str):
        return None
    host, _, port = text.rpartition(":")
    return (host, int(port)) if port.isdigit() else None


def _median(values: List[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2.0


def _flag(rows: List[Dict[str, Any]]) -> None:
    """Mark the neighbours that stand out: loss of LOSS_FLAG or more, or a duplicate share well above
    the others' (duplicates are normal in a mesh: only one link much more redundant than the rest is news)."""
    shares = [r["dup_share"] for r in rows if r["dup_share"] is not None and r["in"] >= MIN_FLAG_DATAGRAMS]
    typical = _median(shares) if len(shares) >= 2 else None
    for r in rows:
        if r["loss"] is not None and r["loss"] >= LOSS_FLAG:
            r["flags"].append("loss")
        if (typical is not None and r["dup_share"] is not None
                and r["in"] >= MIN_FLAG_DATAGRAMS and r["dup_share"] > typical + DUP_FLAG_OVER):
            r["flags"].append("dups")
