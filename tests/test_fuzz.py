"""Seeded fuzzing: malformed input never raises anything but WireError, and a live node survives it.

The structure-aware part builds valid messages and damages them on purpose, one
class of hostile value at a time, then runs each through the whole path: decode,
a relaying and a displaying relay, the encoded copies, and both consoles. CI runs
a short share; ``MESHCHAT_SLOW=1`` adds the full run of 100,000 cases.
"""

import io
import json
import xml.etree.ElementTree as ET
import os
import queue
import random
import socket
import sys
import threading
import time
from typing import List, NamedTuple, Optional, Tuple

import pytest

from meshchat.console import JsonConsole, TerminalConsole
from meshchat.relay import COUNTERS, Display, Relay, RelayConfig, Send
from meshchat.wire import Message, WireError, _decode_json, canonical, decode, encode

from meshsim import addr_of, label_of
from nodes import Cluster

SLOW = pytest.mark.skipif(os.environ.get("MESHCHAT_SLOW") != "1", reason="full fuzzing run; set MESHCHAT_SLOW=1")

GOOD = {"mid": "fuzz", "ts": 0.0, "ttl": 8, "kind": "CHAT", "src": "127.0.0.1:9001", "dst": "", "body": "hi"}
WRONG_VALUES = [None, True, False, 0, -1, 1.5, 10 ** 40, -(10 ** 40), "", "x" * 70, "\x00", "\ud800", [],
                {}, [1, [2, [3]]], {"a": {"b": 1}}, "127.0.0.1", "h:99999", "ＣＨＡＴ", "chat", "PING PONG"]
RAW_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 5000, b"-" + b"9" * 5000,
               b"0x10", b"01", b"1.", b".5", b"+1"]
UNICODE = ["\ud800", "\udfff", "\ufeff", "\u202e", "\U0010ffff", "\x00", "é" * 100, "\U0001f600" * 50]


def malformed(rng: random.Random) -> bytes:
    """One input chosen from the kinds of damage a datagram can have."""
    kind = rng.randrange(9)
    valid = json.dumps(dict(GOOD, mid="m%d" % rng.randrange(10**9), ts=time.time())).encode()
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:  # truncated JSON
        return valid[: rng.randrange(len(valid))]
    if kind == 2:  # one field with a wrong type or value
        obj = dict(GOOD)
        obj[rng.choice(list(GOOD))] = rng.choice(WRONG_VALUES)
        return json.dumps(obj).encode()
    if kind == 3:  # a field missing
        obj = dict(GOOD)
        del obj[rng.choice(list(GOOD))]
        return json.dumps(obj).encode()
    if kind == 4:  # a raw number JSON cannot or should not carry
        field = rng.choice([b'"ts":0.0', b'"ttl":8'])
        name = field.split(b":")[0]
        compact = json.dumps(GOOD, separators=(",", ":")).encode()
        return compact.replace(field, name + b":" + rng.choice(RAW_NUMBERS))
    if kind == 5:  # deep nesting, in an unknown field or as the whole datagram
        depth = rng.choice([50, 1000, 100_000])
        nest = b"[" * depth + b"]" * depth
        return nest if rng.random() < 0.5 else valid[:-1] + b',"x":' + nest + b"}"
    if kind == 6:  # unicode edge cases, as JSON escapes and as raw (maybe invalid) UTF-8
        text = rng.choice(UNICODE)
        obj = dict(GOOD, body=text, mid=text[:60] or "m")
        raw = json.dumps(obj).encode()
        return raw if rng.random() < 0.5 else raw.replace(b"\\ud800", b"\xed\xa0\x80")
    if kind == 7:  # not an object
        return json.dumps(rng.choice([[], [GOOD], "CHAT", 7, None, True])).encode()
    # oversized, or bit flips of a valid datagram
    if rng.random() < 0.2:
        return valid[:-2] + b"x" * rng.randrange(8200, 12000) + b'"}'
    data = bytearray(valid)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def test_decoder_survives_100k_malformed_inputs():
    rng = random.Random(20261124)
    rejected = 0
    for _ in range(100_000):
        data = malformed(rng)
        try:
            msg = decode(data)
        except WireError:
            rejected += 1
            continue
        # Some damage leaves a valid message (a flipped letter in the body): it must re-encode.
        assert isinstance(msg, Message)
        assert decode(encode(msg)) == msg
    assert rejected > 80_000


def test_live_node_survives_10k_malformed_datagrams_then_still_relays():
    rng = random.Random(7)
    with Cluster(3, [(1, 2), (2, 3)], rate_limit=0) as c:
        target = c[2].node.addr
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(100):  # in batches, so that no socket buffer overflows
                for _ in range(100):
                    s.sendto(malformed(rng)[:65000], target)
                    sent += 1
                c.wait_until(lambda: c[2].node.stats()["received"] >= sent, timeout=20)
        c[1].node.say("still alive?")
        c[3].wait_for_body("still alive?")
        stats = c[2].node.stats()
        assert stats["received"] == sent + 1
        assert stats["handled"] + sum(stats[k] for k in COUNTERS if k.startswith("dropped_")) == stats["received"]
        assert stats["dropped_malformed"] + stats["dropped_oversize"] > 9000


def test_counters_add_up_at_every_read_under_load():
    rng = random.Random(3)
    stop = threading.Event()
    datagrams = [encode(Message("m%d" % (i % 3000), time.time(), 3, "CHAT", "127.0.0.1:1", "", "x"))
                 if i % 4 else malformed(rng)[:1500] for i in range(12_000)]
    with Cluster(2, [(1, 2)], rate_limit=50) as c:
        target = c[1].node.addr

        def blast(part):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for data in part:
                    if stop.is_set():
                        return
                    s.sendto(data, target)

        senders = [threading.Thread(target=blast, args=(datagrams[k::3],)) for k in range(3)]
        for t in senders:
            t.start()
        reads = 0
        try:
            # Read the counters after every datagram the node finishes, until it has had
            # nothing to do for a second (the senders may finish long before the node does).
            while True:
                try:
                    c.processed.get(timeout=1.0)
                except queue.Empty:
                    break
                s = c[1].node.stats()
                assert s["handled"] + sum(s[k] for k in COUNTERS if k.startswith("dropped_")) == s["received"]
                reads += 1
        finally:
            stop.set()
            for t in senders:
                t.join()
        final = c[1].node.stats()
        assert reads > 100 and final["dropped_rate"] > 0 and final["dropped_malformed"] > 0


# -- structure-aware: valid messages with one thing made hostile -------------------------------

WALL = 1_000_000.0
LIMIT = sys.getrecursionlimit()


class Hostile(NamedTuple):
    """A raw JSON value, and when it must make the datagram malformed."""

    name: str
    raw: bytes
    # "always": wherever it is, even under a key given again later; "kept": if it is the
    # value that counts (the last of its key); "addr": if kept in src or dst; "": no rule.
    rule: str


def _nest(depth: int, shape: str, leaf: bytes = b"0") -> bytes:
    opens = {"array": [b"["], "object": [b'{"a":'], "mixed": [b"[", b'{"a":']}[shape]
    closes = {b"[": b"]", b'{"a":': b"}"}
    seq = [opens[i % len(opens)] for i in range(depth)]
    return b"".join(seq) + leaf + b"".join(closes[o] for o in reversed(seq))


def _hostile_values() -> List[Hostile]:
    out = [
        Hostile("1e999", b"1e999", "kept"), Hostile("-1e999", b"-1e999", "kept"),
        Hostile("1E400", b"1E400", "kept"), Hostile("400 digits.5", b"1" + b"0" * 400 + b".5", "kept"),
        Hostile("NaN", b"NaN", "always"), Hostile("Infinity", b"Infinity", "always"),
        Hostile("-Infinity", b"-Infinity", "always"),
        Hostile("int 30 digits", b"9" * 30, ""), Hostile("int 31 digits", b"9" * 31, "always"),
        Hostile("int -31 digits", b"-" + b"9" * 31, "always"), Hostile("int 5000 digits", b"9" * 5000, "always"),
        Hostile("float of 5000 digits", b"0." + b"1" * 5000, ""),
        Hostile("lone high surrogate", b'"\\ud800"', "kept"), Hostile("lone low surrogate", b'"\\uDFFF"', "kept"),
        Hostile("surrogate inside", b'"x\\udbffy"', "kept"),
        Hostile("reversed pair", b'"\\ude00\\ud83d"', "kept"),
        Hostile("surrogate pair", b'"\\ud83d\\ude00"', ""),
        Hostile("surrogate in a nested key", b'{"ok":{"\\udc00":1}}', "kept"),
        Hostile("surrogate deep", _nest(5, "mixed", b'"\\ud800"'), "kept"),
        Hostile("1e999 deep", _nest(5, "mixed", b"1e999"), "kept"),
        Hostile("NaN deep", _nest(5, "array", b"NaN"), "always"),
        Hostile("encoded surrogate", b'"\xed\xa0\x80"', "always"), Hostile("byte ff", b'"\xff"', "always"),
        Hostile("overlong", b'"\xc0\xaf"', "always"), Hostile("above U+10FFFF", b'"\xf4\x90\x80\x80"', "always"),
        Hostile("cut sequence", b'"\xe2\x82"', "always"),
        Hostile("controls and bidi", b'"\\u001b[2J\\u0000\\u202e\\u2066\\ufeff\\u200b\\u2028"', ""),
        Hostile("combining marks", b'"e' + b"\\u0301" * 200 + b'"', ""),
    ]
    for digits in ("123456", "9" * 4300, "1" * 4301, "1" * 5000, "0" * 4999 + "1", "65536", "0", ""):
        out.append(Hostile(f"port of {len(digits)} digits", b'"127.0.0.1:%s"' % digits.encode(), "addr"))
    out.append(Hostile("port 00001", b'"127.0.0.1:00001"', ""))
    # Depth counts the value's own arrays and objects; an unknown field's value sits
    # inside the message, so 31 is the most it may have.
    for depth in (30, 31, 32, 33, 34, 1000, LIMIT - 50, LIMIT - 10, LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 50, 100_000):
        for shape in ("array", "object", "mixed"):
            out.append(Hostile(f"{shape} {depth} deep", _nest(depth, shape), "kept" if depth > 31 else ""))
    return out


HOSTILE = _hostile_values()
KNOWN = ("mid", "ts", "ttl", "kind", "src", "dst", "body")
BODIES = ["hi", "", "é☃\U0001f600", "\x1b]0;title\x07", "\u202eevil", "a\u0301" * 50, "x" * 300, "\\\"ttl\":9"]


def _escaped_key(rng: random.Random, key: str) -> bytes:
    """``key`` as JSON, with some of its characters (at least one) written as \\u escapes."""
    pick = [rng.random() < 0.5 for _ in key]
    if key and not any(pick):
        pick[rng.randrange(len(key))] = True
    return b'"' + b"".join(b"\\u%04x" % ord(c) if p else json.dumps(c)[1:-1].encode() for c, p in zip(key, pick)) + b'"'


class Case(NamedTuple):
    data: bytes
    what: str  # what was done to it, for the failure message
    must_reject: bool
    must_accept: bool
    used: Tuple[str, ...]  # classes of damage and hostile values in it


class _Builder:
    def __init__(self, rng: random.Random, serial: int) -> None:
        self.rng = rng
        ttl = rng.choice([1, 2, 3, 8, 16, 40])
        kind = rng.choice(["CHAT", "CHAT", "CHAT", "PING", "PONG", "FILE_X"])
        dst = rng.choice(["", "", label_of(1), label_of(5), label_of(8)])
        values = {"mid": "f%d" % serial, "ts": WALL + rng.choice([0.0, 0.5, -3.25]), "ttl": ttl, "kind": kind,
                  "src": label_of(rng.choice([7, 8, 9])), "dst": dst, "body": rng.choice(BODIES)}
        # [decoded key, key as written, value as written, rule of the value, rule of the key]
        self.pairs: List[Tuple[str, bytes, bytes, str, str]] = [
            (k, json.dumps(k).encode(), json.dumps(values[k]).encode(), "", "") for k in KNOWN]
        self.what: List[str] = []
        self.hostile = False  # a value or key from the hostile lists was put in
        self.used: List[str] = []
        self.lead, self.trail, self.colon = b"", b"", b":"

    def valid_value(self, key: str) -> bytes:
        if key not in KNOWN:
            return self.rng.choice([b"1", b"1.5", b'"v"', b"null", b'[1,{"a":[]}]', b"true", b'{"ttl":3}'])
        return {"mid": b'"dup%d"' % self.rng.randrange(10**9), "ts": b"%r" % WALL, "ttl": b"%d" % self.rng.randrange(1, 9),
                "kind": b'"CHAT"', "src": b'"10.0.0.7:9000"', "dst": b'""', "body": b'"again"'}[key]

    def mutate(self) -> None:
        rng = self.rng
        step = rng.randrange(100)
        self.hostile = self.hostile or step < 66
        if step < 30:  # a known field replaced by a hostile value
            i = rng.randrange(len(KNOWN))
            h = rng.choice(HOSTILE)
            k, kraw, _, _, krule = self.pairs[i]
            self.pairs[i] = (k, kraw, h.raw, h.rule, krule)
            self.what.append(f"{k}={h.name}")
            self.used += ["known field", h.name]
        elif step < 60:  # an unknown field holding a hostile value
            h = rng.choice(HOSTILE)
            key = rng.choice(["x", "sig", "hops", "tt"])
            self.pairs.append((key, json.dumps(key).encode(), h.raw, h.rule, ""))
            self.what.append(f"extra {key}={h.name}")
            self.used += ["unknown field", h.name]
        elif step < 66:  # a hostile key
            key, raw, rule = rng.choice([("\ud800", b'"\\ud800"', "kept"), ("k\udfff", b'"k\\udfff"', "kept"),
                                         ("?", b'"\xed\xa0\x80"', "always"), ("?", b'"\xff"', "always")])
            self.pairs.append((key, raw, b"1", "", rule))
            self.what.append(f"key {raw!r}")
            self.used.append("hostile key")
        elif step < 86:  # a key given twice: hostile or valid, written plainly, escaped or spaced
            key = rng.choice(KNOWN + ("x",))
            kraw = _escaped_key(rng, key) if rng.random() < 0.5 else json.dumps(key).encode()
            if rng.random() < 0.3:
                kraw += b" "
            if rng.random() < 0.5:
                h = rng.choice(HOSTILE)
                self.hostile = True
                self.pairs.append((key, kraw, h.raw, h.rule, ""))
                self.what.append(f"again {kraw!r}={h.name}")
                self.used += ["key given twice", h.name]
            else:
                self.pairs.append((key, kraw, self.valid_value(key), "", ""))
                self.what.append(f"again {kraw!r}=valid")
                self.used.append("key given twice")
        elif step < 94:  # a known key written with escapes
            i = rng.randrange(len(KNOWN))
            k, _, v, vrule, _ = self.pairs[i]
            self.pairs[i] = (k, _escaped_key(rng, k), v, vrule, "")
            self.what.append(f"escaped {k}")
            self.used.append("escaped key")
        else:  # whitespace where compact JSON has none
            self.lead = rng.choice([b" ", b"\n", b"\t \r\n"])
            self.trail = rng.choice([b"", b" ", b"\r\n"])
            self.colon = rng.choice([b" :", b": ", b" : "])
            self.what.append("whitespace")
            self.used.append("whitespace")

    def build(self) -> Case:
        if self.rng.random() < 0.15:
            self.lead = self.rng.choice([self.lead, b" "])
            self.trail = self.rng.choice([self.trail, b"\n"])
        data = self.lead + b"{" + b",".join(k + self.colon + v for _, k, v, _, _ in self.pairs) + b"}" + self.trail
        last = {}
        for key, _, _, vrule, krule in self.pairs:
            last[key] = (vrule, krule)
        always = any(v == "always" or k == "always" for _, _, _, v, k in self.pairs)
        kept = any(v == "kept" or k == "kept" or (v == "addr" and key in ("src", "dst"))
                   for key, (v, k) in last.items())
        return Case(data, "; ".join(self.what), always or kept, not self.hostile, tuple(self.used))


def structured(rng: random.Random, serial: int) -> Case:
    b = _Builder(rng, serial)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        b.mutate()
    return b.build()


def _adds_up(r: Relay) -> bool:
    s = r.stats()
    return s["handled"] + sum(v for k, v in s.items() if k.startswith("dropped_")) == s["received"]


class WholePath:
    """Decode, two relays (relaying and displaying, with peers), their copies, and every console."""

    def __init__(self) -> None:
        # Node 1 shows what is sent to it; node 5 relays it. Both have peers, so copies are encoded.
        self.relays = [Relay(RelayConfig(label=label_of(i), rate_limit=0, seen_max=1_000_000),
                             [addr_of(2), addr_of(3), addr_of(4)]) for i in (1, 5)]
        self.counts = {"rejected": 0, "accepted": 0, "displayed": 0, "copies": 0, "copies_encoded_anew": 0,
                       "canonical": 0}
        self.new_consoles()

    def new_consoles(self) -> None:
        self.json_out = io.StringIO()
        streams = [io.TextIOWrapper(io.BytesIO(), encoding=e, errors="strict", write_through=True)
                   for e in ("ascii", "utf-8", "cp1252")]
        self.consoles = [TerminalConsole(streams[0], color=False, interactive=True),
                         TerminalConsole(streams[1], color=True, interactive=False),
                         TerminalConsole(streams[2], color=False, interactive=False),
                         JsonConsole(streams[0]), JsonConsole(self.json_out)]

    def check_json_output(self) -> None:
        for line in self.json_out.getvalue().splitlines():
            assert "event" in json.loads(line)

    def run(self, case: Case) -> None:
        data = case.data
        try:
            msg: Optional[Message] = decode(data)
        except WireError:
            msg = None
        except Exception as e:  # pragma: no cover - the failure itself
            raise AssertionError(f"decode raised {e!r} on {case.what}: {data[:200]!r}") from e
        if msg is not None and canonical(data.decode("utf-8")) is not None:  # the fast path is the JSON path
            self.counts["canonical"] += 1
            assert repr(canonical(data.decode("utf-8"))[0]) == repr(_decode_json(data.decode("utf-8"))), case.what
        assert not (case.must_reject and msg is not None), f"accepted {case.what}: {data[:200]!r}"
        assert not (case.must_accept and msg is None), f"rejected {case.what}: {data[:200]!r}"
        if msg is None:
            self.counts["rejected"] += 1
        else:
            self.counts["accepted"] += 1
            assert decode(encode(msg)) == msg, case.what
        for r in self.relays:
            actions = r.datagram_received(data, addr_of(9), 100.0, WALL)
            assert _adds_up(r), case.what
            for action in actions:
                if type(action) is Send:
                    copy = decode(action.data)  # a copy must decode again
                    if copy.mid == getattr(msg, "mid", None):
                        self.counts["copies"] += 1
                        if not action.data.startswith(b'{"mid"') or len(action.data) != len(data.strip()):
                            self.counts["copies_encoded_anew"] += 1
                        assert copy == msg._replace(ttl=min(msg.ttl, r.config.max_ttl) - 1), case.what
                    continue
                if type(action) is Display:
                    self.counts["displayed"] += 1
                for con in self.consoles:
                    con.show(action)
        for con in self.consoles:
            assert not con.broken, case.what


def run_structured(cases: int, seed: int) -> dict:
    rng = random.Random(seed)
    path = WholePath()
    used = set()
    for i in range(cases):
        case = structured(rng, i)
        used.update(case.used)
        path.run(case)
        if i % 2000 == 1999:
            path.check_json_output()
            path.new_consoles()
    path.check_json_output()
    missing = {h.name for h in HOSTILE} | {"known field", "unknown field", "hostile key", "key given twice",
                                            "escaped key", "whitespace"}
    assert not missing - used, f"never generated: {missing - used}"
    return path.counts


def test_structured_hostile_datagrams_through_the_whole_path_short():
    counts = run_structured(8000, seed=8)
    assert counts["rejected"] > 4000 and counts["accepted"] > 1500 and counts["displayed"] > 800
    assert counts["copies"] > 2000 and counts["copies_encoded_anew"] > 700 and counts["canonical"] > 30


@pytest.mark.slow
@SLOW
def test_structured_hostile_datagrams_through_the_whole_path_100k():
    counts = run_structured(100_000, seed=20261125)
    assert counts["rejected"] > 60_000 and counts["accepted"] > 18_000 and counts["copies_encoded_anew"] > 8000


# -- membership's kinds and fields -------------------------------------------------------------

MEMBER_FIELDS = {
    "HELLO": ("mesh", "tok", "echo", "ask", "caps", "nick", "seq", "ack", "held", "ivl", "key", "fport"),
    "PRESENCE": ("nick", "ttl0", "caps", "links"),
    "CHAT": ("nick", "ttl0", "part"),
    "TRACE": ("ttl0", "nick", "part"),
    "HOP": ("hop", "end", "ttl0"),
}
MEMBER_VALUES = WRONG_VALUES + [
    10 ** 20, -(10 ** 20), 2 ** 53 + 1, 1e308, -1e308, 0.0, 1e-300, "a" * 5000, ["HELLO"] * 10_000,
    [["x"]], [1, "a"], {"k": "v"}, "meshchat", "0123456789abcdef", "g" * 16, "alice", "a#b", "@x", " x",
    [1, 2], [2, 1], [0, 0], [1, 1001], ["HELLO", "TRACE"],
    "A" * 43, "A" * 42, "A" * 44, "+" * 43, "\u00e9" * 43, 65535, 65536, 9001,
    ["127.0.0.1:9"], ["127.0.0.1:%d" % p for p in range(1, 18)], ["127.0.0.1:0"], ["x:1" * 30], ["a\u202eb:1"],
]


def _member_relay():
    from meshchat.membership import Membership, MembershipConfig

    m = Membership(MembershipConfig(label=label_of(1), max_peers=4), secret=b"fuzz")
    r = Relay(RelayConfig(label=label_of(1), rate_limit=0), [addr_of(2), addr_of(3)], membership=m)
    return r, m


def test_membership_fields_with_hostile_values_never_raise_and_keep_the_bounds():
    rng = random.Random(20261126)
    r, m = _member_relay()
    out = io.StringIO()
    consoles = [TerminalConsole(out, color=True, interactive=False), JsonConsole(out)]
    sent_kinds = set()
    for i in range(6000):
        kind = rng.choice(list(MEMBER_FIELDS))
        sender = rng.choice([addr_of(2), addr_of(3), ("10.7.%d.%d" % (i >> 8 & 255, i & 255), 9000)])
        extra = {"mesh": "meshchat", "tok": "%016x" % rng.randrange(16 ** 16), "ttl0": 8}
        if rng.random() < 0.5:
            extra["echo"] = m._token_now(sender, 1.0 + i * 0.01)  # proved: the deeper path
        field = rng.choice(MEMBER_FIELDS[kind])
        extra[field] = rng.choice(MEMBER_VALUES)
        if field == "fport" and rng.random() < 0.8:
            extra["caps"] = ["HELLO", "TRACE"]  # a full HELLO: the only kind whose fport is read
        ttl = 1 if kind == "HELLO" else rng.choice([1, 3, 8])
        src = "%s:%d" % sender if rng.random() < 0.8 else label_of(rng.randrange(4, 200))
        body = "hi"
        if kind == "HOP" and rng.random() < 0.5:  # an answer to a trace of ours: the origin's path
            body = "tr%d" % (i // 50)
            r.traceroute.started(body, src, 1.0 + i * 0.01)
        obj = dict(mid="mf%d" % i, ts=WALL, ttl=ttl, kind=kind, src=src,
                   dst=rng.choice(["", label_of(1), label_of(rng.randrange(4, 9))]), body=body, **extra)
        data = json.dumps(obj).encode()
        now = 1.0 + i * 0.01
        for action in r.datagram_received(data, sender, now, WALL):
            if isinstance(action, Send):
                sent_kinds.add(decode(action.data).kind)  # whatever we send is valid
            for c in consoles:
                c.show(action) if not isinstance(action, Send) else None
        if i % 500 == 0:
            for action in r.timers_due(now, WALL):
                if isinstance(action, Send):
                    decode(action.data)
    assert _adds_up(r)
    assert len(m.neighbours) <= 4 and len(m.members) <= 4096 and len(m._challenged) <= 4096
    assert m.counters["fport_invalid"] > 0 and all(0 <= n.fport <= 65535 for n in m.neighbours.values())
    # What PRESENCE's links taught us stays bounded, and /map draws it whatever it was.
    from meshchat import meshmap
    from meshchat.membership import MAX_LINKS

    assert all(len(x.links) <= MAX_LINKS for x in m.members.values())
    assert any(x.links for x in m.members.values())  # the field's path was taken
    snapshot = m.mesh_map(now)
    ET.fromstring(meshmap.svg(snapshot))
    for c in consoles:
        c.map(snapshot)
    assert len(r.traceroute._back) <= 4096 and len(r.traceroute._pending) <= 16 and len(r.trace.records) <= 4096
    assert "HOP" in sent_kinds and "TRACE" in sent_kinds  # traces were answered and passed on
    assert r.stats()["dropped_no_route"] > 0  # HOPs for traces that never passed here went nowhere
    assert not any(c.broken for c in consoles)


def test_signed_messages_with_hostile_keys_and_signatures_are_counted_never_raise():
    """Truncated, bit-flipped, wrong-length, non-base64 and huge key and sig fields: each datagram
    is handled or dropped for one named reason, and nothing forged is shown as verified."""
    from meshchat import crypto
    from meshchat.trust import Trust, signer

    if not crypto.available():
        pytest.skip("needs the secure extra")
    rng = random.Random(11)
    ident = crypto.Identity(bytes(range(32)))  # seeded: the same signatures every run
    sign = signer(ident.key_text, ident.sign)
    relay = Relay(RelayConfig("127.0.0.1:9000", rate_limit=0.0), peers=[("127.0.0.1", 9001)],
                  trust=Trust(crypto.verify, crypto.unb64, crypto.fingerprint))

    def damaged(text: str) -> object:
        how = rng.randrange(8)
        if how == 0:
            return text[:rng.randrange(len(text))]
        if how == 1:
            i = rng.randrange(len(text))
            return text[:i] + chr(ord(text[i]) ^ (1 << rng.randrange(6))) + text[i + 1:]
        if how == 2:
            return text + "A" * rng.randrange(1, 5)
        if how == 3:
            return "!" * len(text)
        if how == 4:
            return "A" * rng.choice((10_000, 100_000))
        if how == 5:
            return rng.choice(WRONG_VALUES)
        if how == 6:
            return text.upper()
        return text + "="

    shown_verified = 0
    for i in range(2000):
        m = sign(Message(f"s{i}", 1000.0, 5, "CHAT", "127.0.0.1:9002", "", f"body {i}", {}))
        extra = dict(m.extra)
        for field in rng.sample(["key", "sig"], rng.randrange(1, 3)):
            if rng.random() < 0.1:
                del extra[field]
            else:
                extra[field] = damaged(extra[field])
        try:
            data = encode(m._replace(extra=extra))
        except WireError:
            continue
        for action in relay.datagram_received(data, ("127.0.0.1", 9001), float(i), 1000.0):
            if isinstance(action, Display) and action.verified:
                shown_verified += 1
        assert _adds_up(relay)
    s = relay.stats()
    assert s["dropped_bad_signature"] > 1000
    # A damaged field that still decodes to the same bytes does not exist (one spelling per key):
    # nothing forged came through as verified.
    assert shown_verified == 0
    # Hand-overs (store-and-forward) carry the origin's signature as osig with the mid and ts it covers:
    # damaged anywhere, never shown as verified; whole, verified.
    intact = forged_verified = 0
    for i in range(1000):
        m = sign(Message(f"h{i}", 1000.0, 5, "CHAT", "127.0.0.1:9002", "127.0.0.1:9000", f"body {i}", {}))
        extra = dict(m.extra)
        extra.update(osig=extra.pop("sig"), hmid=m.mid, hts=m.ts, re=m.mid, ots=m.ts)
        over = m._replace(mid=f"{m.mid}~h{i}", ts=1000.0 + i * 0.001, extra=extra)
        whole = rng.random() < 0.2
        if not whole:
            field = rng.choice(["osig", "hmid", "hts", "key", "re", "body"])
            if field == "body":
                over = over._replace(body=over.body + "!")
            elif field == "hts":
                extra["hts"] = rng.choice([m.ts + 1, -1, "1000.0", None, 1e308])
            else:
                extra[field] = damaged(extra[field]) if rng.random() < 0.8 else rng.choice(WRONG_VALUES)
        try:
            data = encode(over)
        except WireError:
            continue
        for action in relay.datagram_received(data, ("127.0.0.1", 9001), 3000.0 + i, 1000.0 + i * 0.001):
            if isinstance(action, Display) and action.verified:
                if whole:
                    intact += 1
                else:
                    forged_verified += 1
        assert _adds_up(relay)
    assert forged_verified == 0 and intact > 100

# -- sealed datagrams (closed meshes) -----------------------------------------------------------

def _sealed_case(rng: random.Random, key, other, serial: int) -> Tuple[bytes, str]:
    """A datagram for a node holding ``key``, and the one drop reason it must get ("" if it may pass)."""
    from meshchat import crypto

    inner = structured(rng, serial).data if rng.random() < 0.5 else malformed(rng)
    sealed = crypto.seal(key, inner)
    kind = rng.randrange(8)
    if kind == 0:  # right key, whatever is inside: garbage, malformed or valid JSON, hostile fields
        return sealed, ""
    if kind == 1:  # truncated
        return sealed[:rng.randrange(len(sealed))], "unauthenticated"
    if kind == 2:  # bit-flipped, anywhere: header, nonce, ciphertext or tag
        data = bytearray(sealed)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data), "unauthenticated"
    if kind == 3:  # another mesh's key
        return crypto.seal(other, inner), "unauthenticated"
    if kind == 4:  # wrong length: bytes added after the tag
        return sealed + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))), "unauthenticated"
    if kind == 5:  # the magic and our key id, then anything
        return sealed[:8] + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80))), "unauthenticated"
    if kind == 6:  # not sealed at all: plaintext, as a node without the key sends it
        return inner, "plaintext"
    return sealed[:rng.randrange(1, 8)], "unauthenticated"  # a piece of the header only


@pytest.mark.skipif(not __import__("meshchat.crypto").crypto.available(), reason="needs the secure extra")
def test_sealed_datagrams_damaged_every_way_never_raise_and_each_is_counted_once():
    from meshchat import crypto

    rng = random.Random(20261127)
    key, other = crypto.NetworkKey(bytes(range(32))), crypto.NetworkKey(bytes(range(1, 33)))
    strict, optional = (Relay(RelayConfig(label=label_of(1), rate_limit=0, seen_max=1_000_000),
                              [addr_of(2), addr_of(3)], unseal=crypto.opener(key, opt)) for opt in (False, True))
    out = io.StringIO()
    consoles = [TerminalConsole(out, color=True, interactive=False), JsonConsole(out)]
    passed = {"strict": 0, "optional": 0}
    for i in range(3000):
        data, reason = _sealed_case(rng, key, other, i)
        for name, r in (("strict", strict), ("optional", optional)):
            must = reason
            before = r.stats()
            actions = r.datagram_received(data, addr_of(9), 100.0 + i * 0.01, WALL)
            after = r.stats()
            assert after["received"] == before["received"] + 1 and _adds_up(r), data[:80]
            unauth = after["dropped_unauthenticated"] - before["dropped_unauthenticated"]
            plain = after["received_plaintext"] - before["received_plaintext"]
            if must == "plaintext" and (name == "strict" or data.lstrip()[:1] != b"{"):
                must = "unauthenticated"  # only a JSON object is taken for plaintext, and only if optional
            if must == "unauthenticated":
                assert unauth == 1 and actions == [], (name, must, data[:80])
            elif must == "plaintext":
                assert unauth == 0 and plain == 1 and not [a for a in actions if type(a) is Send]
            else:
                assert unauth == 0
                passed[name] += after["handled"] > before["handled"]
            for action in actions:
                if type(action) is Send:
                    decode(action.data)  # what the node would seal is valid
                else:
                    for c in consoles:
                        c.show(action)
    assert passed["strict"] > 25 and passed["optional"] > 25  # valid inside: handled, not just opened
    assert strict.stats()["dropped_malformed"] > 100  # garbage under the right key is refused after opening
    assert not any(c.broken for c in consoles)


def test_private_boxes_and_key_messages_with_hostile_values_are_counted_never_raise():
    """Sealed bodies truncated, bit-flipped, re-encoded or under another header, and KEY and PRESENCE
    messages with hostile box, ask and caps fields: each datagram is handled or dropped for one named
    reason, nothing that does not open is shown, and the key tables stay bounded."""
    from meshchat import crypto
    from meshchat.delivery import Delivery, DeliveryConfig
    from meshchat.membership import Membership, MembershipConfig
    from meshchat.private import MARKER, Private
    from meshchat.trust import Trust, signer

    if not crypto.available():
        pytest.skip("needs the secure extra")
    rng = random.Random(12)
    me, other = crypto.Identity(bytes(range(32))), crypto.Identity(bytes(range(1, 33)))
    label, sender = "127.0.0.1:9000", "127.0.0.1:9002"
    m = Membership(MembershipConfig(label=label, caps=("HELLO", "ACK", "E2E")), secret=b"fuzz")
    relay = Relay(RelayConfig(label, rate_limit=0.0), peers=[("127.0.0.1", 9001)], membership=m,
                  delivery=Delivery(DeliveryConfig(label, "0123456789abcdef")),
                  trust=Trust(crypto.verify, crypto.unb64, crypto.fingerprint),
                  sign=signer(me.key_text, me.sign),
                  private=Private(me.box.key_text, crypto.seal_to, me.box.open, crypto.unb64))
    sealer = Private(other.box.key_text, crypto.seal_to, other.box.open, crypto.unb64)
    sealer.keys[label] = me.box.public
    sign = signer(other.key_text, other.sign)
    values = WRONG_VALUES + ["", "A" * 43, other.box.key_text, other.box.key_text[:-1] + "B", 1, [1], {"a": 1}]
    bad_shown = 0
    for i in range(1500):
        how = rng.randrange(6)
        if how < 4:
            msg = sealer.seal(Message(f"x-d{i}xaaaaaaaa", 1000.0, 5, "CHAT", sender, label, f"secret {i}",
                                      {"ack": 1}))
            body = msg.body
            if how == 0:
                body = body[:rng.randrange(len(body))]
            elif how == 1:
                j = rng.randrange(len(MARKER), len(body))
                body = body[:j] + chr(ord(body[j]) ^ (1 << rng.randrange(6))) + body[j + 1:]
            elif how == 2:
                msg = msg._replace(ts=1000.5)  # the box under another header
            else:
                body = MARKER + rng.choice(["", "=", "\u00e9" * 10, "A" * 20000, "!!!!"])
            msg = msg._replace(body=body)
            if rng.random() < 0.5:
                msg = sign(msg)
        else:
            kind = rng.choice(["KEY", "PRESENCE"])
            extra = {rng.choice(["box", "ask", "caps"]): rng.choice(values)}
            if rng.random() < 0.5:
                extra["ask"] = 1
            msg = Message(f"k{i}", 1000.0, 5, kind, sender, rng.choice(["", label]), "", extra)
            if rng.random() < 0.7:
                try:
                    msg = sign(msg)
                except UnicodeEncodeError:  # a lone surrogate: no origin could sign it, the wire refuses it
                    pass
        try:
            data = encode(msg)
        except WireError:
            continue
        for action in relay.datagram_received(data, ("127.0.0.1", 9001), 1.0 + i * 0.01, 1000.0):
            if isinstance(action, Send):
                decode(action.data)
            elif isinstance(action, Display) and (action.encrypted or action.message.body.startswith(MARKER)):
                # Opened: only a genuine box (how 1 may flip a bit base64 ignores); never a box shown as text.
                bad_shown += not action.message.body.startswith("secret")
        assert _adds_up(relay)
    s = relay.stats()
    # Damaged boxes are dropped: as bad boxes, or before that as impostors when unsigned under a pinned name.
    assert s["dropped_bad_box"] > 200 and s["dropped_bad_box"] + s["dropped_impostor"] > 500 and bad_shown == 0
    assert len(relay.private.keys) <= 4096 and relay.private.counters["keys_answered"] <= 1 + 15 * 10


# -- file sharing's kinds and fields (files.py) ---------------------------------------------------

FILE_FIELDS = {
    "FOFFER": ("file", "file.fid", "file.name", "file.size", "file.sha", "file.hl", "file.cs", "file.box",
               "file.hops", "dst"),
    "FGET": ("fid", "want", "offer"),
    "FDATA": ("fid", "i", "body"),
    "FHAVE": ("fid", "have"),
}
FILE_VALUES = MEMBER_VALUES + [
    [0], [0, 1, 2], list(range(40)), [-1], [10 ** 9], [[0, 1]], [[0, 10 ** 9]], [[5, 2]], [[0, 1]] * 70,
    "AAAA", "not base64!", "QUJD", "=" * 8, 768, 767, 1 << 31, "../../etc/passwd", "C:\\x\\evil", "CON",
    "A" * 2049, "A" * 2048, 255, 256, "127.0.0.1:9001",
    True, False, 1, [],
]


def test_file_kinds_with_hostile_values_never_raise_and_keep_the_bounds():
    import base64 as b64
    import hashlib

    from meshchat.files import CHUNK_BYTES, MAX_OFFERS, MAX_SOURCES, Files, FilesConfig, Offer
    from meshchat.membership import Membership, MembershipConfig

    rng = random.Random(20261127)
    m = Membership(MembershipConfig(label=label_of(1), max_peers=4), secret=b"fuzz")
    m.is_up = lambda addr: True  # every sender proved: the deepest path
    from meshchat import crypto
    from meshchat.files import seal_offer

    ident = crypto.Identity.generate() if crypto.available() else None
    files = Files(FilesConfig(label_of(1)), new_mid=lambda: "%012x" % rng.getrandbits(48),
                  open_box=ident.box.open if ident is not None else None, hops_to=lambda label: 1)
    r = Relay(RelayConfig(label=label_of(1), rate_limit=0), [addr_of(2), addr_of(3)], membership=m, files=files)
    content = bytes(range(256)) * 20
    chunks = [content[i:i + CHUNK_BYTES] for i in range(0, len(content), CHUNK_BYTES)]
    hashes = b"".join(hashlib.sha256(c).digest() for c in chunks)
    mine = Offer("00112233445566aa", "mine.bin", len(content), hashlib.sha256(content).hexdigest(),
                 hashlib.sha256(hashes).hexdigest(), CHUNK_BYTES, label_of(1))
    files.share(mine, hashes, "/nowhere", 0.0)
    good_offer = dict(mine.fields(), fid="00112233445566bb")
    offers = [(good_offer, "")]
    if ident is not None:  # sealed offers (rule 6): to us (opened), and to another node (carried)
        to_us = mine._replace(src=label_of(2), dst=label_of(1), key="ab" * 32, hops=2)
        offers.append((seal_offer(to_us, ident.box.public, crypto.seal_to).fields(), label_of(1)))
        to_other = to_us._replace(dst=label_of(4))
        offers.append((seal_offer(to_other, ident.box.public, crypto.seal_to).fields(), label_of(4)))
    out = io.StringIO()
    consoles = [TerminalConsole(out, color=True, interactive=False), JsonConsole(out)]
    for i in range(6000):
        kind = rng.choice(list(FILE_FIELDS))
        sender = rng.choice([addr_of(2), addr_of(3), ("10.8.%d.%d" % (i >> 8 & 255, i & 255), 9000)])
        fid = rng.choice([mine.fid, "00112233445566bb", "%016x" % rng.getrandbits(64)])
        offered, dst = rng.choice(offers)
        extra = {"FOFFER": {"file": dict(offered, fid=fid), "ttl0": 8}, "FGET": {"fid": fid, "want": [0, 1, 2]},
                 "FDATA": {"fid": fid, "i": rng.randrange(12)}, "FHAVE": {"fid": fid, "have": [[0, 10]]}}[kind]
        body = b64.b64encode(rng.choice(chunks)).decode() if kind == "FDATA" else ""
        name = rng.choice(FILE_FIELDS[kind])
        value = rng.choice(FILE_VALUES)
        if name.startswith("file."):
            extra["file"][name[5:]] = value
        elif name == "dst":
            dst = value if isinstance(value, str) else dst
        elif name == "body":
            body = value if isinstance(value, str) else body
        else:
            extra[name] = value
        obj = dict(mid="ff%d" % i, ts=WALL, ttl=1 if kind != "FOFFER" else 8, kind=kind,
                   src="%s:%d" % sender, dst=dst if kind == "FOFFER" else "", body=body, **extra)
        now = 1.0 + i * 0.01
        # A quarter as if it came on our bulk socket (node.py): only the link kinds are taken from it.
        received = r.bulk_received if rng.random() < 0.25 else r.datagram_received
        for action in received(json.dumps(obj).encode(), sender, now, WALL):
            if isinstance(action, Send):
                decode(action.data)  # whatever we send is valid
                continue
            for c in consoles:
                c.show(action)
        if i % 200 == 0:
            for action in r.timers_due(now, WALL):
                if isinstance(action, Send):
                    decode(action.data)
    assert _adds_up(r)
    assert len(files.transfers) <= MAX_OFFERS
    assert all(len(t.sources) <= MAX_SOURCES for t in files.transfers.values())
    s = files.stats()
    assert s["file_dropped_malformed"] > 0 and s["file_pieces_served"] > 0 and s["files_offered"] > 0
    assert r.stats()["dropped_bulk_kind"] > 0 and not r._bulk  # FOFFERs on the bulk socket
    if ident is not None:
        assert s["file_dropped_bad_box"] > 0 and s["files_carried"] > 0
    assert not any(c.broken for c in consoles)


# -- lazy push's kinds and fields (lazypush.py) ------------------------------------------------------

def test_lazy_push_kinds_with_hostile_fields_never_raise_are_counted_and_keep_the_bounds():
    from meshchat import lazypush as lp
    from meshchat.delivery import Delivery, DeliveryConfig
    from meshchat.membership import Membership, MembershipConfig, Neighbour

    label = label_of(1)
    m = Membership(MembershipConfig(label=label, caps=("HELLO", "ACK", "REPAIR", "LAZY")), secret=b"fuzz")
    d = Delivery(DeliveryConfig(label, "00000000000000f1"), neighbours=m.repair_neighbours)
    r = Relay(RelayConfig(label=label, rate_limit=0, ttl=8, flood=False), membership=m, delivery=d)
    for i in range(2, 8):  # proven neighbours that speak LAZY (the handshake's result, set directly)
        n = m.neighbours[addr_of(i)] = Neighbour(addr_of(i), True, 0.0)
        n.up, n.speaks, n.label, n.caps = True, True, label_of(i), frozenset(("HELLO", "REPAIR", "LAZY"))
    m._changed()
    rng = random.Random(20261126)
    origins = ["%016x" % k for k in range(1, 6)]
    o = origins[0]
    values = WRONG_VALUES + [
        {o: [1, 2]}, {o: list(range(1, 65))}, {o: list(range(1, 66))}, {o: [0]}, {o: [2 ** 53 + 1]},
        {o: [True]}, {o: "1"}, {o.upper(): [1]}, {"zz": [1]}, {o: []}, {str(k): [1] for k in range(70)},
    ]
    sent_kinds = set()
    for i in range(6000):
        now = 1.0 + i * 0.01
        sender = addr_of(rng.randrange(2, 10))  # 8 and 9: strangers, never proven
        kind = rng.choice(["IHAVE", "GRAFT", "PRUNE", "CHAT", "CHAT"])
        if kind == "CHAT":  # stream broadcasts, so duplicates prune and grafts find payloads
            mid = "%s-%d" % (rng.choice(origins), rng.randrange(1, 300))
            msg = Message(mid, WALL, rng.choice([1, 2, 8]), "CHAT", label_of(20), "", "hi", {"ttl0": 8})
        else:
            field = {"IHAVE": "ihave", "GRAFT": "graft", "PRUNE": "tree"}[kind]
            extra = {field: rng.choice(values + [{rng.choice(origins): [rng.randrange(1, 300)]}] * 5)}
            msg = Message("lz%d" % i, WALL, 1, kind, "%s:%d" % sender, label, "", extra)
        for action in r.datagram_received(encode(msg), sender, now, WALL):
            if isinstance(action, Send):
                sent_kinds.add(decode(action.data).kind)  # whatever we send is valid
        if i % 7 == 0:
            for action in r.timers_due(now, WALL):
                if isinstance(action, Send):
                    sent_kinds.add(decode(action.data).kind)
        assert _adds_up(r)
    s = r.stats()
    assert {"PRUNE", "IHAVE", "GRAFT", "CHAT"} <= sent_kinds  # every path was taken
    assert s["lazy_malformed_ihave"] > 0 and s["lazy_malformed_graft"] > 0 and s["dropped_unproven"] > 0
    assert s["lazy_graft_answered"] > 0
    assert len(r.lazy._missing) <= lp.MAX_MISSING and all(len(x.announcers) <= lp.MAX_ANNOUNCERS
                                                            for x in r.lazy._missing.values())
    assert len(r.lazy._first) <= lp.MAX_FIRST and all(c <= lp.MAX_IHAVE_SEQS for c in r.lazy._ihave_count.values())
