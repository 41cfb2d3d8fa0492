"""Acknowledged direct messages, the outbox and gap repair on real sockets, with and without history."""

import threading
import time

from meshchat.console import stats_lines
from meshchat.delivery import Delivered, Undelivered
from meshchat.membership import MembershipConfig, PeerDown, PeerUp
from meshchat.node import History
from meshchat.repair import ServeSince

from nodes import Cluster, Probe

FAST = MembershipConfig(label="", hello_max_s=0.4)
MEMORY = History(enabled=False)


def test_a_direct_message_is_acknowledged():
    with Cluster(3, [(1, 2), (2, 3)], membership=FAST, history=MEMORY) as c:
        c[1].next(PeerUp)
        c[3].next(PeerUp)
        c[2].next(PeerUp)
        c[2].next(PeerUp)
        [msg] = c[1].node.say("are you there?", dst=c[3].label)
        c[3].wait_for_body("are you there?")
        done = c[1].next(Delivered)
        assert done.mid == msg.mid and done.dst == c[3].label and done.tries == 1 and done.rtt_ms >= 0
        stats = c[1].node.stats()
        assert stats["delivered"] == 1 and stats["outbox"] == 0 and c[3].node.stats()["acks_sent"] >= 1
        assert any(line.startswith("direct: delivered 1") for line in stats_lines(stats))


def test_a_message_to_a_node_that_is_down_is_held_then_delivered_when_it_returns(tmp_path):
    with Cluster(2, [(1, 2)], membership=FAST, history=MEMORY) as c:
        c[1].next(PeerUp)
        c[2].next(PeerUp)
        port, label = c[2].node.addr[1], c[2].label
        c[2].node.stop()
        c[1].next(PeerDown, timeout=10)
        [msg] = c[1].node.say("while you were out", dst=label)
        held = c[1].next(Undelivered)
        assert held.mid == msg.mid and held.held
        back = Probe(membership=FAST, history=MEMORY, port=port)
        try:
            back.node.add_peer(c[1].node.addr)
            back.node.start()
            back.wait_for_body("while you were out", timeout=10)
            assert c[1].next(Delivered, timeout=10).mid == msg.mid
        finally:
            back.node.stop()


def test_a_catch_up_is_read_from_history_on_the_stores_thread_never_the_socket_thread(tmp_path):
    with Cluster(2, [(1, 2)], membership=FAST, history=History(data_dir=str(tmp_path))) as c:
        c[1].next(PeerUp)
        c[2].next(PeerUp)
        c[2].node.say("kept in 2's history")
        c[1].wait_for_body("kept in 2's history")
        store = c[2].node.store
        assert store is not None and store.flush()
        read_on = []
        real = store.messages_since

        def messages_since(ts, limit):
            read_on.append(threading.current_thread().name)
            return real(ts, limit)

        store.messages_since = messages_since
        served = c[2].node.stats()["served"]
        c[2].node._act([ServeSince(0.0, c[1].node.addr, 10)])  # what the socket thread does with a SINCE
        c.wait_until(lambda: c[2].node.stats()["served"] > served)  # node 1 gets the copy (a duplicate)
        assert read_on == ["meshchat-store"]


def test_a_node_whose_discovery_cannot_start_closes_its_history_so_a_retry_can_open_it(tmp_path):
    import pytest
    from meshchat.node import Discovery, Node
    from meshchat.relay import RelayConfig

    from ports import free_ports

    history = History(data_dir=str(tmp_path))
    [port] = free_ports(1)  # the same port both times: the same label, so the same history folder
    nowhere = Discovery(("239.255.77.78", 9977), ("192.0.2.1",))  # TEST-NET-1: on no interface here
    with pytest.raises(OSError):
        Node(RelayConfig(label=""), port=port, membership=FAST, history=history, discovery=nowhere)
    again = Node(RelayConfig(label=""), port=port, membership=FAST, history=history)  # its lock is free
    again.stop()


def test_a_node_restarted_with_history_knows_the_names_two_hops_away_at_once(tmp_path):
    from dataclasses import replace

    from ports import free_ports

    [port] = free_ports(1)
    alice, bob, carol = (replace(FAST, nick=n) for n in ("alice", "bob", "carol"))
    first = Probe(membership=alice, history=History(data_dir=str(tmp_path / "a")), port=port)
    b = Probe(processed=first.processed, membership=bob, history=History(data_dir=str(tmp_path / "b")))
    c = Probe(processed=first.processed, membership=carol, history=History(data_dir=str(tmp_path / "c")))
    try:
        for x, y in ((first, b), (b, c)):
            x.node.add_peer(y.node.addr)
            y.node.add_peer(x.node.addr)
        for p in (first, b, c):
            p.node.start()
        deadline = time.monotonic() + 10
        while first.node.resolve("carol")[0] is None:  # carol's PRESENCE, flooded through bob
            assert time.monotonic() < deadline, "alice never heard of carol"
            first.processed.get(timeout=10)
        c.node.say("something for alice's history")
        first.wait_for_body("something for alice's history")
        first.node.stop()
        again = Probe(processed=b.processed, membership=alice, history=History(data_dir=str(tmp_path / "a")), port=port)
        try:
            again.node.add_peer(b.node.addr)
            again.node.start()
            deadline = time.monotonic() + 10  # carol's next PRESENCE is a minute or more away
            while again.node.resolve("carol")[0] != c.label:
                assert time.monotonic() < deadline, "the restarted node did not learn carol's name from bob"
                b.processed.get(timeout=10)
            assert again.node.membership.members[c.label].hops is None, "its way is not taken from an old copy"
        finally:
            again.node.stop()
    finally:
        for p in (first, b, c):
            p.node.stop()
