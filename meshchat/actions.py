"""What the relay's decisions come out as (actions), and the helpers that read and rewrite a datagram
without decoding it all. Shared by relay.py and its capability hooks (relay_*.py); no I/O."""

import re
from typing import NamedTuple, Optional, Tuple

from .wire import CANONICAL, MAX_MID_CHARS, Addr, Message, encode


class Send(NamedTuple):
    """Send ``data`` to each of ``addrs``."""

    data: bytes
    addrs: Tuple[Addr, ...]


class Display(NamedTuple):
    """Show ``message`` to the user; ``late``: it came by repair or catch-up, after later ones;
    ``verified``: signed by its origin's pinned key (None: this node cannot check signatures).
    ``sealed``: None outside a closed mesh, else whether it came sealed under the network key."""

    message: Message
    late: bool = False
    verified: Optional[bool] = None
    sealed: Optional[bool] = None
    encrypted: Optional[bool] = None  # a direct message: it came sealed to us (None: a broadcast, or no E2E here)


class Pong(NamedTuple):
    """A PONG answered our PING ``mid`` from ``src`` after ``rtt_ms``."""

    src: str
    rtt_ms: float
    mid: str


class Notice(NamedTuple):
    """Something the node tells its user."""

    text: str


_HEAD = re.compile(rb'\{"mid":"([^"\\]{1,%d})","ts":[-+.0-9eE]{1,40},"ttl":(-?[0-9]{1,30}),' % (4 * MAX_MID_CHARS))


def peek(data: bytes) -> "Tuple[Optional[str], Optional[re.Match[bytes]]]":
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


def with_ttl(data: bytes, head: "Optional[re.Match]", msg: Message, ttl: int) -> bytes:
    """``data`` with ``ttl``: the digits rewritten in place when that is exact, else encoded anew."""
    # Exact only if the head's ttl is the one JSON decoded and no other "ttl" key
    # (a duplicate key, escaped or not, or one in a nested unknown field) could be
    # taken for it. Otherwise encode what decode validated, which always encodes.
    if head is not None and head.re is CANONICAL:
        # Canonical: the ttl digits are the only "ttl" and ASCII, as is all before them (wire.py).
        start, end = head.span(3)
        return b"%s%d%s" % (data[:start], ttl, data[end:])
    if head is not None and int(head.group(2)) == msg.ttl and _TTL_KEY.search(data, head.end()) is None:
        start, end = head.span(2)
        return b"%s%d%s" % (data[:start], ttl, data[end:])
    return encode(msg._replace(ttl=ttl))
