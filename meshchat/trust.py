"""Trust: signed origins and the keys pinned for them.

Rules, so that nobody is shown as a node they are not:
1. What is signed: every field of a message but ``ttl`` (relays lower it) and
   ``sig`` itself, unknown fields included, as compact JSON with sorted keys
   in UTF-8 (``signing_bytes``). The signer's public key travels in ``key``.
2. A message is judged once, on its first copy, before it can take a
   seen-cache slot: a forged copy sent first is dropped and never silences
   the real one. Verdicts: verified, unsigned (no ``key`` and no ``sig``: a
   seed-design node, or a seed relay stripped them), impostor (unsigned, but
   under the name of an origin whose key is pinned: dropped, as it may be
   anyone's), bad signature (anything else that does not verify: dropped),
   key changed (it verifies, under another key than the one pinned for its
   ``src``: dropped, and offered).
3. Pinned on first use: the first verified key of an origin is its key. A
   changed key is never shown as that node; the user is told (at most every
   ``CHANGE_NOTICE_S`` per origin and key) with both fingerprints, and
   ``accept`` (``/trust NAME``) pins the key offered; when several were
   (an impostor's beside the owner's new one), the user picks one by its
   fingerprint, so a forger's key is never pinned by default.
4. Bounded: at most ``MAX_PINS`` pins (past it, new origins are not pinned and
   their messages show as unverified: pins are never pushed out, or a flood
   of made-up origins could unpin a real one), ``MAX_PENDING`` origins with
   offered keys (the oldest goes) and ``MAX_OFFERS`` keys each.
5. Sans-I/O: no socket, thread, clock or disk; ``now`` is an argument, and the
   signature check itself is injected (``crypto.verify``), so the relay's
   decision stays pure. New pins come back as ``PinKey`` for the node to store.
6. A hand-over (store-and-forward: a node that held a direct message for
   someone sends it on with a new ``mid`` and ``ts``) carries the origin's
   signature as ``osig``, with the ``mid`` and ``ts`` it covers (``hmid``,
   ``hts``): the message the origin signed is rebuilt and checked as any
   other (the hand-over's own ``re`` and ``ots`` left out when the origin
   signed the first try itself), so a held message stays verified.
"""

import base64
import json
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .wire import Message

KEY_FIELD = "key"
SIG_FIELD = "sig"
OSIG_FIELD = "osig"  # a hand-over's: the origin's signature, of the mid and ts in hmid and hts
MAX_HMID_CHARS = 128
KEY_BYTES = 32
SIG_BYTES = 64
MAX_PINS = 4096
MAX_PENDING = 64
MAX_OFFERS = 4  # distinct keys remembered per origin for /trust to choose from
CHANGE_NOTICE_S = 60.0  # a changed key (or unsigned messages under a pinned name) told at most this often

VERIFIED = "verified"
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
KEY_CHANGED = "key_changed"
IMPOSTOR = "impostor"

_CANON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class PinKey(NamedTuple):
    """Store that ``label``'s key is ``key`` (urlsafe base64), so the pin survives a restart."""

    label: str
    key: str


def signing_bytes(msg: Message) -> bytes:
    """What the origin signs: every field but ttl and sig, canonically encoded."""
    obj = {k: v for k, v in msg.extra.items() if k != SIG_FIELD} if msg.extra else {}
    obj.update(mid=msg.mid, ts=msg.ts, kind=msg.kind, src=msg.src, dst=msg.dst, body=msg.body)
    return _CANON.encode(obj).encode("utf-8")


def as_signed(handover: Message) -> Optional[Message]:
    """The message its origin signed, rebuilt from a hand-over (rule 6); None if the fields are malformed."""
    x = dict(handover.extra)
    osig, hmid, hts = x.pop(OSIG_FIELD, None), x.pop("hmid", None), x.pop("hts", None)
    if (type(osig) is not str or type(hmid) is not str or not 0 < len(hmid) <= MAX_HMID_CHARS
            or type(hts) not in (int, float)):
        return None
    if hmid == x.get("re"):  # the origin signed its first try, which had neither re nor ots
        x.pop("re", None)
        x.pop("ots", None)
    x[SIG_FIELD] = osig
    return handover._replace(mid=hmid, ts=hts, extra=x)


def signer(key_text: str, sign: Callable[[bytes], str]) -> Callable[[Message], Message]:
    """A function that gives a message of ours its ``key`` and ``sig`` (``sign``: the identity's)."""

    def signed(msg: Message) -> Message:
        extra = dict(msg.extra) if msg.extra else {}
        extra.pop(SIG_FIELD, None)
        extra[KEY_FIELD] = key_text
        out = msg._replace(extra=extra)
        extra[SIG_FIELD] = sign(signing_bytes(out))
        return out

    return signed


class Trust:
    def __init__(
        self,
        verify: Callable[[bytes, bytes, bytes], bool],
        unb64: Callable[[object, int], Optional[bytes]],
        fingerprint: Callable[[bytes], str],
        pins: Optional[Dict[str, str]] = None,
        max_pins: int = MAX_PINS,
    ) -> None:
        self._verify = verify
        self._unb64 = unb64
        self._fingerprint = fingerprint
        self.max_pins = max_pins
        self.pins: Dict[str, bytes] = {}
        for label, text in (pins or {}).items():
            key = unb64(text, KEY_BYTES)
            if key is not None and len(self.pins) < max_pins:
                self.pins[label] = key
        # label -> {offered key: when last told}, newest last; origins oldest first
        self.pending: "OrderedDict[str, OrderedDict[bytes, float]]" = OrderedDict()
        self._impostor_told: "OrderedDict[str, float]" = OrderedDict()
        self.counters = {"pinned": 0, "pins_full": 0, "keys_accepted": 0}

    def check(self, msg: Message, now: float) -> Tuple[str, list]:
        """The verdict on a first copy, and what to do besides (a PinKey, a notice text)."""
        if msg.extra and OSIG_FIELD in msg.extra and SIG_FIELD not in msg.extra:
            signed = as_signed(msg)
            if signed is None:
                return BAD_SIGNATURE, []
            msg = signed
        extra = msg.extra
        if not extra or (KEY_FIELD not in extra and SIG_FIELD not in extra):
            if msg.src in self.pins:
                return IMPOSTOR, self._impostor(msg.src, now)
            return UNSIGNED, []
        key = self._unb64(extra.get(KEY_FIELD), KEY_BYTES)
        sig = self._unb64(extra.get(SIG_FIELD), SIG_BYTES)
        if key is None or sig is None or not self._verify(key, sig, signing_bytes(msg)):
            return BAD_SIGNATURE, []
        label = msg.src
        pinned = self.pins.get(label)
        if pinned == key:
            return VERIFIED, []
        if pinned is None:
            if len(self.pins) >= self.max_pins:
                self.counters["pins_full"] += 1
                return UNSIGNED, []  # verifies, but nobody vouches for whose it is: shown unverified
            self.pins[label] = key
            self.counters["pinned"] += 1
            return VERIFIED, [PinKey(label, extra[KEY_FIELD])]
        return KEY_CHANGED, self._offered(label, pinned, key, now)

    def _impostor(self, label: str, now: float) -> list:
        told = self._impostor_told.pop(label, None)
        if told is not None and now - told < CHANGE_NOTICE_S:
            self._impostor_told[label] = told
            return []
        self._impostor_told[label] = now
        while len(self._impostor_told) > MAX_PENDING:
            self._impostor_told.popitem(last=False)
        return [f"an unsigned message under the name of {label}, whose key is pinned, was dropped: "
                "forged, or its signature was removed on the way (by a node built from the seed design)"]

    def _offered(self, label: str, pinned: bytes, key: bytes, now: float) -> list:
        offers = self.pending.pop(label, None)
        if offers is None:
            offers = OrderedDict()
        told = offers.pop(key, None)
        offers[key] = now if told is None or now - told >= CHANGE_NOTICE_S else told
        while len(offers) > MAX_OFFERS:
            offers.popitem(last=False)
        self.pending[label] = offers
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)
        if told is not None and now - told < CHANGE_NOTICE_S:
            return []
        more = f" ({len(offers)} keys offered so far)" if len(offers) > 1 else ""
        return [f"the key of {label} changed: pinned {self._fingerprint(pinned)}, now offered "
                f"{self._fingerprint(key)}{more}; its messages are dropped. If its owner confirms the new "
                f"fingerprint, type /trust {label}" + (" FINGERPRINT" if more else "")]

    def accept(self, label: str, fingerprint: str = "") -> Tuple[Optional[PinKey], str]:
        """/trust: pin the key ``label`` offered (the one whose fingerprint starts with
        ``fingerprint``, when several were); (the PinKey to store, text for the user)."""
        offers = self.pending.get(label)
        if not offers:
            pinned = self.pins.get(label)
            if pinned is not None:
                return None, f"{label} offered no new key; its pinned key is {self._fingerprint(pinned)}"
            return None, f"no key known for {label} yet"
        wanted = fingerprint.replace(" ", "").lower()
        keys = [k for k in offers if self._fingerprint(k).replace(" ", "").lower().startswith(wanted)]
        if len(keys) != 1:
            listed = ", ".join(self._fingerprint(k) for k in offers)
            if not keys:
                return None, f"{label} offered no key with fingerprint {fingerprint}; offered: {listed}"
            return None, (f"{label} offered {len(keys)} keys: {listed}; ask its owner which is theirs, "
                          f"then type /trust {label} FINGERPRINT")
        key = keys[0]
        del self.pending[label]
        self.pins[label] = key
        self.counters["keys_accepted"] += 1
        text = base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")
        return PinKey(label, text), f"{label} is now trusted with key {self._fingerprint(key)}"

    def fingerprint_of(self, label: str) -> Optional[str]:
        key = self.pins.get(label)
        return None if key is None else self._fingerprint(key)

    def pending_labels(self) -> List[str]:
        return list(self.pending)
