"""Bounds an attacker pushes on, checked on live nodes: forged PINGs, a stranger flood, a replay."""

import socket
import time
from contextlib import ExitStack

import meshchat.relay
from meshchat.relay import Display
from meshchat.wire import Message, encode

from nodes import Cluster


def datagram(mid, kind="CHAT", src="127.0.0.1:1", body="hi", ts=None):
    return encode(Message(mid, time.time() if ts is None else ts, 8, kind, src, "", body))


def test_forged_pings_cost_a_live_full_mesh_at_most_three_times_what_chats_cost():
    # Nodes 1-4 are a full mesh; node 5 is a stranger to them all, which sends raw datagrams
    # with fresh forged origins and takes whatever comes back (so nothing goes unreceived).
    with Cluster(5, [(a, b) for a in range(1, 5) for b in range(a + 1, 5)]) as c:
        injected = [0]

        def settled() -> bool:
            stats = [c[i].node.stats() for i in range(1, 6)]
            return sum(s["sent"] - s["send_errors"] for s in stats) + injected[0] == sum(s["received"] for s in stats)

        def cost(kind: str) -> int:
            before = sum(c[i].node.stats()["sent"] for i in range(1, 5))
            for i in range(10):
                data = datagram(f"{kind}-{i}", kind=kind, src="127.0.0.%d:%d" % (2 + i, 40000 + i), body="")
                c[5].node._io.sendto(data, c[1 + i % 4].node.addr)
                injected[0] += 1
            c.wait_until(settled)
            return sum(c[i].node.stats()["sent"] for i in range(1, 5)) - before

        chats = cost("CHAT")
        pings = cost("PING")
        assert chats == 10 * (3 + 3 * 2)
        assert pings <= 3 * chats, (pings, chats)


def test_a_configured_peer_gets_through_a_live_flood_from_more_strangers_than_are_tracked(monkeypatch):
    monkeypatch.setattr(meshchat.relay, "MAX_TRACKED", 8)  # 20 strangers overflow the bucket table
    with Cluster(1, rate_limit=50, rate_limit_total=100) as c, ExitStack() as stack:
        node = c[1].node
        strangers = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(20)]
        peer = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        peer.bind(("127.0.0.1", 0))
        node.add_peer(peer.getsockname())
        peer_label = "127.0.0.1:%d" % peer.getsockname()[1]
        for k in range(30):
            for i, s in enumerate(strangers):
                s.sendto(datagram(f"s{i}-{k}"), node.addr)
        c.wait_until(lambda: node.stats()["received"] == 600)
        for k in range(60):  # the peer's first datagram comes after the flood filled the table
            peer.sendto(datagram(f"p{k}", src=peer_label, body=f"peer {k}"), node.addr)
        c.wait_until(lambda: node.stats()["received"] == 660)
        shown = [e.message.body for e in c[1].pending() if isinstance(e, Display) and e.message.src == peer_label]
        stats = node.stats()
    assert shown == [f"peer {k}" for k in range(60)]
    assert stats["dropped_rate_total"] > 0 and stats["dropped_rate"] > 0
    assert stats["handled"] - 60 < 400, "strangers held to the total's burst and refill"
    assert stats["handled"] + sum(v for k, v in stats.items() if k.startswith("dropped_")) == stats["received"]


def test_a_live_node_refuses_a_replay_after_its_id_was_evicted():
    with Cluster(1, seen_max=50) as c, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        node = c[1].node
        victim = datagram("victim", body="only once")
        s.sendto(victim, node.addr)
        for i in range(100):
            s.sendto(datagram(f"fill{i}", body=""), node.addr)
        c.wait_until(lambda: node.stats()["received"] == 101)
        s.sendto(victim, node.addr)
        s.sendto(datagram("marker", body="marker"), node.addr)
        bodies = []
        while not bodies or bodies[-1] != "marker":
            bodies.append(c[1].next(Display).message.body)
        stats = node.stats()
    assert bodies.count("only once") == 1
    assert stats["dropped_replay"] == 1 and stats["displayed"] == 102
