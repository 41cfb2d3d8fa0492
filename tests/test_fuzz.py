"""Seeded fuzzing: malformed input never raises anything but WireError, and a live node survives it."""

import json
import queue
import random
import socket
import threading
import time

import pytest

from meshchat.relay import COUNTERS
from meshchat.wire import Message, WireError, decode, encode

from nodes import Cluster

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
