"""The wire format: one compact JSON object per UDP datagram.

Rules, so that every node agrees:
1. A datagram is one UTF-8 JSON object with the seven fields of the seed
   design: mid, ts, ttl, kind, src, dst, body.
2. Fields this version does not know are kept in ``Message.extra`` and sent
   on unchanged, so newer nodes can add fields without breaking older ones.
3. Validation is total: everything a node may have to encode again, known
   field or not, is checked once here (finite numbers, integers of at most
   30 digits, at most 32 levels of nesting, strings of Unicode scalar values,
   ports of at most 5 digits), so any Message that ``decode`` returns encodes.
4. Anything else is a ``WireError`` whose text names the field at fault;
   the codec (decode and encode) never raises anything but ``WireError``.

Pure functions, no I/O: called from the socket thread and the main thread.
"""

import functools
import json
import math
import re
from typing import Any, Dict, NamedTuple, Optional, Tuple

KNOWN_KINDS = ("CHAT", "PING", "PONG")
FIELDS = ("mid", "ts", "ttl", "kind", "src", "dst", "body")
MAX_MID_CHARS = 64
MAX_HOST_CHARS = 253
MAX_INT_DIGITS = 30  # a longer integer is an attack on int(), not a value
MAX_PORT_DIGITS = 5  # int() refuses some longer digit strings (Python 3.11+) with a ValueError
MAX_DEPTH = 32  # arrays and objects nested in a datagram, the message itself counted as one

# An unknown kind is still relayed, so that newer kinds cross older nodes.
_KIND_RE = re.compile(r"[A-Z][A-Z0-9_]{0,15}\Z")
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+\Z")
# JSON's \uXXXX escapes can make a lone surrogate, which is no character and no
# encoder but ours takes (a UTF-8 terminal raises on it).
_SURROGATE = re.compile("[\ud800-\udfff]")

Addr = Tuple[str, int]


class WireError(ValueError):
    """A datagram or address that is not valid; the text says why."""


class Message(NamedTuple):
    mid: str
    ts: float
    ttl: int
    kind: str
    src: str
    dst: str
    body: str
    extra: Dict[str, Any] = {}

    @property
    def is_broadcast(self) -> bool:
        return self.dst == ""


def parse_addr(text: str) -> Addr:
    """Split ``host:port`` into a tuple, or raise WireError saying what is wrong."""
    if not isinstance(text, str):
        raise WireError("address must be a string")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise WireError(f"{_shown(text)} is not HOST:PORT")
    if len(host) > MAX_HOST_CHARS or not _HOST_RE.match(host):
        raise WireError(f"{_shown(text)} has an invalid host")
    if not (0 < len(port) <= MAX_PORT_DIGITS and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise WireError(f"{_shown(text)} needs a port from 1 to 65535")
    return host, int(port)


def _shown(text: str) -> str:
    """``text`` quoted for an error message, cut so that the message stays one short line."""
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def format_addr(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def _reject_constant(name: str) -> Any:
    raise WireError(f"{name} is not a number")


def _parse_int(digits: str) -> int:
    if len(digits) > MAX_INT_DIGITS:
        raise WireError(f"integer of {len(digits)} digits")
    return int(digits)


# Made once: json.dumps and json.loads with options build a new coder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_parse_int)
_scan = _DECODER.scan_once  # the decoder's own scanner, without its whitespace handling

# Labels repeat from message to message; remember the valid ones.
_valid_addr = functools.lru_cache(maxsize=4096)(parse_addr)


def encode(msg: Message) -> bytes:
    """The datagram for ``msg``: compact JSON, ASCII-only so any str encodes.

    Raises only WireError (a Message made by hand may hold what JSON cannot)."""
    obj = {
        "mid": msg.mid,
        "ts": msg.ts,
        "ttl": msg.ttl,
        "kind": msg.kind,
        "src": msg.src,
        "dst": msg.dst,
        "body": msg.body,
    }
    if msg.extra:
        obj.update(msg.extra)
    try:
        return _ENCODER.encode(obj).encode("ascii")
    except (ValueError, TypeError, RecursionError) as e:
        raise WireError(f"cannot encode: {e}") from None


# The canonical form: the compact JSON ``encode`` (and the seed design) writes, with strings that need
# no escapes and extra fields that are small integers or such strings. Most datagrams are in it, and
# then regular expressions both parse and validate them: no JSON scan, no second pass, and the ttl
# digits are known to be the only "ttl" (a copy rewrites them in place: actions.with_ttl).
# Groups: 1 mid, 2 ts, 3 ttl, 4 kind, 5 src, 6 dst, 7 body; the extra fields follow, one match each.
# Strings are taken by a look-ahead and a back-reference, which never backtrack, so a hostile datagram
# costs time linear in its length. Anything else, or anything they cannot settle, goes the long way
# (``_decode_json``); tests hold the two to one result.
_LABEL = r'[A-Za-z0-9._-]{1,253}:[0-9]{1,5}'
_PLAIN = r'[^"\\\x00-\x1f]'  # a character of a JSON string that needs no escape
CANONICAL = re.compile(
    r'\{"mid":"([\x20\x21\x23-\x5b\x5d-\x7e]{1,%d})",'  # printable ASCII but the quote and backslash
    r'"ts":(-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?),'
    r'"ttl":(-?(?:0|[1-9][0-9]{0,17})),"kind":"([A-Z][A-Z0-9_]{0,15})",'
    r'"src":"(%s)","dst":"((?:%s)?)","body":"(?=(%s*))\7"' % (MAX_MID_CHARS, _LABEL, _LABEL, _PLAIN))
_EXTRA = re.compile(r',"([a-z][a-z0-9_]{0,31})":(?:(-?(?:0|[1-9][0-9]{0,17}))(?=[,}])|"(?=(%s{0,1400}))\3")'
                    % _PLAIN)
_INF = float("inf")
# Bounds that keep a hostile datagram's cost here below the JSON way's: meshchat sends no datagram
# longer than relay.MAX_SEND_BYTES (1400) and no message with more than a few extension fields.
CANONICAL_MAX_CHARS = 1500
CANONICAL_MAX_EXTRA = 16


def canonical(text: str) -> "Optional[Tuple[Message, re.Match[str]]]":
    """A datagram's text in the canonical form, parsed and validated: the Message, exactly as
    ``decode`` gives it, and the match (for the ttl's place); None when only ``decode`` can settle
    it (not canonical, a repeated key, a port out of range, an infinite ts)."""
    if len(text) > CANONICAL_MAX_CHARS:
        return None
    m = CANONICAL.match(text)
    if m is None:
        return None
    mid, ts_text, ttl, kind, src, dst, body = m.groups()
    if len(ts_text) > 40:
        return None  # past what actions.peek reads: the relay's duplicate check must see what it saw
    last = len(text) - 1
    if text[last] != "}":
        return None
    extra: Dict[str, Any] = {}
    pos = m.end()
    while pos < last:
        e = _EXTRA.match(text, pos)
        if e is None:
            return None
        key, digits, value = e.groups()
        if key in extra or key in FIELDS or len(extra) == CANONICAL_MAX_EXTRA:
            return None  # JSON keeps the last of two: the long way says which
        extra[key] = int(digits) if digits is not None else value
        pos = e.end()
    if pos != last:
        return None
    try:
        # JSON reads "-0" as the integer 0, which float() would make -0.0.
        ts = float(ts_text) if "." in ts_text or "e" in ts_text or "E" in ts_text else float(int(ts_text))
        _valid_addr(src)
        if dst:
            _valid_addr(dst)
    except WireError:
        return None
    if ts == _INF or ts == -_INF:
        return None
    return Message(mid, ts, int(ttl), kind, src, dst, body, extra), m


def decode(data: bytes) -> Message:
    """Parse and validate one datagram. Raises only WireError."""
    try:
        text = data.decode("utf-8")  # strict: never a surrogate, so no string of it needs that check
    except UnicodeDecodeError:
        raise WireError("not UTF-8") from None
    fast = canonical(text)
    if fast is not None:
        return fast[0]
    return _decode_json(text)


def _decode_json(text: str) -> Message:
    """``decode`` the long way: any JSON, validated field by field."""
    try:
        # A datagram is usually one object and nothing around it: scan it directly;
        # anything else (whitespace, extra data, no value at all) takes the long way.
        try:
            obj, end = _scan(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            obj = _DECODER.decode(text)
    except WireError:
        raise
    except (ValueError, RecursionError):
        # RecursionError: deep nesting is not a ValueError.
        raise WireError("not JSON") from None
    if not isinstance(obj, dict):
        raise WireError("not a JSON object")
    return message_from_dict(obj)


def message_from_dict(obj: Dict[str, Any]) -> Message:
    """Validate the fields of a decoded JSON object."""
    try:
        mid = obj["mid"]
        ts = obj["ts"]
        ttl = obj["ttl"]
        kind = obj["kind"]
        src = obj["src"]
        dst = obj["dst"]
        body = obj["body"]
    except KeyError as e:
        raise WireError(f"missing field {e.args[0]!r}") from None
    if not isinstance(mid, str) or not 0 < len(mid) <= MAX_MID_CHARS or not mid.isprintable():
        raise WireError(f"mid must be 1 to {MAX_MID_CHARS} printable characters")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise WireError("ts must be a number")
    try:
        ts = float(ts)
    except OverflowError:
        raise WireError("ts is out of range") from None
    if not math.isfinite(ts):
        raise WireError("ts must be finite")
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise WireError("ttl must be an integer")
    if kind not in KNOWN_KINDS and (not isinstance(kind, str) or not _KIND_RE.match(kind)):
        raise WireError("kind must be an upper-case word of at most 16 characters")
    if not isinstance(src, str):
        raise WireError("src must be a string")
    _valid_addr(src)
    if dst != "":
        if not isinstance(dst, str):
            raise WireError("dst must be a string")
        _valid_addr(dst)
    if not isinstance(body, str):
        raise WireError("body must be a string")
    if not body.isascii() and _SURROGATE.search(body):  # isascii() is O(1) in CPython
        raise WireError("body has a lone surrogate")
    if len(obj) > len(FIELDS):
        extra = {k: v for k, v in obj.items() if k not in FIELDS}
        _check_extra(extra)
    else:
        extra = {}
    return Message(mid, ts, ttl, kind, src, dst, body, extra)


def _check_extra(extra: Dict[str, Any]) -> None:
    """Unknown fields are relayed as they are: what could not be encoded again is malformed."""
    for key, value in extra.items():
        try:
            _check_value(value, 2)
            _check_str(key)
        except WireError as e:
            raise WireError(f"field {key[:20]!r}: {e}") from None


def _check_str(text: str) -> None:
    if not text.isascii() and _SURROGATE.search(text):
        raise WireError("lone surrogate")


def _check_value(value: Any, depth: int) -> None:
    """``value`` as JSON decoded it, ``depth`` containers deep (the message is 1)."""
    kind = type(value)
    if kind is str:
        _check_str(value)
    elif kind is float:
        if not math.isfinite(value):  # json takes 1e999 as inf, which it will not write
            raise WireError("number out of range")
    elif kind is list or kind is dict:
        if depth > MAX_DEPTH:
            raise WireError(f"nested over {MAX_DEPTH} deep")
        if kind is dict:
            for key, item in value.items():
                _check_str(key)
                _check_value(item, depth + 1)
        else:
            for item in value:
                _check_value(item, depth + 1)
    # int (at most MAX_INT_DIGITS, see _parse_int), bool and None always encode
