"""Private messages: end-to-end boxes for direct CHATs, the box keys they need, and asking for one.

Rules, so that a relay never reads a direct message and nobody is fooled about it:
1. What is sealed: the ``body`` of a direct CHAT of ours, whole or part by part, into
   ``MARKER`` + urlsafe base64 of a box (crypto.seal_to) to the destination's box key. The
   ciphertext rides in ``body`` (not a field of its own) so that a seed-design relay, which may
   strip unknown fields, carries it intact. The associated data is the header
   (``header_bytes``): the message's original key (``direct_key``: a retry's or hand-over's
   ``re``), ``src``, ``dst``, the original ``ts`` (``ots`` of a retry) and ``kind``, so a box
   moved under another header, or a retry's, does not open.
2. Never in clear by accident: with this layer, a direct CHAT of ours is sealed, or held until
   its destination's key is known; only one the user sends with ``plain`` goes in clear, and it
   carries ``"plain": 1`` so that a retry after a restart stays plain, and the receiver can say so.
3. Box keys are learned only from messages verified by their origin's pinned identity key (a
   PRESENCE or a KEY answer carries ``box``, covered by the signature), so a box key is bound to
   an identity. At most ``MAX_KEYS`` are kept (least recently learned go first).
4. Asking: a KEY with ``"ask": 1`` routed to the destination, at most once per ``ASK_EVERY_S``
   per destination. Answering: a signed KEY with our ``box`` (and ``caps``) to a verified asker
   only, at most once per ``ANSWER_EVERY_S`` per asker and ``ANSWERS_PER_S`` in all: the answer
   goes to a label through the mesh (never to the datagram's source address), is about as big as
   the ask, and a forged asker is not verified.
5. A box addressed to us that does not open (tampered, moved, not for us) is dropped and counted
   by the relay (``dropped_bad_box``); it is never shown.
6. Sans-I/O: no socket, thread, clock or disk; ``now`` is an argument, and the cryptography is
   injected (crypto.seal_to and our BoxKey.open), so tests drive it with plain values.
"""

import base64
import binascii
import json
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from .bucket import new_bucket, take
from .delivery import direct_key
from .wire import Message

MARKER = "e2e1:"  # a sealed body starts with this; a seed-design node shows it as text (it never gets one)
BOX_FIELD = "box"  # our X25519 public key, in PRESENCE and KEY answers
PLAIN_FIELD = "plain"  # a direct CHAT sent in clear on purpose
CAP = "E2E"  # in HELLO and PRESENCE caps: this node opens boxes and answers KEY
KEY_BYTES = 32
BOX_OVERHEAD_BYTES = 48
MAX_KEYS = 4096
MAX_ASKED = 4096
ASK_EVERY_S = 5.0
ANSWER_EVERY_S = 10.0
ANSWERS_PER_S = 10.0
MAX_BOX_CHARS = 8192  # a body longer than any datagram we take is not opened

_CANON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def header_bytes(msg: Message) -> bytes:
    """The associated data of ``msg``'s box: what a relay must not move it away from."""
    ots = msg.extra.get("ots") if msg.extra else None
    ts = ots if type(ots) is float or type(ots) is int else msg.ts
    return _CANON.encode([direct_key(msg), msg.src, msg.dst, float(ts), msg.kind]).encode("utf-8")


def is_box(body: str) -> bool:
    return body.startswith(MARKER)


def split_plain(body: str, room: int) -> List[str]:
    """Cut ``body`` on character boundaries into pieces whose sealed body fits ``room`` bytes."""
    per_piece = max(1, (room - len(MARKER)) * 3 // 4 - BOX_OVERHEAD_BYTES)
    pieces: List[str] = []
    start, size = 0, 0
    for i, ch in enumerate(body):
        n = len(ch.encode("utf-8", "surrogatepass"))
        if size + n > per_piece and i > start:
            pieces.append(body[start:i])
            start, size = i, 0
        size += n
    pieces.append(body[start:])
    return pieces


class Private:
    def __init__(
        self,
        box_text: str,
        seal_to: Callable[[bytes, bytes, bytes], bytes],
        open_box: Callable[[bytes, bytes], Optional[bytes]],
        unb64: Callable[[object, int], Optional[bytes]],
    ) -> None:
        self.box_text = box_text  # ours, as it travels
        self._seal_to = seal_to
        self._open = open_box
        self._unb64 = unb64
        self.keys: "OrderedDict[str, bytes]" = OrderedDict()  # label -> its box key
        self._asked: "OrderedDict[str, float]" = OrderedDict()  # label we asked for its key -> when
        self._answered: "OrderedDict[str, float]" = OrderedDict()  # asker -> when we answered
        self._answers = new_bucket(ANSWERS_PER_S)
        self.waiting: "OrderedDict[str, None]" = OrderedDict()  # labels a message of ours waits for the key of
        self.released = False  # a key came that a message waited for (the node wakes whoever waits)
        self.counters = {"boxes_sealed": 0, "boxes_opened": 0, "box_keys_learned": 0, "keys_asked": 0,
                         "keys_answered": 0, "key_answers_refused": 0, "held_for_key": 0}

    # -- rule 3: keys -----------------------------------------------------------------------------

    def key_of(self, label: str) -> Optional[bytes]:
        return self.keys.get(label)

    def learn(self, msg: Message, verified: Optional[bool]) -> bool:
        """A first copy of a PRESENCE or KEY: its ``box`` is its origin's, if the message is verified.
        Returns whether the key is new (held messages for that origin may go now)."""
        if verified is not True or not msg.extra:
            return False
        key = self._unb64(msg.extra.get(BOX_FIELD), KEY_BYTES)
        if key is None:
            return False
        old = self.keys.pop(msg.src, None)
        self.keys[msg.src] = key
        if self.waiting.pop(msg.src, 0) is None:
            self.released = True
        while len(self.keys) > MAX_KEYS:
            self.keys.popitem(last=False)
        if old != key:
            self.counters["box_keys_learned"] += 1
        return old != key

    def wait_for(self, label: str) -> None:
        """A message of ours is held until ``label``'s key comes."""
        self.waiting[label] = None
        while len(self.waiting) > MAX_ASKED:
            self.waiting.popitem(last=False)

    def may_ask(self, label: str, now: float) -> bool:
        """Rule 4: whether to send ``label`` a key request now."""
        last = self._asked.get(label)
        if last is not None and now - last < ASK_EVERY_S:
            return False
        self._asked.pop(label, None)
        self._asked[label] = now
        while len(self._asked) > MAX_ASKED:
            self._asked.popitem(last=False)
        self.counters["keys_asked"] += 1
        return True

    def may_answer(self, msg: Message, verified: Optional[bool], now: float) -> bool:
        """Rule 4: whether a key request addressed to us gets our key back."""
        last = self._answered.get(msg.src)
        if (verified is not True or (last is not None and now - last < ANSWER_EVERY_S)
                or not take(self._answers, ANSWERS_PER_S, now)):
            self.counters["key_answers_refused"] += 1
            return False
        self._answered.pop(msg.src, None)
        self._answered[msg.src] = now
        while len(self._answered) > MAX_ASKED:
            self._answered.popitem(last=False)
        self.counters["keys_answered"] += 1
        return True

    # -- rules 1 and 5: boxes -----------------------------------------------------------------------

    def sealed_or_plain(self, msg: Message) -> bool:
        """Whether ``msg`` (a direct CHAT of ours) is a box already, or was sent in clear on purpose."""
        return msg.body.startswith(MARKER) or (msg.extra or {}).get(PLAIN_FIELD) == 1

    def seal(self, msg: Message) -> Optional[Message]:
        """``msg`` with its body sealed to its destination; None if we know no key for it yet."""
        key = self.keys.get(msg.dst)
        if key is None:
            return None
        box = self._seal_to(key, msg.body.encode("utf-8", "surrogatepass"), header_bytes(msg))
        self.counters["boxes_sealed"] += 1
        return msg._replace(body=MARKER + base64.urlsafe_b64encode(box).decode("ascii"))

    def open(self, msg: Message) -> Tuple[Optional[Message], bool]:
        """(``msg`` with its body opened, True) for a box; (msg, False) for a body in clear;
        (None, True) for a box that does not open: drop it."""
        body = msg.body
        if not body.startswith(MARKER):
            return msg, False
        text = body[len(MARKER):]
        if len(text) > MAX_BOX_CHARS or not text.isascii():
            return None, True
        try:
            box = base64.urlsafe_b64decode(text.encode("ascii"))
        except (binascii.Error, ValueError):
            return None, True
        plain = self._open(box, header_bytes(msg))
        if plain is None:
            return None, True
        try:
            opened = plain.decode("utf-8")  # strict: no lone surrogates either
        except UnicodeDecodeError:
            return None, True
        self.counters["boxes_opened"] += 1
        return msg._replace(body=opened), True

    def answer_fields(self, caps: Any) -> Dict[str, Any]:
        return {BOX_FIELD: self.box_text, "caps": list(caps)}
