"""The fast path is the slow path, faster: a canonical datagram (wire.canonical) decodes to the same
Message as the JSON decoder, and a relay taking it gives the same bytes out, the same displays and the
same counters as one made to take every datagram the long way; on the fuzzers' corpora too."""

import itertools
import json
import random

import pytest

import meshchat.relay as relaymod
from meshchat.relay import COUNTERS, Relay, RelayConfig
from meshchat.wire import CANONICAL, FIELDS, Message, WireError, _decode_json, canonical, decode, encode

from meshsim import addr_of, label_of
from test_fuzz import WALL, malformed, structured

GOOD = b'{"mid":"m1","ts":999990.5,"ttl":8,"kind":"CHAT","src":"127.0.0.1:9001","dst":"","body":"hi"}'

EDGES = [
    GOOD,
    GOOD.replace(b'"ts":999990.5', b'"ts":-0'),  # JSON's integer 0, not -0.0
    GOOD.replace(b'"ts":999990.5', b'"ts":999990'),
    GOOD.replace(b'"ts":999990.5', b'"ts":1e999'),  # infinite: refused the long way
    GOOD.replace(b'"ts":999990.5', b'"ts":1.5E+2'),
    GOOD.replace(b'"ts":999990.5', b'"ts":12345678901234567.12345678901234567890'),  # longer than peek reads
    GOOD.replace(b'"ttl":8', b'"ttl":-0'),
    GOOD.replace(b'"ttl":8', b'"ttl":0'),
    GOOD.replace(b'"ttl":8', b'"ttl":123456789012345678'),
    GOOD.replace(b'"src":"127.0.0.1:9001"', b'"src":"127.0.0.1:99999"'),  # port out of range
    GOOD.replace(b'"src":"127.0.0.1:9001"', b'"src":"127.0.0.1:0"'),
    GOOD.replace(b'"dst":""', b'"dst":"127.0.0.1:9002"'),
    GOOD.replace(b'"dst":""', b'"dst":"127.0.0.1:65536"'),
    GOOD.replace(b'"body":"hi"', '"body":"h\u00e9 \U0001f600"'.encode()),  # raw UTF-8
    GOOD.replace(b'"body":"hi"', b'"body":"h\xed\xa0\x80"'),  # an encoded surrogate: not UTF-8
    GOOD.replace(b'"body":"hi"', b'"body":"tab\there"'),  # a raw control character: not JSON
    GOOD.replace(b'"body":"hi"', b'"body":"\x7f"'),
    GOOD.replace(b'"body":"hi"', b'"body":"a\\"b"'),  # an escape: the long way
    GOOD.replace(b'"mid":"m1"', b'"mid":"' + b"x" * 64 + b'"'),
    GOOD.replace(b'"mid":"m1"', b'"mid":"' + b"x" * 65 + b'"'),
    GOOD.replace(b'"mid":"m1"', b'"mid":" "'),
    GOOD.replace(b'"kind":"CHAT"', b'"kind":"chat"'),
    GOOD[:-1] + b',"ttl0":8,"nick":"bob"}',
    GOOD[:-1] + b',"ttl0":8,"ttl0":9}',  # a key given twice: JSON keeps the last
    GOOD[:-1] + b',"ttl":3}',  # a known key again
    GOOD[:-1] + b',"mid":"m2"}',
    GOOD[:-1] + b',"n":-0,"s":""}',
    GOOD[:-1] + b',"n":0123}',
    GOOD[:-1] + b',"n":1.5}',  # not an integer: the long way
    GOOD[:-1] + b',"part":[1,2]}',
    GOOD + b" ",
    b" " + GOOD,
    GOOD.replace(b",", b", "),
    GOOD[:-1] + b"".join(b',"k%d":%d' % (i, i) for i in range(16)) + b"}",  # as many fields as it takes
    GOOD[:-1] + b"".join(b',"k%d":%d' % (i, i) for i in range(17)) + b"}",  # more: the long way
    GOOD.replace(b'"body":"hi"', b'"body":"' + b"x" * 1500 + b'"'),  # longer than we send: the long way
    GOOD[:-1] + b',"n":1',  # no closing brace
    GOOD[:-1] + b',"n":12}}',
]


BYTES = b'"\\\x00\x1f\x7f\xc3\xa9\xed-+09eE.:,{}[] az_Z'


def near_canonical(rng: random.Random, i: int) -> bytes:
    """A datagram as our encoder writes it, with extension fields, then (mostly) damaged in one to three
    bytes: what exercises the canonical expression's every edge."""
    extra = {}
    for key in rng.sample(["ttl0", "nick", "ack", "zz", "part", "ttl", "mid", "n"], rng.randrange(4)):
        extra[key] = rng.choice([8, -0, 10 ** 17, "ann", "", "\u00e9", [1, 2], 1.5])
    msg = Message(f"m{i}", rng.choice([WALL, WALL + 0.25, 0.0, -1.5e3]), rng.choice([8, 1, 0, 16, 40]),
                  rng.choice(["CHAT", "PING", "PONG", "NEWKIND"]), f"127.0.0.{rng.randrange(1, 4)}:{rng.choice([1, 9001, 65535])}",
                  rng.choice(["", "127.0.0.1:9002"]), rng.choice(["hi", "h\u00e9llo", "a b c" * 20]), extra)
    obj = {**{f: getattr(msg, f) for f in FIELDS}, **extra}
    data = bytearray(json.dumps(obj, separators=(",", ":"), ensure_ascii=rng.random() < 0.5).encode())
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        at = rng.randrange(len(data))
        how = rng.randrange(3)
        if how == 0:
            data[at] = rng.choice(BYTES)
        elif how == 1:
            data.insert(at, rng.choice(BYTES))
        else:
            del data[at]
    return bytes(data)


def _same(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(WireError):
            decode(data)
        return
    fast = canonical(text)
    try:
        slow = _decode_json(text)
    except WireError:
        slow = None
    if fast is None:
        return
    assert slow is not None, data
    msg, match = fast
    assert msg == slow and repr(msg) == repr(slow), data  # repr: -0.0 and 0.0 are ==, not the same
    assert list(msg.extra) == list(slow.extra), data
    assert decode(data) == slow


@pytest.mark.parametrize("data", EDGES)
def test_canonical_decodes_as_json_does_on_the_edges(data):
    _same(data)


def test_edges_take_the_fast_path_where_they_should():
    assert canonical(GOOD.decode())[0] == Message("m1", 999990.5, 8, "CHAT", "127.0.0.1:9001", "", "hi", {})
    # What our own encoder writes, extension fields included, is canonical.
    mine = Message("n-1", 1764136255.123, 8, "CHAT", "10.0.0.1:9000", "", "hello there", {"ttl0": 8, "nick": "ann"})
    assert canonical(encode(mine).decode())[0] == mine
    for data in (EDGES[3], EDGES[9], EDGES[23], EDGES[24], EDGES[17], EDGES[28], EDGES[-4], EDGES[-3]):
        assert canonical(data.decode("utf-8", "replace")) is None, data
    assert canonical(EDGES[-5].decode()) is not None


def test_hostile_shapes_are_left_to_the_json_way():
    """Unclosed strings, too many fields, numbers that run on: refused here, decoded (or refused,
    saying why) the JSON way."""
    head = GOOD[:-1].decode()
    for text in (head[:-2] + "x" * 1400, head + ',"a":123456789012345678' * 60 + ',"b":1}x',
                 head + "".join(',"k%d":1' % i for i in range(60)) + "}", head + ',"a":"' + "y" * 1300,
                 head + ',"a":1234567890123456789}'):
        assert canonical(text) is None
        _same(text.encode())


def _relays(slow: bool):
    cfgs = [RelayConfig(label=label_of(1), rate_limit=0, seen_max=1_000_000),
            RelayConfig(label=label_of(5), rate_limit=50.0, display=False)]
    counter = itertools.count()  # our own ids (PONGs) the same in both runs
    return [Relay(c, [addr_of(2), addr_of(3), addr_of(4)], new_mid=lambda: f"own{next(counter)}") for c in cfgs]


def _outcomes(relays, datagrams, monkeypatch, slow: bool):
    if slow:
        monkeypatch.setattr(relaymod, "_canonical", lambda text: None)
    out = []
    try:
        for i, (data, sender) in enumerate(datagrams):
            for r in relays:
                actions = r.datagram_received(data, sender, 100.0 + i * 0.001, WALL)
                out.append([tuple(a) for a in actions])
        return out, [r.counters.as_dict() for r in relays]
    finally:
        monkeypatch.undo()


def test_relay_fast_and_slow_paths_give_the_same_bytes_displays_and_counters(monkeypatch):
    rng = random.Random(15)
    datagrams = []
    for i in range(5000):
        data = (malformed(rng), structured(rng, i).data, near_canonical(rng, i), near_canonical(rng, i))[i % 4]
        sender = addr_of(rng.choice([2, 3, 9]))
        datagrams.append((data, sender))
        if rng.random() < 0.3:  # a duplicate, from another neighbour, maybe with fewer hops
            datagrams.append((data.replace(b'"ttl":8', b'"ttl":1'), addr_of(rng.choice([2, 3, 4]))))
    fast = _outcomes(_relays(False), datagrams, monkeypatch, slow=False)
    slow = _outcomes(_relays(True), datagrams, monkeypatch, slow=True)
    assert fast[1] == slow[1]
    assert fast[0] == slow[0]
    c = fast[1][0]
    assert c["relayed"] > 300 and c["dropped_duplicate"] > 200 and c["dropped_malformed"] > 500
    assert c["displayed"] > 100 and fast[1][1]["dropped_rate"] > 0


def test_a_relayed_canonical_copy_is_the_datagram_with_only_its_ttl_changed():
    r = Relay(RelayConfig(label=label_of(1)), [addr_of(2), addr_of(3)])
    data = GOOD.replace(b'"ts":999990.5', b'"ts":%r' % WALL)[:-1] + b',"ttl0":8,"zz":"kept as it came"}'
    assert CANONICAL.match(data.decode())
    sends = [a for a in r.datagram_received(data, addr_of(2), 1.0, WALL) if type(a).__name__ == "Send"]
    assert [s.data for s in sends] == [data.replace(b'"ttl":8', b'"ttl":7')]
    assert json.loads(sends[0].data)["ttl"] == 7


def test_counters_are_the_same_names():
    assert set(_relays(False)[0].counters.as_dict()) == set(COUNTERS)


def _old_chat_line(m, late=False, verified=None, sealed=None, encrypted=None) -> str:
    """The JSON console's chat line as session 4 wrote it (json.dumps of emit's keyword fields)."""
    from meshchat.console import nick_of, part_of
    part = part_of(m)
    extra = {"part": list(part)} if part else {}
    if late:
        extra["late"] = True
    if sealed is not None:
        extra["sealed"] = sealed
    if m.dst:
        extra["encrypted"] = bool(encrypted)
    return json.dumps({"event": "chat", "mid": m.mid, "src": m.src, "nick": nick_of(m), "dst": m.dst, "body": m.body,
                       "ts": m.ts, "ttl": m.ttl, "verified": bool(verified), **extra}) + "\n"


@pytest.mark.parametrize("extra", [{}, {"nick": "ann"}, {"nick": "bad nick"}, {"part": [2, 3], "nick": "b"},
                                   {"part": [3, 2]}, {"ttl0": 8}])
@pytest.mark.parametrize("flags", [(False, None, None, None), (True, True, True, True), (False, False, False, False)])
def test_json_console_chat_line_is_what_it_was(extra, flags):
    import io
    from meshchat.console import JsonConsole
    for dst in ("", "127.0.0.1:9002"):
        m = Message("m1", WALL + 0.125, 7, "CHAT", "127.0.0.1:9001", dst, "h\u00e9llo \"you\"\n\U0001f600", extra)
        out = io.StringIO()
        JsonConsole(out).chat(m, *flags)
        assert out.getvalue() == _old_chat_line(m, *flags)
