"""Membership on real sockets: joining by one name, discovery, meshes kept apart, liveness."""

import random
import time

from meshchat.membership import MembershipConfig, PeerDown, PeerUp
from meshchat.node import Discovery
from meshchat.relay import Display, Pong

from nodes import Cluster, Probe
from ports import free_ports
from seednode import SeedNode

FAST = MembershipConfig(label="", hello_max_s=0.4)  # a dead neighbour is down in about 3 x 0.9 s


def group(seed: int) -> Discovery:
    """A discovery group and port of this test's own, so that tests never find each other's nodes."""
    rng = random.Random(seed * 7919 + time.monotonic_ns())
    return Discovery(("239.255.%d.%d" % (rng.randrange(256), rng.randrange(1, 255)), free_ports(1)[0]),
                     ("127.0.0.1",))


def test_a_node_that_names_one_member_receives_broadcasts_and_direct_messages():
    with Cluster(2, membership=FAST) as c:
        old, new = c[1], c[2]  # the old member knows nobody; the new one names it
        new.node.add_peer(old.node.addr)
        assert new.next(PeerUp).label == old.label
        assert old.next(PeerUp).label == new.label
        old.node.say("welcome")
        new.wait_for_body("welcome")
        old.node.say("just you", dst=new.label)
        new.wait_for_body("just you")
        new.node.say("thanks")
        old.wait_for_body("thanks")


def test_three_nodes_with_no_peers_find_each_other_and_chat():
    with Cluster(3, membership=FAST, discovery=group(1)) as c:
        for p in c.probes.values():
            p.next(PeerUp)
            p.next(PeerUp)
        c[1].node.say("found you")
        c[2].wait_for_body("found you")
        c[3].wait_for_body("found you")


def test_two_meshes_on_one_group_never_see_each_other():
    disc = group(2)
    red = MembershipConfig(label="", mesh="red", hello_max_s=0.4)
    blue = MembershipConfig(label="", mesh="blue", hello_max_s=0.4)
    with Cluster(2, membership=red, discovery=disc) as reds, Cluster(1, membership=blue, discovery=disc) as blues:
        reds[1].next(PeerUp)
        reds[2].next(PeerUp)
        reds[1].node.say("red only")
        reds[2].wait_for_body("red only")
        # The blue node heard the red beacons (they are counted) but took none of them as neighbours.
        reds.wait_until(lambda: blues[1].node.stats()["dropped_other_mesh"] >= 2, timeout=10)
        assert blues[1].node.neighbour_rows() == []
        assert not [e for e in blues[1].pending() if isinstance(e, (Display, PeerUp))]


def test_a_killed_neighbour_is_reported_down_left_out_and_back_up_when_it_returns():
    with Cluster(2, [(1, 2)], membership=FAST) as c:
        c[1].next(PeerUp)
        port = c[2].node.addr[1]
        c[2].node.stop()
        down = c[1].next(PeerDown, timeout=10)
        assert down.label == c[2].label
        sent = c[1].node.stats()["sent"]
        c[1].node.say("anyone?")
        assert c[1].node.stats()["sent"] == sent  # nothing goes to the dead
        back = Probe(membership=FAST, port=port)
        try:
            back.node.add_peer(c[1].node.addr)
            back.node.start()
            assert c[1].next(PeerUp, timeout=10).label == back.label
        finally:
            back.node.stop()


def test_a_seed_design_peer_gets_only_chat_and_ping_and_the_first_probe():
    # seed -- meshchat 1 -- meshchat 2: HELLOs, presence floods, PONGs and roll calls all around it.
    with Cluster(2, [(1, 2)], membership=FAST) as c, SeedNode([c[1].node.addr]) as seed:
        c[1].node.add_peer(seed.addr)
        c[1].next(PeerUp)
        c[2].node.say("to all")
        assert seed.shown.get(timeout=5)["body"] == "to all"
        c[1].node.ping()
        c[2].node.ping()
        c[2].next(Pong)
        seed.send("from the seed")
        c[2].wait_for_body("from the seed")
        c[2].node.set_nick("two")  # a presence flood
        c.wait_until(lambda: c[1].node.membership.nick_of(c[2].label) == "two")
        seed.send("", kind="PING")  # the seed's heartbeat: no PONG may go back to it
        seed.send("after")
        c[2].wait_for_body("after")
        c[2].node.say("final")  # reaches the seed after anything node 1 sent it before
        while seed.shown.get(timeout=5)["body"] != "final":
            pass
        kinds = []
        while not seed.received.empty():
            kinds.append(seed.received.get_nowait()["kind"])
        assert set(kinds) <= {"CHAT", "PING", "HELLO"} and kinds.count("HELLO") <= 1, kinds
        assert kinds.count("CHAT") >= 1 and kinds.count("PING") >= 2
