"""The relay's observability hooks (a mixin of ``Relay``): every datagram's outcome charged to its
neighbour's row (trace.py), and traceroute (traceroute.py keeps its state; the way a probe goes is
decided here). Sans-I/O like relay.py."""

import re
from typing import Any, Dict, Optional, Tuple

from .actions import Send, with_ttl as _with_ttl
from .delivery import Delivered
from .trace import hops_of
from .traceroute import CAP as TRACE_CAP
from .wire import Addr, Message, encode


class TraceHooks:
    """Methods of ``Relay`` (relay.py), kept apart by the capability they serve."""

    def _traced(self, data: bytes, addr: Addr, now: float, wall: float) -> list:
        t = self.trace
        if t is None:
            return self._opened(data, addr, now, wall)
        # Tracing: the datagram counted in its neighbour's row, its outcome charged to it (a drop by
        # the reason the counters show), and every copy sent counted out per neighbour.
        c = self.counters
        handled, dups = c.handled, c.dropped_duplicate
        links = t.links
        link = links.get(addr)
        if link is None:
            m = self.membership
            link = t.new_link(addr, addr in self._peer_set or (m is not None and addr in m.neighbours))
        link.rx += 1
        link.last = now
        actions = self._opened(data, addr, now, wall)
        if c.handled == handled:
            if c.dropped_duplicate != dups:
                link.dups += 1
            else:
                t.dropped(link, c)
        for a in actions:
            kind = type(a)
            if kind is Send:
                for to in a.addrs:
                    out = links.get(to)
                    if out is not None:
                        out.tx += 1
            elif kind is Delivered:
                t.acked(a.mid, a.tries, a.rtt_ms, now)
        return actions

    def trace_route(self, dst: str, now: float, wall: float) -> Tuple[Optional[Message], list, str]:
        """Our TRACE to ``dst``: the message, its Sends, and "" (or None, [], why it cannot go)."""
        m, tr = self.membership, self.traceroute
        if m is None or tr is None:
            return None, [], "this node has no membership, so no traceroute"
        if dst == self.label:
            return None, [], "that is this node"
        targets = self._trace_targets(dst, "", None, now)
        if not targets:
            return None, [], "no neighbour that speaks TRACE is up"
        ttl = self.config.ttl or m.ttl_for(dst)
        msg = Message(self._new_mid(), wall, ttl, "TRACE", self.label, dst, "", {"ttl0": ttl})
        if self._sign is not None:
            msg = self._sign(msg)
        self.seen.add(msg.mid, now, wall)
        tr.started(msg.mid, dst, now)
        self.counters.sent += len(targets)
        if self.trace is not None:
            self.trace.originated(msg, targets, now)
        return msg, self._count_out([Send(encode(msg), targets)]), ""

    def _trace_targets(self, dst: str, origin: str, addr: Optional[Addr], now: float) -> Tuple[Addr, ...]:
        """Where a TRACE goes: the route to ``dst`` if known, else every neighbour up but the sender and the
        origin; always only to neighbours that said they speak TRACE."""
        m = self.membership
        assert m is not None
        ns = m.neighbours

        def speaks(a: Addr) -> bool:
            n = ns.get(a)
            return n is not None and TRACE_CAP in n.caps

        hop = m.next_hop(dst, now)
        if hop is not None and hop != addr and speaks(hop):
            return (hop,)
        back = m.addr_by_label.get(origin) if origin else None
        return tuple(a for a in m.flood_targets("TRACE") if a != addr and a != back and speaks(a))

    def _traceroute(self, msg: Message, addr: Addr, now: float, wall: float, data: bytes,
                    head: "Optional[re.Match[bytes]]") -> list:
        """A TRACE (answered with a HOP, and sent on towards its target) or a HOP (back along its TRACE's path)."""
        c, m, tr = self.counters, self.membership, self.traceroute
        assert m is not None and tr is not None
        if not m.is_up(addr):
            c.dropped_unproven += 1  # an answer to a forged source would make us a reflector
            return []
        if not msg.dst:
            c.dropped_malformed += 1  # a trace has a target: one to everyone would make the whole mesh answer
            return []
        to_me = msg.dst == self.label
        ttl = min(msg.ttl, self.config.max_ttl)
        if msg.kind == "HOP":
            if to_me:
                c.handled += 1
                c.consumed += 1
                return tr.hop_received(msg, now)
            back = tr.way_back(msg.body)
            if back is None or back == addr or ttl <= 1 or not m.is_up(back):
                c.dropped_no_route += 1  # never flooded: an answer costs one datagram a hop, or none
                return []
            c.handled += 1
            c.relayed += 1
            c.sent += 1
            if self.trace is not None:
                self.trace.relayed(msg.mid, (back,))
            return [Send(_with_ttl(data, head, msg, ttl - 1), (back,))]
        c.handled += 1
        m.learn(msg, addr, now)
        tr.came_from(msg.mid, addr, now)
        actions: list = []
        hop = hops_of(msg)  # from the TRACE's ttl0: how far its origin is
        if hop is not None and tr.may_answer(now):
            extra: Dict[str, Any] = {"hop": hop}
            if to_me:
                extra["end"] = 1
            # It goes back the way the TRACE came: ``hop`` hops, and a little slack.
            answer = Message(self._new_mid(), wall, min(hop + 2, self.config.max_ttl), "HOP", self.label,
                             msg.src, msg.mid, extra)
            if self._sign is not None:  # signed like all we originate: unsigned, our pinned name drops it
                answer = self._sign(answer)
            self.seen.add(answer.mid, now, wall)
            c.sent += 1
            actions.append(Send(encode(answer), (addr,)))
        if not to_me and ttl > 1:
            targets = self._trace_targets(msg.dst, msg.src, addr, now)
            if targets:
                c.sent += len(targets)
                c.relayed += 1
                if self.trace is not None:
                    self.trace.relayed(msg.mid, targets)
                actions.append(Send(_with_ttl(data, head, msg, ttl - 1), targets))
                return actions
        c.consumed += 1
        return actions

    def _count_out(self, actions: list) -> list:
        """With tracing on, the datagrams in ``actions`` counted per neighbour."""
        t = self.trace
        if t is not None:
            for a in actions:
                if type(a) is Send:
                    t.sent(a.addrs)
        return actions
