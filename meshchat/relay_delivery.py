"""The relay's hooks into the delivery layer (a mixin of ``Relay``): what membership and delivery ask
for turned into datagrams, retries and hand-overs sent like our own direct messages, and a first copy
handed to delivery (acks, gaps, what waits for its origin). Sans-I/O like relay.py."""

from typing import List, Tuple

from .actions import Send
from .delivery import Ack, Forward, Resend, direct_key
from .repair import Have, Serve, Since, Want
from .lazypush import Link, Push
from .membership import PeerUp, Unicast
from .wire import Addr, Message, encode

_ONE_HOP = (Unicast, Want, Have, Since, Serve, Link, Push)
RECENTLY_HEARD_S = 60.0  # a direct message for a node silent longer than this is kept to hand over
MAX_ACKS_WAITING = 256  # acks with no neighbour to take them yet
ACK_WAIT_S = 30.0  # how long such an ack waits for one


class DeliveryHooks:
    """Methods of ``Relay`` (relay.py), kept apart by the capability they serve."""

    def _sends(self, actions: list, now: float, wall: float) -> list:
        """What membership and delivery asked for, as Sends where it is a datagram; the rest as it is.

        One-hop datagrams (HELLO, WANT, HAVE, SINCE, served copies) go to their one address; acks,
        retries and hand-overs go like direct messages we originate; a neighbour that comes up gets
        what delivery has for it (a summary, and a catch-up request after a restart)."""
        out = []
        d = self.delivery
        for a in actions:
            kind = type(a)
            if kind in _ONE_HOP:
                self.counters.sent += 1
                if kind is not Serve and kind is not Push:  # a served copy is a CHAT, not link chatter
                    self.counters.link_sent += 1
                out.append(Send(a.data, (a.addr,)))
            elif d is None:
                out.append(a)
            elif kind is Ack:
                sends = self._originate("ACK", a.mid, a.dst, now, wall)[1]
                if not sends and len(self._acks_waiting) < MAX_ACKS_WAITING:
                    # No neighbour takes it yet (we have just restarted, say): it goes with the next one up.
                    self._acks_waiting.append((a, now))
                out.extend(sends)
            elif kind is Resend or kind is Forward:
                # A retry floods: no answer came the routed way, so the route may be wrong.
                out.extend(self._send_direct(a.message, now, flood=kind is Resend))
            elif kind is PeerUp:
                out.append(a)
                waiting = [ack for ack, when in self._acks_waiting if now - when < ACK_WAIT_S]
                self._acks_waiting.clear()
                out.extend(self._sends(d.neighbour_up(a.addr, a.label, now, wall) + waiting, now, wall))
            else:
                out.append(a)
        return out

    def _send_direct(self, msg: Message, now: float, flood: bool = False) -> List[Send]:
        """A retry or hand-over: a fresh datagram, routed like a direct message of ours (or flooded)."""
        p = self.private
        if (p is not None and msg.kind == "CHAT" and msg.src == self.label and msg.dst
                and not p.sealed_or_plain(msg)):
            sealed = p.seal(msg)  # held for want of a key (private.py rule 2): sealed now, or not sent
            if sealed is None:
                return self._ask_key(msg.dst, now, msg.ts)  # a retry's ts is the wall clock now
            msg = sealed
        msg = self._signed_again(msg)
        self.seen.add(msg.mid, now, msg.ts)
        targets = self.membership.flood_targets(msg.kind) if flood else self._origin_targets(msg.kind, msg.dst, now)
        if not targets:
            return []
        self.counters.sent += len(targets)
        if self.trace is not None:
            self.trace.retried(msg, targets, now)
        return [Send(encode(msg), targets)]

    def _deliver(self, msg: Message, addr: Addr, data: bytes, now: float, wall: float, to_me: bool,
                 shown: bool, actions: list) -> Tuple[bool, bool, Message]:
        """Hand a first copy to the delivery layer: acks, gap tracking, what waits for its origin.

        Returns whether it is still to be shown (not a retry of one shown before), whether late, and
        the message to show (a retry under its original id)."""
        d, m = self.delivery, self.membership
        kind = msg.kind
        late = False
        out: list = []
        if kind == "CHAT":
            if not msg.dst:
                late = d.broadcast_seen(msg, addr, now)
                d.remember(msg, data, now)
                # Caught up after a restart, or replayed then (dated before the restart), but shown before it.
                before = self.replay_before_ts
                if (late or (before is not None and msg.ts <= before)) and self._shown_before(msg.mid):
                    shown = False
            elif to_me:
                show, out = d.direct_received(msg, now)
                shown = shown and show
                if shown and "~" in msg.mid:  # a retry: shown under the id its sender knows
                    msg = msg._replace(mid=direct_key(msg))
            else:
                fresh = m.heard_within(msg.dst, now, RECENTLY_HEARD_S) and not m.is_down(msg.dst)
                out = d.relayed_direct(msg, data, now, wall, fresh)
        elif kind == "ACK":
            out = d.ack_received(msg, now) if to_me else d.ack_relayed(msg)
        if kind in ("CHAT", "PRESENCE") and msg.src:
            out.extend(d.peer_heard(msg.src, now, wall, m.caps_of(msg.src)))
        if out:
            actions.extend(self._sends(out, now, wall))
        return shown, late, msg

    def _shown_before(self, mid: str) -> bool:
        return self.delivery is not None and self.delivery.in_history(mid)
