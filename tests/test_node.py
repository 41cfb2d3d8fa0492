"""Real UDP sockets on 127.0.0.1, several nodes in this process."""

import logging
import queue
import socket
import threading
import time

import pytest

from meshchat.node import Failure, Node
from meshchat.relay import Display, Pong, Relay, RelayConfig
from meshchat.wire import Message, encode

from meshsim import full, line
from nodes import Cluster, Probe


def test_two_nodes_chat_both_ways():
    with Cluster(2, [(1, 2)]) as c:
        c[1].node.say("hello from 1")
        assert c[2].shown(1) == ["hello from 1"]
        c[2].node.say("hello from 2")
        assert c[1].shown(1) == ["hello from 2"]
        assert c[1].node.stats()["displayed"] == 1, "its own line is not shown back to it"


def test_three_node_full_mesh_shows_each_message_exactly_once():
    with Cluster(3, full(3)) as c:
        for i in (1, 2, 3):
            c[i].node.say(f"from {i}")
        c.wait_until(c.quiet)
        for i in (1, 2, 3):
            shown = sorted(e.message.body for e in c[i].pending() if isinstance(e, Display))
            assert shown == sorted(f"from {j}" for j in (1, 2, 3) if j != i)
            stats = c[i].node.stats()
            assert stats["displayed"] == 2 and stats["received"] == 2 + stats["dropped_duplicate"]


@pytest.mark.parametrize("ttl", [1, 2, 4])
def test_five_node_line_reaches_exactly_ttl_hops(ttl):
    with Cluster(5, line(5), ttl=ttl) as c:
        c[1].node.say("how far?")
        for hop in range(2, 2 + ttl):
            assert c[hop].shown(1) == ["how far?"]
        last = 1 + ttl
        if last < 5:
            c.wait_until(c.quiet)
            assert c[last].node.stats()["relayed"] == 0, "ttl ran out here"
            assert c[last + 1].node.stats()["received"] == 0


def test_addressed_message_crosses_a_relay_unseen():
    with Cluster(3, line(3)) as c:
        c[1].node.say("for 3 only", dst=c[3].label)
        [event] = [c[3].next(Display)]
        assert event.message.body == "for 3 only" and event.message.dst == c[3].label
        c.wait_until(c.quiet)
        assert c[2].node.stats()["displayed"] == 0 and c[2].node.stats()["relayed"] == 1


def test_ping_pong_over_two_hops():
    with Cluster(3, line(3)) as c:
        [ping] = c[1].node.ping(c[3].label)
        pong = c[1].next(Pong)
        assert pong.src == c[3].label and pong.mid == ping.mid and pong.rtt_ms >= 0


def test_broadcast_ping_hears_from_everyone():
    with Cluster(4, line(4)) as c:
        c[1].node.ping()
        heard = {c[1].next(Pong).src for _ in range(3)}
        assert heard == {c[i].label for i in (2, 3, 4)}


def test_a_dead_peer_does_not_stop_the_others():
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    dead_addr = dead.getsockname()
    dead.close()  # nothing listens there now: sends may be refused
    with Cluster(2, [(1, 2)]) as c:
        c[1].node.add_peer(dead_addr)
        for i in range(5):
            c[1].node.say(f"m{i}")
        assert c[2].shown(5) == [f"m{i}" for i in range(5)]
        c[2].node.say("still here")
        assert c[1].shown(1) == ["still here"]


def test_stranger_datagrams_are_relayed_and_garbage_is_counted():
    with Cluster(2, [(1, 2)]) as c:
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with stranger:
            stranger.sendto(b"\xffgarbage", c[1].node.addr)
            msg = Message("s1", time.time(), 4, "CHAT", "127.0.0.1:1", "", "from outside")
            stranger.sendto(encode(msg), c[1].node.addr)
            assert c[2].shown(1) == ["from outside"]
        stats = c[1].node.stats()
        assert stats["dropped_malformed"] == 1 and stats["relayed"] == 1


def test_port_in_use_is_an_oserror_and_leaves_nothing_open():
    with Cluster(1) as c:
        with pytest.raises(OSError):
            Node(RelayConfig(label=""), "127.0.0.1", c[1].node.addr[1])


def test_stop_is_prompt_idempotent_and_joins_every_thread():
    p = Probe()
    p.node.start()
    assert p.node.stop() is True
    assert p.node.stop() is True
    names = {t.name for t in threading.enumerate()}
    assert not names & {"meshchat-net", "meshchat-reaper"}


def test_label_uses_advertised_host():
    node = Node(RelayConfig(label=""), "127.0.0.1", 0, advertise="chat.example")
    with node:
        assert node.label == f"chat.example:{node.addr[1]}"


class _ExplodingSocket:
    """A socket whose recvfrom has a bug: outside what one datagram's handling contains."""

    def __init__(self, sock):
        self._sock = sock

    def recvfrom(self, size):
        raise RuntimeError("boom")

    def sendto(self, data, addr):
        return self._sock.sendto(data, addr)


def test_a_crashing_thread_stops_the_node_loudly():
    p = Probe(wrap_socket=_ExplodingSocket)
    node = p.node
    node.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", node.addr)
        failure = p.next(Failure)
        assert failure.thread == "meshchat-net" and "boom" in failure.error
        assert node.stopping
    finally:
        node.stop()


class _BuggyRelay(Relay):
    """A relay with a bug in making copies of "poison" messages, after it has counted them."""

    processed: "queue.Queue[bytes]"

    def _copy(self, msg, *args):
        if msg.body.startswith("poison"):
            raise RuntimeError("bug in the copy")
        return super()._copy(msg, *args)

    def datagram_received(self, data, *args):
        try:
            return super().datagram_received(data, *args)
        finally:
            self.processed.put(data)


def _counters_add_up(stats):
    return stats["handled"] + sum(v for k, v in stats.items() if k.startswith("dropped_")) == stats["received"]


def test_a_datagram_whose_handling_raises_is_dropped_counted_and_logged_once(caplog):
    caplog.set_level(logging.ERROR, logger="meshchat.node")
    processed: "queue.Queue[bytes]" = queue.Queue()
    _BuggyRelay.processed = processed
    b = Probe()
    events: "queue.Queue[object]" = queue.Queue()
    a = Node(RelayConfig(label=""), "127.0.0.1", 0, peers=[b.node.addr], on_event=events.put,
             relay_factory=_BuggyRelay)
    with a, b.node:
        a.start()
        b.node.start()
        poison = [encode(Message(f"p{i}", time.time(), 5, "CHAT", "127.0.0.1:1", "", f"poison {i} " + "z" * 500))
                  for i in range(5)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for data in poison:
                s.sendto(data, a.addr)
            for _ in poison:
                processed.get(timeout=5)
            stats = a.stats()
            assert stats["received"] == 5 and stats["dropped_internal"] == 5 and _counters_add_up(stats)
            # What the failed datagrams had counted before the bug struck is undone.
            assert stats["handled"] == stats["displayed"] == stats["relayed"] == stats["sent"] == 0
            assert a.failure is None and events.empty()
            # Logged once for the one cause, with a hash and the first bytes, never the whole datagram.
            records = [r for r in caplog.records if "internal error" in r.getMessage()]
            assert len(records) == 1
            text = records[0].getMessage()
            assert "sha256 " in text and repr(poison[0][:64]) in text and "z" * 100 not in text
            # The node goes on: a normal message is shown and relayed.
            s.sendto(encode(Message("ok", time.time(), 5, "CHAT", "127.0.0.1:1", "", "still here")), a.addr)
            assert processed.get(timeout=5) and events.get(timeout=5).message.body == "still here"
            b.wait_for_body("still here")
        stats = a.stats()
        assert stats["handled"] == 1 and stats["relayed"] == 1 and _counters_add_up(stats)


def test_an_event_handler_that_raises_does_not_stop_the_copies_or_the_thread(caplog):
    caplog.set_level(logging.ERROR, logger="meshchat.node")

    def on_event(event):
        if isinstance(event, Display) and event.message.body == "bad event":
            raise ValueError("bug in the handler")
        shown.put(event)

    shown: "queue.Queue[object]" = queue.Queue()
    b = Probe()
    a = Node(RelayConfig(label=""), "127.0.0.1", 0, peers=[b.node.addr], on_event=on_event)
    with a, b.node:
        a.start()
        b.node.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for body in ("bad event", "good event"):
                s.sendto(encode(Message(body, time.time(), 5, "CHAT", "127.0.0.1:1", "", body)), a.addr)
        assert b.shown(2) == ["bad event", "good event"]  # the copy went on after the handler raised
        assert shown.get(timeout=5).message.body == "good event"
        assert a.failure is None and _counters_add_up(a.stats())
        assert sum("internal error" in r.getMessage() for r in caplog.records) == 1


def test_a_drain_is_handed_over_as_one_batch_once_its_messages_are_in_history(tmp_path):
    from meshchat.node import History

    batches = queue.Queue()
    src = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    src.bind(("127.0.0.1", 0))
    peer = src.getsockname()
    node = Node(RelayConfig(label="", rate_limit=0), peers=[peer], history=History(data_dir=str(tmp_path)),
                on_events=lambda events: batches.put((list(events), [node.store.has_message(e.message.mid)
                                                                      for e in events if isinstance(e, Display)])))
    try:
        now = time.time()  # the node is not started: the datagrams wait in its socket
        for i in range(5):
            src.sendto(encode(Message("m%d" % i, now, 2, "CHAT", "%s:%d" % peer, "", "hi %d" % i)),
                       node._sock.getsockname())
        node.store.start()
        node._datagrams_ready()  # one drain, as the socket thread does on a wake-up
        events, in_history = batches.get(timeout=5.0)
        assert [e.message.body for e in events] == ["hi %d" % i for i in range(5)]
        assert in_history == [True] * 5  # shown means saved: a restart never shows them again
        assert batches.empty()
    finally:
        node.stop()
        src.close()


def test_a_stream_of_events_is_handed_to_the_main_thread_every_few_milliseconds_and_a_lone_one_at_once():
    from meshchat.node import HAND_OVER_GAP_S, _Batch

    now = [100.0]
    handed = []
    node = Node(RelayConfig(label=""), on_events=lambda events: handed.append(list(events)), clock=lambda: now[0])
    try:
        node._hand_over(_Batch(["a"], []))
        assert handed == [["a"]], "the first goes at once"
        now[0] += HAND_OVER_GAP_S / 4
        node._hand_over(_Batch(["b"], []))
        now[0] += HAND_OVER_GAP_S / 4
        node._hand_over(_Batch(["c"], []))
        assert handed == [["a"]] and node._held_due == 100.0 + HAND_OVER_GAP_S, "a stream: kept together"
        node._release_held()  # what _net_loop does when _held_due comes
        assert handed == [["a"], ["b", "c"]]
        now[0] += 2 * HAND_OVER_GAP_S
        node._hand_over(_Batch(["d"], []))
        assert handed[-1] == ["d"], "a lone one after a quiet spell: at once"
    finally:
        node.stop()


def test_events_kept_for_a_hand_over_are_shown_by_the_running_node_without_anything_more_arriving():
    got: "queue.Queue[list]" = queue.Queue()
    node = Node(RelayConfig(label=""), on_events=got.put)
    node.start()
    try:
        from meshchat.node import _Batch
        node._handed_at = time.monotonic()  # as if a hand-over had just gone: the next one is kept
        node._hand_over(_Batch(["kept"], []))
        node._wake()  # the loop looks again and hands it over when its time comes
        assert got.get(timeout=5) == ["kept"]
    finally:
        node.stop()
