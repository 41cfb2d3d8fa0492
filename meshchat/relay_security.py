"""The relay's security checks on arrival and on the way out (a mixin of ``Relay``): closed meshes'
plaintext, signatures checked against pinned keys before the seen cache, impostors, end-to-end boxes
opened for us, key requests, hand-overs that keep their origin's signature. The cryptography itself
is in crypto.py, the pins in trust.py, the boxes in private.py; this is where the relay asks them.
Sans-I/O like relay.py: ``now`` and ``wall`` are arguments."""

from typing import Optional, Tuple

from .actions import Display, Notice, Send
from .repair import ServeSince
from .membership import Beacon, Originate
from .wire import Addr, Message

_SENDS = (Send, Originate, Beacon, ServeSince)  # actions that make the node send


class SecurityHooks:
    """Methods of ``Relay`` (relay.py), kept apart by the capability they serve."""

    def _plaintext(self, data: bytes, addr: Addr, now: float, wall: float) -> list:
        """--network-key-optional: an unsealed datagram, taken as a node without a key would take
        it and shown marked, but nothing it leads to is sent: an outsider neither makes us answer
        (we would be its reflector) nor reaches the sealed mesh under our seal. It proves no
        neighbour alive, and no HELLO of ours reaches it readable, so it never becomes one."""
        c = self.counters
        c.received_plaintext += 1
        out = []
        for a in self._received(data, addr, now, wall):
            kind = type(a)
            if kind in _SENDS:
                c.plaintext_withheld += 1
                if kind is Send:
                    c.sent -= len(a.addrs)
            else:
                out.append(a._replace(sealed=False) if kind is Display else a)
        return out

    def _verified(self, msg: Message, now: float, quiet: bool = False) -> Tuple[Optional[bool], list, bool]:
        """Whether ``msg`` is signed by its origin's pinned key (None: we cannot check), the actions
        the check asks for (a pin to store, a notice), and whether it is dropped (counted here).

        ``quiet``: a copy served by repair (old on purpose): an unsigned one under a pinned name is
        dropped without a notice (it is most likely from before its origin had a key)."""
        trust = self.trust
        if trust is None:
            return None, [], False
        verdict, extra = trust.check(msg, now)
        if verdict == "verified":
            return True, extra, False
        c = self.counters
        if verdict == "unsigned":
            if self.config.require_signed:
                c.dropped_unsigned += 1
                return False, [], True
            return False, [], False
        if verdict == "key_changed":
            c.dropped_key_changed += 1
            return False, [Notice(text) for text in extra], True
        if verdict == "impostor":
            c.dropped_impostor += 1
            return False, [] if quiet else [Notice(text) for text in extra], True
        c.dropped_bad_signature += 1
        return False, [], True

    def _private_in(self, msg: Message, verified: Optional[bool]) -> Tuple[Optional[Message], Optional[bool]]:
        """A first copy addressed to us: a box opened (None: it does not open, counted), and an ACK
        from a node whose key is pinned taken only if that key signed it (None: counted)."""
        c = self.counters
        if msg.kind == "ACK":
            if verified is False and self.trust is not None and msg.src in self.trust.pins:
                c.dropped_unverified_ack += 1  # a relay could forge it: our message may never have arrived
                return None, None
            return msg, None
        if msg.kind != "CHAT" or self.private is None:
            return msg, None
        opened, encrypted = self.private.open(msg)
        if opened is None:
            c.dropped_bad_box += 1
        return opened, encrypted

    def _signed_again(self, msg: Message) -> Message:
        """A message re-issued with a new mid and ts: ours is signed again; another origin's (a hand-over)
        no longer matches its signature, so it goes unsigned (shown unverified) rather than as a forgery."""
        if msg.src == self.label and self._sign is not None:
            return self._sign(msg)
        if msg.extra and "osig" in msg.extra:
            return msg  # a hand-over that carries its origin's signature as it was signed (trust.py rule 6)
        if msg.extra and ("sig" in msg.extra or "key" in msg.extra):
            return msg._replace(extra={k: v for k, v in msg.extra.items() if k not in ("key", "sig")})
        return msg

    def _key_message(self, msg: Message, verified: Optional[bool], to_me: bool, now: float, wall: float) -> list:
        """A PRESENCE or KEY (first copy): learn its origin's box key (verified only: private.py rule 3),
        send what waited for that key, and answer a key request addressed to us (rule 4)."""
        p = self.private
        assert p is not None
        out: list = []
        m = self.membership
        if p.learn(msg, verified) and self.delivery is not None:
            self.delivery.due_now(msg.src)  # a try that found no key must not delay the first sealed one
            caps = m.caps_of(msg.src) if m is not None else None
            out.extend(self._sends(self.delivery.peer_heard(msg.src, now, wall, caps), now, wall))
        if msg.kind == "KEY" and to_me and msg.extra.get("ask") == 1 and p.may_answer(msg, verified, now):
            caps = m.config.caps if m is not None else ()
            out.extend(self.originate("KEY", "", msg.src, now, wall, extra=p.answer_fields(caps))[1])
        return out

    def _ask_key(self, dst: str, now: float, wall: float) -> list:
        """A key request for ``dst``, unless one went lately (private.py rule 4)."""
        p = self.private
        if p is None or not self._origin_targets("KEY", dst, now) or not p.may_ask(dst, now):
            return []  # with no neighbour up yet, the next try asks (when one comes up)
        return self.originate("KEY", "", dst, now, wall, extra={"ask": 1})[1]
