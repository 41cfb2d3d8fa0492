"""meshchat and a node built from the seed design's README, in one mesh."""

import json
import time

from meshchat.relay import Pong

from nodes import Cluster
from seednode import SeedNode


def test_meshchat_and_a_seed_node_chat_both_ways_through_each_other():
    # seed A -- meshchat 1 -- meshchat 2 -- seed B
    with Cluster(2, [(1, 2)]) as c, SeedNode([c[1].node.addr]) as a, SeedNode([c[2].node.addr]) as b:
        c[1].node.add_peer(a.addr)
        c[2].node.add_peer(b.addr)
        a.send("hello from the seed design")
        assert c[1].shown(1) == ["hello from the seed design"]
        assert c[2].shown(1) == ["hello from the seed design"]
        got = b.shown.get(timeout=5)
        assert got["body"] == "hello from the seed design" and got["ttl"] == 6 and got["src"] == a.label
        c[2].node.say("and back", dst=a.label)
        assert a.shown.get(timeout=5)["body"] == "and back"
        assert b.shown.empty(), "addressed to A, so B relays nothing and shows nothing"


def test_unknown_fields_from_a_newer_node_cross_meshchat():
    with Cluster(1) as c, SeedNode([c[1].node.addr]) as a, SeedNode([c[1].node.addr]) as b:
        c[1].node.add_peer(b.addr)
        msg = {"mid": "new-1", "ts": time.time(), "ttl": 4, "kind": "CHAT", "src": a.label,
               "dst": "", "body": "v2", "sig": "abc", "hops": [1, 2]}
        a.sock.sendto(json.dumps(msg).encode(), c[1].node.addr)
        got = b.shown.get(timeout=5)
        assert got["sig"] == "abc" and got["hops"] == [1, 2] and got["ttl"] == 3


def test_seed_heartbeat_pings_get_one_pong_per_interval_and_our_ping_gets_through():
    with Cluster(1) as c, SeedNode([c[1].node.addr]) as a:
        c[1].node.add_peer(a.addr)
        for _ in range(5):
            a.send("", kind="PING")  # the seed's heartbeat: broadcast, empty body
        pong = a.received.get(timeout=5)
        assert pong["kind"] == "PONG" and pong["dst"] == a.label
        c.wait_until(lambda: c[1].node.stats()["received"] == 5)
        c[1].node.say("marker")  # after every answer the node decided to send
        seen = []
        while True:
            msg = a.received.get(timeout=5)
            if msg["body"] == "marker":
                break
            seen.append(msg["kind"])
        assert seen.count("PONG") == 0, "five heartbeats, one answer"


def test_roll_call_and_ping_to_one_node_give_round_trip_times_through_seed_nodes():
    # meshchat 1 -- seed A -- meshchat 2 -- seed B (answers PINGs with a flooded PONG) -- meshchat 3
    with Cluster(3) as c, SeedNode([c[1].node.addr, c[2].node.addr]) as a, \
            SeedNode([c[2].node.addr, c[3].node.addr], answer_pings=True) as b:
        c[1].node.add_peer(a.addr)
        c[2].node.add_peer(a.addr)
        c[2].node.add_peer(b.addr)
        c[3].node.add_peer(b.addr)
        [call] = c[1].node.ping()
        heard = {}
        while len(heard) < 3:
            pong = c[1].next(Pong)
            assert pong.mid == call.mid and 0 <= pong.rtt_ms < 5000
            heard[pong.src] = pong.rtt_ms
        assert set(heard) == {c[2].label, b.label, c[3].label}
        [one] = c[1].node.ping(c[3].label)
        pong = c[1].next(Pong)
        assert (pong.src, pong.mid) == (c[3].label, one.mid) and pong.rtt_ms >= 0
