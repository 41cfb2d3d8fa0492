"""Lazy push (meshchat/lazypush.py): pure rules, a relay's wiring, a simulated 30-node mesh, live nodes."""

import json
import random

import pytest

from meshchat import lazypush as lp
from meshchat.delivery import Delivery, DeliveryConfig
from meshchat.lazypush import GRAFT_WAIT_S, MAX_IHAVE_SEQS, MAX_MISSING, LazyPush, Link, Push
from meshchat.membership import CAPS as MEMBERSHIP_CAPS, Membership, MembershipConfig
from meshchat.relay import Relay, RelayConfig, Send
from meshchat.wire import Message, decode, encode

from test_simulate import TTL, live_run, sim

WALL = 1_700_000_000.0
ORIGIN = "0123456789abcdef"


def addr(i):
    return ("10.0.0.%d" % i, 9000)


class World:
    """One LazyPush with neighbours 2..n+1 that speak LAZY, and the ids it has had."""

    def __init__(self, n=5, have=()):
        self.have = set(have)
        self.held = {}
        self.speakers = [(addr(i), "10.0.0.%d:9000" % i) for i in range(2, n + 2)]
        self.version = 0
        counter = iter(range(10 ** 9))
        self.lp = LazyPush("10.0.0.1:9000", lambda: "x%015d" % next(counter), lambda: self.speakers,
                           self.have.__contains__, self.held.get, version=lambda: self.version)

    def msg(self, kind, extra, src=2):
        return Message("k1", WALL, 1, kind, "10.0.0.%d:9000" % src, "10.0.0.1:9000", "", extra)


def kinds(actions):
    return [decode(a.data).kind for a in actions]


def test_a_duplicate_prunes_its_link_and_tells_the_sender_and_the_link_then_gets_announcements():
    w = World(n=5)
    mid = ORIGIN + "-1"
    targets = tuple(a for a, _ in w.speakers)
    assert w.lp.split(mid, targets, 1.0, ttl=8) == targets  # every link starts eager
    out = w.lp.duplicate(mid, addr(3), 1.0, WALL, ttl=6)  # came two hops longer than the first copy
    assert kinds(out) == ["PRUNE"] and out[0].addr == addr(3)
    assert w.lp.split(ORIGIN + "-2", targets, 2.0) == tuple(a for a in targets if a != addr(3))
    acts = w.lp.tick(2.0 + lp.IHAVE_BATCH_S, WALL)
    assert kinds(acts) == ["IHAVE"] and acts[0].addr == addr(3)
    assert decode(acts[0].data).extra["ihave"] == {ORIGIN: [2]}
    # The same duplicate again at once: no second PRUNE (one a PRUNE_AGAIN_S), then one more.
    assert w.lp.duplicate(mid, addr(3), 1.0 + lp.PRUNE_AGAIN_S / 2, WALL, ttl=6) == []
    assert kinds(w.lp.duplicate(mid, addr(3), 1.0 + lp.PRUNE_AGAIN_S, WALL, ttl=6)) == ["PRUNE"]


def test_a_duplicate_as_short_as_the_first_copy_or_below_min_eager_prunes_nothing():
    w = World(n=5)
    mid = ORIGIN + "-1"
    w.lp.split(mid, tuple(a for a, _ in w.speakers), 1.0, ttl=8)
    assert w.lp.duplicate(mid, addr(3), 1.0, WALL, ttl=8) == []  # a parallel shortest way: kept
    small = World(n=lp.MIN_EAGER)
    small.lp.split(mid, tuple(a for a, _ in small.speakers), 1.0, ttl=8)
    assert small.lp.duplicate(mid, addr(3), 1.0, WALL, ttl=5) == []  # would leave too few eager links


def test_a_prune_received_turns_the_link_lazy_and_a_graft_turns_it_eager_with_the_payload():
    w = World(n=5)
    payload = Message(ORIGIN + "-4", WALL, 6, "CHAT", "o:1", "", "hi", {"ttl0": 8})
    w.held[payload.mid] = payload
    targets = tuple(a for a, _ in w.speakers)
    assert w.lp.prune_received(w.msg("PRUNE", {}), addr(2), 50, 1.0, WALL) == ([], "")
    assert addr(2) not in w.lp.split(ORIGIN + "-5", targets, 1.0)
    out, why = w.lp.graft_received(w.msg("GRAFT", {"graft": {ORIGIN: [4, 9]}}), addr(2), 60, 1.1, WALL)
    assert why == "" and [type(a) for a in out] == [Push] and out[0].addr == addr(2)
    assert decode(out[0].data).ttl == 5  # the copy we would have pushed: one hop less than it came
    assert w.lp.counters["graft_misses"] == 1  # seq 9 we never had
    assert addr(2) in w.lp.split(ORIGIN + "-6", targets, 1.2)


def test_an_announcement_without_the_payload_is_grafted_after_the_wait_and_not_if_it_came():
    w = World(n=5)
    ihave = w.msg("IHAVE", {"ihave": {ORIGIN: [7, 8]}}, src=4)
    assert w.lp.ihave_received(ihave, addr(4), 80, 1.0, WALL) == ([], "")
    assert w.lp.next_deadline() == pytest.approx(1.0 + GRAFT_WAIT_S)
    assert w.lp.tick(1.0 + GRAFT_WAIT_S / 2, WALL) == []
    w.have.add(ORIGIN + "-8")  # 8 came by the tree meanwhile
    acts = w.lp.tick(1.0 + GRAFT_WAIT_S, WALL)
    assert kinds(acts) == ["GRAFT"] and acts[0].addr == addr(4)
    assert decode(acts[0].data).extra["graft"] == {ORIGIN: [7]}
    # Unanswered: asked again, GRAFT_TRIES in all, then left to delivery's gap repair.
    t, grafts = 1.0 + GRAFT_WAIT_S, 1
    for _ in range(10):
        t += lp.GRAFT_AGAIN_S
        grafts += len(w.lp.tick(t, WALL))
    assert grafts == lp.GRAFT_TRIES and w.lp.counters["missing_given_up"] == 1
    assert w.lp.next_deadline() is None


def test_seed_design_and_flood_neighbours_always_get_the_payload():
    w = World(n=4)
    seedish = addr(50)  # not among the LAZY speakers
    mid = ORIGIN + "-1"
    w.lp.split(mid, (seedish,), 1.0, ttl=8)
    assert w.lp.duplicate(mid, seedish, 1.0, WALL, ttl=3) == []  # never pruned: it knows no PRUNE
    assert w.lp.split(ORIGIN + "-2", (seedish,), 1.0) == (seedish,)
    # A LAZY neighbour that was pruned and then came back without LAZY (restarted with --flood):
    w2 = World(n=5)
    w2.lp.prune_received(w2.msg("PRUNE", {}), addr(2), 50, 1.0, WALL)
    w2.speakers = w2.speakers[1:]
    w2.version += 1
    assert addr(2) in w2.lp.split(ORIGIN + "-3", (addr(2),), 2.0)


def test_non_stream_messages_are_never_lazy():
    w = World(n=5)
    w.lp.prune_received(w.msg("PRUNE", {}), addr(2), 50, 1.0, WALL)
    assert w.lp.split("4f2a9c0d11", (addr(2),), 1.0) == (addr(2),)  # a seed-design node's random mid
    assert w.lp.duplicate("4f2a9c0d11", addr(2), 1.0, WALL, ttl=1) == []


def test_the_tables_stay_bounded_and_hostile_fields_are_refused_and_counted():
    w = World(n=5)
    w.lp.prune_received(w.msg("PRUNE", {}), addr(2), 50, 1.0, WALL)
    for seq in range(1, 3 * MAX_IHAVE_SEQS):
        w.lp.split("%s-%d" % (ORIGIN, seq), (addr(2),), 1.0)
    acts = w.lp.tick(2.0, WALL)
    assert len(acts) == 1 and sum(len(v) for v in decode(acts[0].data).extra["ihave"].values()) == MAX_IHAVE_SEQS
    assert len(acts[0].data) <= 1400
    for k in range(MAX_MISSING // MAX_IHAVE_SEQS + 10):
        seqs = {"%016x" % (k + 1): list(range(1, MAX_IHAVE_SEQS + 1))}
        w.lp.ihave_received(w.msg("IHAVE", {"ihave": seqs}), addr(3), 900, 3.0, WALL)
    assert len(w.lp._missing) <= MAX_MISSING and w.lp.counters["missing_dropped"] > 0
    grafts = [a for a in w.lp.tick(3.0 + GRAFT_WAIT_S, WALL) if isinstance(a, Link)]
    assert all(sum(len(v) for v in decode(g.data).extra["graft"].values()) <= MAX_IHAVE_SEQS for g in grafts)
    for bad in (None, 1, "x", [], {}, {"zz": [1]}, {ORIGIN: [0]}, {ORIGIN: [True]}, {ORIGIN: list(range(1, 70))},
                {ORIGIN: "1"}, {ORIGIN.upper(): [1]}):
        for kind, handler in (("IHAVE", w.lp.ihave_received), ("GRAFT", w.lp.graft_received)):
            assert handler(w.msg(kind, {kind.lower(): bad}), addr(2), 50, 4.0, WALL) == ([], "malformed")
    assert w.lp.counters["malformed_ihave"] == w.lp.counters["malformed_graft"] == 11
    po = LazyPush("a:1", lambda: "m", lambda: [(addr(2), "b:1")], lambda mid: False, lambda mid: None,
                  per_origin=True)
    for bad in (None, 1, "x" * 16, ORIGIN.upper()):
        assert po.prune_received(Message("p", WALL, 1, "PRUNE", "b:1", "a:1", "", {"tree": bad}), addr(2), 9,
                                 1.0, WALL) == ([], "malformed")


# -- a relay's wiring ----------------------------------------------------------------------------------

def _relay(lazy_caps=True):
    label = "10.0.0.1:9000"
    caps = MEMBERSHIP_CAPS + ("ACK", "REPAIR") + (("LAZY",) if lazy_caps else ())
    m = Membership(MembershipConfig(label=label, caps=caps), secret=b"s")
    d = Delivery(DeliveryConfig(label, "00000000000000a1"), neighbours=m.repair_neighbours)
    r = Relay(RelayConfig(label=label, rate_limit=0, ttl=8, flood=False), membership=m, delivery=d)
    return r, m


def _up(m, i, caps):
    """Neighbour ``i`` up, speaking ``caps`` (the handshake's result, set directly)."""
    from meshchat.membership import Neighbour

    n = m.neighbours[addr(i)] = Neighbour(addr(i), True, 0.0)
    n.up, n.speaks, n.label, n.caps = True, True, "10.0.0.%d:9000" % i, frozenset(caps)
    m._changed()


def test_a_relay_prunes_a_lazy_neighbour_on_a_duplicate_but_never_a_seed_neighbour():
    r, m = _relay()
    for i in (2, 3, 4, 5, 6):
        _up(m, i, ("HELLO", "LAZY", "REPAIR") if i != 6 else ())
    chat = Message(ORIGIN + "-1", WALL, 8, "CHAT", "o:1", "", "hi", {"ttl0": 8})
    first = r.datagram_received(encode(chat), addr(2), 1.0, WALL)
    assert any(isinstance(a, Send) and len(a.addrs) == 4 for a in first)  # flooded to 3..6: all eager yet
    dup = r.datagram_received(encode(chat._replace(ttl=5)), addr(3), 1.0, WALL)
    assert [decode(a.data).kind for a in dup] == ["PRUNE"]
    assert r.datagram_received(encode(chat._replace(ttl=5)), addr(6), 1.0, WALL) == []  # seed-design: no PRUNE
    assert r.stats()["dropped_duplicate"] == 2 and r.stats()["lazy_prunes_sent"] == 1
    nxt = r.datagram_received(encode(chat._replace(mid=ORIGIN + "-2")), addr(2), 2.0, WALL)
    sent = [a for a in nxt if isinstance(a, Send)]
    assert set(sent[0].addrs) == {addr(4), addr(5), addr(6)}  # 3 gets an IHAVE instead
    acts = r.timers_due(2.0 + lp.IHAVE_BATCH_S, WALL)
    assert [(decode(a.data).kind, a.addrs) for a in acts if isinstance(a, Send) and b"IHAVE" in a.data] == [
        ("IHAVE", (addr(3),))]


def test_lazy_kinds_from_a_stranger_are_dropped_unproven():
    r, m = _relay()
    for kind, extra in (("IHAVE", {"ihave": {ORIGIN: [1]}}), ("GRAFT", {"graft": {ORIGIN: [1]}}), ("PRUNE", {})):
        msg = Message("s" + kind, WALL, 1, kind, "10.9.9.9:9000", "10.0.0.1:9000", "", extra)
        assert r.datagram_received(encode(msg), ("10.9.9.9", 9000), 1.0, WALL) == []
    assert r.stats()["dropped_unproven"] == 3


def test_flood_config_has_no_lazy_push():
    label = "10.0.0.1:9000"
    m = Membership(MembershipConfig(label=label), secret=b"s")
    d = Delivery(DeliveryConfig(label, "00000000000000a1"), neighbours=m.repair_neighbours)
    r = Relay(RelayConfig(label=label, flood=True), membership=m, delivery=d)
    assert r.lazy is None and "IHAVE" not in r._link_kinds


# -- a simulated mesh ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_a_30_node_mesh_with_lazy_push_delivers_all_after_repair_with_fewer_payloads(loss):
    common = dict(nodes=30, messages=60, loss=loss, seed=5, settle_s=20.0, idle_s=5.0, drain_s=15.0)
    flood = sim.run(sim.Params(model="flood", **common))
    lazy = sim.run(sim.Params(model="lazy", **common))
    assert flood["delivery_after_repair"] == 1.0 and lazy["delivery_after_repair"] == 1.0
    assert lazy["chat_datagrams_per_message"] < 0.8 * flood["chat_datagrams_per_message"], (
        lazy["chat_datagrams_per_message"], flood["chat_datagrams_per_message"])
    assert lazy["sent_by_kind"].get("IHAVE", 0) > 0 and "IHAVE" not in flood["sent_by_kind"]


# -- live nodes on loopback ------------------------------------------------------------------------------

def test_a_live_mesh_with_lazy_push_delivers_every_message():
    n, messages, seed = 12, 30, 11
    links = sim.random_regular(n, 4, random.Random(seed))
    origins = [random.Random(seed + k).randrange(n) for k in range(messages)]
    first, shown, chat = live_run(links, origins, 0.0, seed, flood=False)  # lazy push (--lazy)
    assert shown == 1.0
    # Pruned links carried announcements: fewer payloads than plain flooding's one per link direction
    # less the senders' (12 nodes x 4 links: 4 + 11 x 3 = 37 a message).
    assert chat < 37, chat


def test_flooding_is_the_default_and_lazy_announces_the_capability():
    from meshchat.cli import parse_args
    from meshchat.node import History
    from nodes import Cluster

    assert parse_args(["--lazy"]).lazy is True and parse_args([]).lazy is False
    with Cluster(2, membership=MembershipConfig(label=""), history=History(enabled=False)) as c:
        assert "LAZY" not in c[1].node.membership.config.caps and c[1].node.relay.lazy is None
    with Cluster(1, membership=MembershipConfig(label=""), history=History(enabled=False), flood=False) as c:
        assert "LAZY" in c[1].node.membership.config.caps and c[1].node.relay.lazy is not None
