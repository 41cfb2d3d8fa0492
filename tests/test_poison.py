"""Poison datagrams against live nodes: a --json process, a console process, and a ring in this process.

Each class once stopped a node (or, relayed intact, every neighbour) on the old
code. Now each is dropped as malformed where it enters, never relayed, and
every node goes on showing and relaying ordinary messages.
"""

import json
import re
import socket
import sys
import time
from typing import Callable, Dict, List

import pytest

from meshchat.node import Failure

from nodes import Cluster
from procs import Proc

TIMEOUT_S = 10.0
LIMIT = sys.getrecursionlimit()


def _datagram(src: str, mid: str, body: str = "poison", ttl: int = 5, extra: bytes = b"", ttl_key: bytes = b"",
              lead: bytes = b"") -> bytes:
    head = json.dumps({"mid": mid, "ts": time.time(), "ttl": ttl, "kind": "CHAT", "src": src, "dst": "",
                       "body": body}, separators=(",", ":")).encode()
    return lead + head[:-1] + ttl_key + extra + b"}"


def _nest(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Each class: label and mid -> the datagrams to send. ``src`` is the sender's own label.
POISON: Dict[str, Callable[[str, str], List[bytes]]] = {
    # int() refuses more than 4,300 digits on Python 3.11+ with a ValueError.
    "port of 5000 digits in src": lambda src, mid: [_datagram("127.0.0.1:" + "1" * 5000, mid)],
    "port of 5000 digits in dst": lambda src, mid: [
        _datagram(src, mid).replace(b'"dst":""', b'"dst":"127.0.0.1:' + b"2" * 5000 + b'"')],
    # Leading whitespace: no fast path, so the copy is encoded anew, and json will not write inf.
    "1e999 in an unknown field": lambda src, mid: [_datagram(src, mid, extra=b',"x":1e999', lead=b" ")],
    # An escaped second ttl key equal to the first: the old fast path relayed it intact, and each
    # neighbour then took the slow path and died.
    "1e999 behind an escaped ttl key": lambda src, mid: [
        _datagram(src, mid, ttl_key=b',"\\u0074tl":5', extra=b',"x":1e999')],
    # Decodes, then cannot be encoded again a few frames deeper: every depth around the limit.
    "nesting near the recursion limit": lambda src, mid: [
        _datagram(src, f"{mid}-{d}", extra=b',"x":' + _nest(d), lead=b" ") for d in range(LIMIT - 60, LIMIT + 2)],
    # A UTF-8 console cannot write it: it marked the console broken and the node stopped.
    "lone surrogate in the body": lambda src, mid: [_datagram(src, mid, body="\ud800")],
    "lone surrogate in an unknown field": lambda src, mid: [
        _datagram(src, mid, extra=b',"x":"\\udfff"', lead=b" ")],
}


class Link:
    """The test's two sockets: a stranger that sends, and the node's configured peer that gets copies."""

    def __init__(self) -> None:
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.sender, self.peer):
            s.bind(("127.0.0.1", 0))
        self.peer.settimeout(TIMEOUT_S)
        self.label = "127.0.0.1:%d" % self.sender.getsockname()[1]
        self.peer_label = "127.0.0.1:%d" % self.peer.getsockname()[1]

    def poison(self, name: str, to) -> int:
        datagrams = POISON[name](self.label, "poison")
        for data in datagrams:
            self.sender.sendto(data, to)
        return len(datagrams)

    def chat(self, body: str, to) -> None:
        self.sender.sendto(_datagram(self.label, "ok-" + body, body=body), to)

    def first_copy(self) -> dict:
        """What the peer got first: the copy of the normal message, never one of the poison
        (the node's HELLOs to its peer are membership's, not copies, and are skipped)."""
        while True:
            got = json.loads(self.peer.recvfrom(65535)[0])
            if got["kind"] != "HELLO":
                return got

    def close(self) -> None:
        self.sender.close()
        self.peer.close()


@pytest.fixture
def link():
    ln = Link()
    yield ln
    ln.close()


def _adds_up(stats: dict) -> bool:
    return stats["handled"] + sum(v for k, v in stats.items() if k.startswith("dropped_")) == stats["received"]


@pytest.mark.parametrize("name", list(POISON))
def test_a_json_node_drops_the_poison_and_goes_on(name, link):
    with Proc("--port", "0", "--json", "--peers", link.peer_label) as node:
        to = ("127.0.0.1", int(node.ready().rsplit(":", 1)[1]))
        sent = link.poison(name, to)
        link.chat("after the poison", to)
        assert node.event("chat")["body"] == "after the poison"
        assert link.first_copy()["body"] == "after the poison"
        node.send("/stats")
        stats = node.event("stats")
        assert stats["received"] == sent + 1 and _adds_up(stats)
        assert stats["dropped_malformed"] == sent and stats.get("dropped_internal") == 0
        node.send("/quit")
        assert node.wait() == 0


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
@pytest.mark.parametrize("name", list(POISON))
def test_a_console_node_drops_the_poison_and_goes_on(name, encoding, link, monkeypatch):
    monkeypatch.setenv("PYTHONIOENCODING", encoding)  # strict, as a UTF-8 or ASCII stdout is
    with Proc("--port", "0", "--peers", link.peer_label) as node:
        ready = _line(node, "is up")
        to = ("127.0.0.1", int(re.search(r"127\.0\.0\.1:(\d+)", ready).group(1)))
        link.poison(name, to)
        link.chat("after the poison \u2603", to)
        shown = _line(node, "after the poison")
        assert f"<{link.label}>" in shown and ("\u2603" if encoding == "utf-8" else "\\u2603") in shown
        assert link.first_copy()["body"] == "after the poison \u2603"
        node.send("/quit")
        assert node.wait() == 0


def _line(node: Proc, text: str) -> str:
    return node.line(lambda line: text in line, f"line with {text!r}")


def _ring(n: int):
    return [(i, i % n + 1) for i in range(1, n + 1)]


@pytest.mark.parametrize("name", list(POISON))
def test_a_ring_stops_the_poison_at_the_first_node(name, link):
    with Cluster(5, _ring(5)) as c:
        sent = link.poison(name, c[1].node.addr)
        c.wait_until(lambda: c[1].node.stats()["received"] == sent)
        c[3].node.say("around the ring")
        for i in (1, 2, 4, 5):
            c[i].wait_for_body("around the ring")

        def quiet() -> bool:  # every datagram sent in the ring, and the poison, has been received
            stats = [c[i].node.stats() for i in range(1, 6)]
            return sum(s["sent"] - s["send_errors"] for s in stats) + sent == sum(s["received"] for s in stats)

        c.wait_until(quiet)
        for i in range(1, 6):
            stats = c[i].node.stats()
            assert c[i].node.failure is None and _adds_up(stats)
            assert not any(isinstance(e, Failure) for e in c[i].pending())
            assert stats["dropped_malformed"] == (sent if i == 1 else 0) and stats.get("dropped_internal") == 0
