"""Delivery with plain values: acks, retries, outbox, store-and-forward and gap repair, in virtual time."""

import random
from collections import Counter

import pytest

from meshchat.delivery import (COUNTERS, TRIES, Ack, Delivered, Delivery, DeliveryConfig, Forward, HeldDrop, HeldPut,
                               MetaPut, OutboxDrop, OutboxItem, OutboxPut, Resend, Store, Undelivered, direct_key)
from meshchat.repair import BEHIND, HAVE_ORIGINS, MAX_WANT_SEQS, SERVE_PER_S, Serve, ServeSince, Want, parse_have, parse_want
from meshchat.wire import Message, decode, encode

WALL = 1_000_000.0
ACK_CAPS = frozenset(("HELLO", "ACK", "REPAIR"))


def addr(i):
    return ("10.0.0.%d" % i, 9000)


def label(i):
    return "10.0.0.%d:9000" % i


def node_id(i):
    return "%016x" % (0xabc0000 + i)


class World:
    """Deliveries 1..n on a full mesh of lossy links with 10 ms latency, in virtual time.

    It plays the node and the relay: a seen set per node drops repeated mids, a broadcast is
    remembered and shown, a direct CHAT to us is shown if ``direct_received`` says so, an ACK to us
    goes to ``ack_received``, and the link-local kinds go to their handlers."""

    def __init__(self, n=2, loss=0.0, seed=1, **kw):
        self.now = 10.0
        self.rng = random.Random(seed)
        self.loss = loss
        self.down = set()
        self.cut = set()  # (a, b): datagrams from a to b are lost
        self.queue = []  # (due, seq, src, dst, data)
        self.sent = []  # (src, dst, kind, mid) of every datagram put on a link
        self.shown = {i: [] for i in range(1, n + 1)}  # (mid, late)
        self.events = {i: [] for i in range(1, n + 1)}
        self.stored = {i: [] for i in range(1, n + 1)}
        self.seen = {i: set() for i in range(1, n + 1)}
        self.n = n
        self.d = {i: self.make(i, **kw) for i in range(1, n + 1)}
        self._k = 0

    def make(self, i, **kw):
        ups = lambda i=i: [(addr(j), label(j)) for j in range(1, self.n + 1) if j != i and j not in self.down]
        return Delivery(DeliveryConfig(label(i), node_id(i)), neighbours=ups, rng=random.Random(i),
                        new_mid=lambda: "%016x" % self.rng.getrandbits(64), **kw)

    # -- sending -------------------------------------------------------------------------------

    def put(self, src, dst, data):
        msg = decode(data)
        self.sent.append((src, dst, msg.kind, msg.mid))
        if (src, dst) in self.cut or src in self.down or self.rng.random() < self.loss:
            return
        self._k += 1
        self.queue.append((self.now + 0.01, self._k, src, dst, data))

    def post(self, i, actions):
        for a in actions:
            if isinstance(a, (Resend, Forward)):
                j = int(a.dst.split(":")[0].rsplit(".", 1)[1])
                self.seen[i].add(a.message.mid)
                self.put(i, j, encode(a.message))
            elif isinstance(a, Ack):
                j = int(a.dst.split(":")[0].rsplit(".", 1)[1])
                ack = Message("%016x" % self.rng.getrandbits(64), WALL, 8, "ACK", label(i), a.dst, a.mid)
                self.put(i, j, encode(ack))
            elif hasattr(a, "data") and hasattr(a, "addr"):
                self.put(i, int(a.addr[0].rsplit(".", 1)[1]), a.data)
            elif isinstance(a, ServeSince):
                self.d[i].serve(a.addr, self.d[i].recent_since(a.ts, a.limit), self.now)
            elif isinstance(a, Store):
                self.stored[i].append(a.item)
            else:
                self.events[i].append(a)

    def direct(self, i, j, body="hi", caps=True, down=False):
        d = self.d[i]
        mid, acts = d.next_direct_mid()
        self.post(i, acts)
        msg = Message(mid, WALL, 8, "CHAT", label(i), label(j), body, {"ack": 1})
        self.seen[i].add(mid)
        self.put(i, j, encode(msg))
        self.post(i, d.direct_sent(msg, self.now, 1, caps, down))
        return mid

    def broadcast(self, i, body="hi", to=None):
        d = self.d[i]
        mid, acts = d.next_broadcast_mid()
        self.post(i, acts)
        msg = Message(mid, WALL, 8, "CHAT", label(i), "", body)
        data = encode(msg)
        self.seen[i].add(mid)
        d.remember(msg, data, self.now)
        for j in (to or [j for j in range(1, self.n + 1) if j != i]):
            self.put(i, j, data)
        return mid

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, src, j, data):
        if j in self.down:
            return
        d = self.d[j]
        msg = decode(data)
        if msg.kind in ("WANT", "HAVE", "SINCE"):
            handler = {"WANT": d.want_received, "HAVE": d.have_received, "SINCE": d.since_received}[msg.kind]
            out, why = handler(msg, addr(src), len(data), self.now, WALL)
            assert why == ""
            self.post(j, out)
            return
        if msg.mid in self.seen[j]:
            return
        self.seen[j].add(msg.mid)
        if msg.kind == "ACK":
            self.post(j, d.ack_received(msg, self.now))
        elif msg.dst == label(j):
            show, acts = d.direct_received(msg, self.now)
            if show:
                self.shown[j].append((direct_key(msg), False))
            self.post(j, acts)
        elif msg.dst == "":
            late = d.broadcast_seen(msg, addr(src), self.now)
            d.remember(msg, data, self.now)
            self.shown[j].append((msg.mid, late))

    def advance(self, seconds, step=0.05):
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = round(self.now + step, 6)
            self.queue.sort()
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dst, data = self.queue.pop(0)
                self.receive(src, dst, data)
            for i, d in self.d.items():
                if i not in self.down:
                    self.post(i, d.tick(self.now, WALL))

    def of(self, i, kind):
        return [e for e in self.events[i] if isinstance(e, kind)]


# -- acknowledged direct messages ------------------------------------------------------------------

def test_a_direct_message_acked_on_the_first_try_is_delivered_with_its_rtt():
    w = World()
    mid = w.direct(1, 2)
    w.advance(1.0, step=0.005)
    [done] = w.of(1, Delivered)
    assert done.mid == mid and done.dst == label(2) and done.tries == 1 and 15.0 <= done.rtt_ms <= 25.0
    assert w.shown[2] == [(mid, False)] and w.d[1].counters["retries"] == 0
    assert [k for _, _, k, _ in w.sent] == ["CHAT", "ACK"]
    w.advance(60.0)
    assert not w.of(1, Undelivered) and w.d[1].counters["retries"] == 0


@pytest.mark.parametrize("seed", range(12))
def test_through_a_link_losing_half_it_arrives_exactly_once_and_is_delivered(seed):
    w = World(loss=0.5, seed=seed)
    mid = w.direct(1, 2)
    w.advance(80.0)
    while not w.of(1, Delivered):  # the tries ran out: the outbox sends it again when 2 is heard from
        assert w.of(1, Undelivered)[0].held
        w.post(1, w.d[1].peer_heard(label(2), w.now, WALL, ACK_CAPS))
        w.advance(5.0)
    assert w.shown[2] == [(mid, False)]
    assert len(w.of(1, Delivered)) == 1
    retries = [m for s, _, k, m in w.sent if s == 1 and k == "CHAT"]
    assert retries[0] == mid and all(m == "%s~%d" % (mid, n) for n, m in enumerate(retries[1:], 2))
    d2 = w.d[2].counters
    assert d2["acks_sent"] + d2["acks_rate_limited"] == d2["direct_shown"] + d2["direct_duplicate"]  # every copy


def test_lost_first_copies_are_retried_with_fresh_mids_and_shown_once():
    w = World()
    w.cut.add((1, 2))
    mid = w.direct(1, 2)
    w.advance(1.25)  # the first retry is due after 1.2 s (+/- jitter)
    w.advance(2.0)
    w.cut.clear()
    w.advance(10.0)
    chats = [m for s, _, k, m in w.sent if k == "CHAT"]
    assert chats[:2] == [mid, mid + "~2"] and len(chats) >= 2
    assert w.shown[2] == [(mid, False)]
    [done] = w.of(1, Delivered)
    assert done.tries == len(chats)
    assert w.d[1].counters["retries"] == len(chats) - 1


def test_a_duplicate_is_acked_again_but_not_more_than_once_per_half_second():
    d = Delivery(DeliveryConfig(label(2), node_id(2)))
    msg = Message(node_id(1) + "-d1x0000abcd", WALL, 8, "CHAT", label(1), label(2), "hi", {"ack": 1})
    retry = msg._replace(mid=msg.mid + "~2", extra={"ack": 1, "re": msg.mid})
    assert d.direct_received(msg, 1.0) == (True, [Ack(label(1), msg.mid)])
    assert d.direct_received(retry, 1.2) == (False, [])
    assert d.direct_received(retry._replace(mid=msg.mid + "~3"), 1.6) == (False, [Ack(label(1), msg.mid)])
    stripped = retry._replace(mid=msg.mid + "~4", extra={"ack": 1})  # a seed-design relay dropped re
    assert d.direct_received(stripped, 3.0) == (False, [Ack(label(1), msg.mid)])
    assert d.counters["acks_sent"] == 3 and d.counters["acks_rate_limited"] == 1


def test_a_message_already_in_history_is_not_shown_again_after_a_restart():
    d = Delivery(DeliveryConfig(label(2), node_id(2)), has_message={node_id(1) + "-d7x0000abcd"}.__contains__)
    msg = Message(node_id(1) + "-d7x0000abcd~3", WALL, 8, "CHAT", label(1), label(2), "hi", {"ack": 1, "re": node_id(1) + "-d7x0000abcd"})
    assert d.direct_received(msg, 1.0) == (False, [Ack(label(1), node_id(1) + "-d7x0000abcd")])


def test_when_the_tries_run_out_it_is_held_and_delivered_once_the_destination_is_heard():
    w = World()
    w.down.add(2)
    mid = w.direct(1, 2)
    w.advance(120.0)
    chats = [m for s, _, k, m in w.sent if k == "CHAT"]
    assert len(chats) == TRIES
    [und] = w.of(1, Undelivered)
    assert und == Undelivered(mid, label(2), TRIES, True)
    # On disk from the first try (a crash while retrying loses nothing), then again with its tries.
    puts = [x for x in w.stored[1] if not isinstance(x, MetaPut)]
    assert [type(x) for x in puts] == [OutboxPut, OutboxPut] and [x.tries for x in puts] == [1, TRIES]
    assert w.d[1].peer_heard(label(2), w.now, WALL, None) == []  # capabilities unknown: nothing
    w.down.clear()
    w.post(1, w.d[1].peer_heard(label(2), w.now, WALL, ACK_CAPS))
    w.post(1, w.d[1].peer_heard(label(2), w.now, WALL, ACK_CAPS))  # heard again at once: sent once
    w.advance(1.0)
    [done] = w.of(1, Delivered)
    assert done.mid == mid and done.tries == TRIES + 1
    assert w.shown[2] == [(mid, False)]
    assert isinstance(w.stored[1][-1], OutboxDrop) and w.d[1].stats()["outbox"] == 0


def test_unknown_capabilities_get_one_try_then_held():
    w = World()
    w.down.add(2)
    mid = w.direct(1, 2, caps=False)
    w.advance(30.0)
    assert [m for s, _, k, m in w.sent if k == "CHAT"] == [mid]
    assert w.of(1, Undelivered) == [Undelivered(mid, label(2), 1, True)]


def test_a_destination_known_down_is_reported_held_at_once():
    w = World()
    w.down.add(2)
    mid = w.direct(1, 2, down=True)
    assert w.of(1, Undelivered) == [Undelivered(mid, label(2), 1, True)]
    w.advance(30.0)
    assert len([k for _, _, k, _ in w.sent if k == "CHAT"]) == 1


def test_the_outbox_expires_by_housekeeping_and_never_by_the_timers():
    # Expiry is the reaper's: a timer of its own would wake every idle node every few seconds.
    w = World()
    w.down.add(2)
    mid = w.direct(1, 2, down=True)
    d = w.d[1]
    later = WALL + d.config.hold_s + 1.0
    assert d.tick(w.now + 10.0, later) == [] and d.stats()["outbox"] == 1
    acts = d.housekeep(w.now + 10.0, later)
    assert Undelivered(mid, label(2), 1, False) in acts and d.stats()["outbox"] == 0
    assert any(isinstance(a, Store) and isinstance(a.item, OutboxDrop) for a in acts)
    assert d.counters["outbox_expired"] == 1


def test_a_late_ack_of_a_held_message_still_reports_it_delivered():
    w = World()
    w.cut.add((2, 1))  # acks are lost
    mid = w.direct(1, 2, caps=False)
    w.advance(10.0)
    assert w.of(1, Undelivered)[0].held
    w.cut.clear()
    w.post(1, w.d[1].ack_received(Message("x1", WALL, 8, "ACK", label(2), label(1), mid), w.now))
    assert w.of(1, Delivered)[0].mid == mid


def test_the_outbox_survives_a_restart_of_the_sender():
    w = World()
    w.down.add(2)
    mid = w.direct(1, 2, down=True)
    [put] = [x for x in w.stored[1] if isinstance(x, OutboxPut)]
    w.d[1] = w.make(1, outbox=[OutboxItem(put.mid, put.dst, put.raw, put.created, put.tries)], next_dseq=65)
    w.down.clear()
    w.post(1, w.d[1].peer_heard(label(2), w.now, WALL, ACK_CAPS))
    w.advance(1.0)
    assert [e.mid for e in w.of(1, Delivered)] == [mid] and w.shown[2] == [(mid, False)]
    assert w.d[1].next_direct_mid()[0].startswith(node_id(1) + "-d65x")


def test_the_outbox_is_bounded_per_destination():
    d = Delivery(DeliveryConfig(label(1), node_id(1)))
    out = []
    for _ in range(105):
        mid, _ = d.next_direct_mid()
        out += d.direct_sent(Message(mid, WALL, 8, "CHAT", label(1), label(2), "x", {"ack": 1}), 1.0, 1, True, True)
    assert d.stats()["outbox"] == 100 and d.counters["outbox_dropped"] == 5
    assert sum(1 for a in out if isinstance(a, Undelivered) and not a.held) == 5


def test_seqs_are_reserved_ahead_and_written_back_on_close():
    d = Delivery(DeliveryConfig(label(1), node_id(1)), next_seq=10)
    mid, acts = d.next_broadcast_mid()
    assert mid == node_id(1) + "-10" and acts == [Store(MetaPut("seq", 74))]
    assert all(d.next_broadcast_mid()[1] == [] for _ in range(48))  # 11..58
    assert d.next_broadcast_mid()[1] == [Store(MetaPut("seq", 123))]  # 59: fewer than 16 left
    assert d.close()[0] == Store(MetaPut("seq", 59))


# -- store-and-forward -------------------------------------------------------------------------------

def test_a_relay_holds_a_message_for_an_absent_destination_and_hands_it_over_once_acked():
    r = Delivery(DeliveryConfig(label(3), node_id(3)), rng=random.Random(1))
    msg = Message(node_id(1) + "-d4x0000abcd", WALL, 7, "CHAT", label(1), label(2), "hi", {"ack": 1})
    data = encode(msg)
    assert r.relayed_direct(msg, data, 1.0, WALL, dst_recently_heard=True) == []
    acts = r.relayed_direct(msg, data, 1.0, WALL, dst_recently_heard=False)
    assert acts == [Store(HeldPut(msg.mid, label(2), data, WALL))]
    assert r.relayed_direct(msg._replace(mid=msg.mid + "~2"), data, 2.0, WALL, False) == []  # same message
    assert r.peer_heard(label(2), 5.0, WALL + 3600, None) == []
    [fwd] = r.peer_heard(label(2), 5.0, WALL + 3600, ACK_CAPS)
    assert isinstance(fwd, Forward) and fwd.dst == label(2)
    assert fwd.message.ts == WALL + 3600 and fwd.message.extra["ots"] == WALL and fwd.message.mid != msg.mid
    assert direct_key(fwd.message) == msg.mid
    assert r.peer_heard(label(2), 6.0, WALL + 3601, ACK_CAPS) == []  # not again at once
    dest = Delivery(DeliveryConfig(label(2), node_id(2)))
    assert dest.direct_received(fwd.message, 5.0)[0] is True
    assert dest.direct_received(msg, 5.1)[0] is False  # the sender's own retry arrives too: not shown twice
    ack = Message("a1", WALL, 7, "ACK", label(2), label(1), msg.mid)
    assert r.ack_relayed(ack) == [Store(HeldDrop(msg.mid))]
    assert r.peer_heard(label(2), 60.0, WALL, ACK_CAPS) == []


def test_relay_holding_is_bounded():
    r = Delivery(DeliveryConfig(label(3), node_id(3)))
    for i in range(1, 1300):
        msg = Message(node_id(1) + "-d%d" % i, WALL, 7, "CHAT", label(1), label(10 + i % 20), "x", {"ack": 1})
        r.relayed_direct(msg, encode(msg), 1.0, WALL, False)
    assert r.stats()["relay_holding"] <= 1000 and r.counters["relay_held_dropped"] >= 299


# -- gap repair --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_thirty_broadcasts_over_a_lossy_link_all_arrive_once(seed):
    w = World(loss=0.3, seed=seed)
    mids = []
    for k in range(30):
        mids.append(w.broadcast(1, "m%d" % k))
        w.advance(0.2)
    w.advance(100.0)
    got = [m for m, _ in w.shown[2]]
    assert sorted(got) == sorted(mids) and len(got) == len(set(got))
    assert any(late for _, late in w.shown[2])
    sent = Counter(k for _, _, k, _ in w.sent)
    assert sent["WANT"] + sent["CHAT"] + sent["HAVE"] < 10 * 30  # repair costs a small multiple


def test_a_summary_opens_gaps_for_a_tail_loss():
    w = World()
    mids = [w.broadcast(1, "m%d" % k) for k in range(5)]
    w.advance(1.0)
    w.cut.add((1, 2))
    tail = [w.broadcast(1, "t%d" % k) for k in range(3)]
    w.advance(1.0)
    w.cut.clear()
    assert [m for m, _ in w.shown[2]] == mids
    w.advance(40.0)  # the next HAVE (30 s, jittered) tells 2 of 6..8
    assert [m for m, _ in w.shown[2]][:5] == mids and sorted(m for m, _ in w.shown[2][5:]) == sorted(tail)
    assert [late for _, late in w.shown[2]] == [False] * 5 + [True] * 3
    assert w.d[2].counters["repaired"] == 3


def test_an_idle_mesh_sends_no_summary_after_an_unchanged_round():
    w = World()
    w.broadcast(1)
    w.advance(200.0)
    haves = [(s, w.now) for s, _, k, _ in w.sent if k == "HAVE"]
    assert 1 <= len(haves) <= 4
    w.sent.clear()
    w.advance(300.0)
    assert w.sent == []


def test_a_want_is_answered_from_memory_with_ttl_1_and_the_budget_holds():
    w = World()
    d = w.d[1]
    mids = [w.broadcast(1, "m%d" % k, to=[]) for k in range(300)]
    want = {node_id(1): list(range(1, 65))}
    msg = Message("w1", WALL, 1, "WANT", label(2), label(1), "", {"want": want})
    out, why = d.want_received(msg, addr(2), 100, w.now, WALL)
    assert why == "" and len(out) == 64 and all(isinstance(a, Serve) and a.addr == addr(2) for a in out)
    assert decode(out[0].data)._replace(ttl=8).mid == mids[0] and decode(out[0].data).ttl == 1
    served = 64
    for k in range(20):  # 20 more WANTs at the same instant: the bucket runs dry
        out, _ = d.want_received(msg, addr(2), 100, w.now, WALL)
        served += len(out)
    assert served <= SERVE_PER_S and d.counters["served_refused"] > 0
    none = msg._replace(extra={"want": {node_id(5): [1, 2]}})
    assert d.want_received(none, addr(2), 100, w.now + 10, WALL) == ([], "")
    assert d.counters["want_misses"] == 2


def test_gaps_stay_within_bounds_when_a_seq_jumps_far():
    d = Delivery(DeliveryConfig(label(2), node_id(2)), rng=random.Random(1),
                 neighbours=lambda: [(addr(1), label(1)), (addr(3), label(3))])
    m = lambda s: Message("%s-%d" % (node_id(1), s), WALL, 8, "CHAT", label(1), "", "x")
    d.broadcast_seen(m(1), addr(1), 1.0)
    d.broadcast_seen(m(2 ** 53), addr(1), 1.0)
    assert d.stats()["gaps"] == BEHIND and d.counters["gaps_given_up"] == BEHIND  # counted as given up: at most a window
    have = Message("h", WALL, 1, "HAVE", label(3), label(2), "", {"have": {node_id(4): 9}})
    d.have_received(have, addr(3), 100, 2.0, WALL)
    assert d.stats()["gaps"] == BEHIND + 9  # a stream that began within sight: from its start
    acts = d.tick(2.0, WALL)
    wants = [a for a in acts if isinstance(a, Want)]
    assert wants and all(sum(len(v) for v in a.wants.values()) <= MAX_WANT_SEQS and len(a.data) <= 1400
                         for a in wants)
    for t in range(6, 60):
        d.tick(t / 2.0, WALL)
    assert d.stats()["gaps"] == 0  # WANT_TRIES tries each, then given up


def test_catch_up_after_a_restart_shows_what_was_missed_as_late():
    w = World()
    w.down.add(2)
    mids = [w.broadcast(1, "m%d" % k) for k in range(4)]
    w.advance(1.0)
    w.d[2] = w.make(2, streams={}, last_stored_ts=WALL - 600)
    w.down.clear()
    w.post(2, w.d[2].neighbour_up(addr(1), label(1), w.now, WALL + 5))
    w.advance(2.0)
    assert sorted(m for m, _ in w.shown[2]) == sorted(mids) and all(late for _, late in w.shown[2])


# -- validation --------------------------------------------------------------------------------------

HOSTILE = [None, True, False, 0, -1, 1.5, 2 ** 53 + 1, 10 ** 400, float("nan"), float("inf"), -float("inf"),
           "", "x" * 10_000, "\ud800", [], {}, [[[[[]]]]], {"a": {"b": 1}}, "0123456789abcdef", ["1"],
           list(range(10_000)), {str(i): i for i in range(100)}, node_id(1).upper()]


def _deep(n):
    v = []
    for _ in range(n):
        v = [v]
    return v


def test_every_malformed_field_is_dropped_and_counted_never_raised():
    d = Delivery(DeliveryConfig(label(1), node_id(1)))
    good = {
        "WANT": {"want": {node_id(2): [1, 2]}},
        "HAVE": {"have": {node_id(2): 5}},
        "SINCE": {"since": WALL - 10},
    }
    handler = {"WANT": d.want_received, "HAVE": d.have_received, "SINCE": d.since_received}
    rng = random.Random(7)
    cases = 0
    for kind, extra in good.items():
        field = next(iter(extra))
        values = HOSTILE + [_deep(5000)]
        shapes = []
        for v in values:
            shapes.append({field: v})  # the whole field
            if isinstance(extra[field], dict):
                shapes.append({field: {node_id(2): v}})  # a value
                shapes.append({field: {v if isinstance(v, str) else type(v).__name__: extra[field][node_id(2)]}})  # a key
                if kind == "WANT":
                    shapes.append({field: {node_id(2): [1, v]}})  # one seq of a list
        shapes.append({})
        for x in shapes:
            before = sum(v for k, v in d.counters.items() if k.startswith("dropped_" + kind.lower()))
            msg = Message("m%d" % rng.randrange(10 ** 9), WALL, 1, kind, label(2), label(1), "", x)
            out, why = handler[kind](msg, addr(2), 100, 5.0 + cases, WALL)
            after = sum(v for k, v in d.counters.items() if k.startswith("dropped_" + kind.lower()))
            assert why in ("", "malformed")
            assert (why == "malformed") == (after == before + 1), (kind, x)
            cases += 1
    for v in HOSTILE + [_deep(5000)]:
        ack = Message("a", WALL, 8, "ACK", label(2), label(1), v if isinstance(v, str) else "z")
        assert d.ack_received(ack, 1.0) == []
        chat = Message("c", WALL, 8, "CHAT", label(2), label(1), "hi", {"ack": v, "re": v})
        show, acts = d.direct_received(chat, 1.0)
        assert acts == [] or v == 1
    assert parse_want({"want": {node_id(2): [1]}}) == ({node_id(2): [1]}, "")
    assert parse_have({"have": {node_id(2): 2 ** 53}}) == ({node_id(2): 2 ** 53}, "")
    assert parse_want({"want": {node_id(2): [True]}}) == (None, "seq")
    assert parse_want({"want": {node_id(2): list(range(1, 66))}}) == (None, "count")
    assert parse_have({"have": {node_id(2): 2 ** 53 + 1}}) == (None, "seq")
    assert d.counters["dropped_ack_id"] == len(HOSTILE) + 1
    assert set(d.counters) == set(COUNTERS)


def test_random_structure_aware_fuzz_never_raises():
    rng = random.Random(3)
    d = Delivery(DeliveryConfig(label(1), node_id(1)), rng=random.Random(1), neighbours=lambda: [(addr(2), label(2))])

    def value(depth=0):
        r = rng.randrange(10)
        if r == 0 and depth < 4:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        if r == 1 and depth < 4:
            return {rng.choice([node_id(2), "zz", ""]): value(depth + 1) for _ in range(rng.randrange(4))}
        return rng.choice(HOSTILE + [1, 2, 64, node_id(2), WALL])

    for i in range(3000):
        kind = rng.choice(["WANT", "HAVE", "SINCE", "ACK", "CHAT"])
        x = {rng.choice(["want", "have", "since", "ack", "re"]): value()}
        mid = rng.choice(["%s-%d" % (node_id(2), rng.randrange(1, 99)), node_id(1) + "-d3x0000abcd~2", "q%d" % i])
        dst = rng.choice(["", label(1)])
        msg = Message(mid, WALL, 1, kind, label(2), dst, rng.choice(["", node_id(1) + "-d1x0000abcd", "x"]), x)
        now = 1.0 + i * 0.01
        if kind == "WANT":
            d.want_received(msg, addr(2), 100, now, WALL)
        elif kind == "HAVE":
            d.have_received(msg, addr(2), 100, now, WALL)
        elif kind == "SINCE":
            d.since_received(msg, addr(2), 100, now, WALL)
        elif kind == "ACK":
            d.ack_received(msg, now)
        elif dst:
            d.direct_received(msg, now)
            d.relayed_direct(msg, b"{}", now, WALL, False)
        else:
            d.broadcast_seen(msg, addr(2), now)
            d.remember(msg, b"{}", now)
        d.tick(now, WALL)
    s = d.stats()
    assert s["gaps"] <= 4096 and s["buffered"] <= 2000 and s["streams"] <= 4096


def test_an_ack_must_name_the_whole_unguessable_mid():
    w = World()
    w.down.add(2)
    mid = w.direct(1, 2)
    guessed = mid.split("x")[0]  # node id and counter are public; the random tail is not
    forged = Message("f1", WALL, 3, "ACK", label(2), label(1), guessed)
    assert w.d[1].ack_received(forged, w.now) == [] and w.d[1].counters["dropped_ack_id"] == 1
    assert not w.of(1, Delivered)


def test_a_burst_lost_together_is_asked_for_in_a_few_wants():
    w = World(3)
    mids = [w.broadcast(1, "b%d" % k, to=[3] if 3 <= k < 18 else None) for k in range(20)]  # 2 misses 15
    w.advance(10.0)
    assert sorted(mid for mid, _ in w.shown[2]) == sorted(mids)
    assert sum(late for _, late in w.shown[2]) == 15
    assert w.d[2].counters["wants_sent"] <= 3, w.d[2].counters


def test_summaries_settle_when_there_are_more_origins_than_a_summary_holds():
    w = World(4)
    msgs = []
    for k in range(2 * HAVE_ORIGINS):  # more origins than a summary holds, heard in four orders
        mid, _ = Delivery(DeliveryConfig(label(10 + k), "%016x" % (0xabc100 + k))).next_broadcast_mid()
        msgs.append(Message(mid, WALL, 8, "CHAT", label(10 + k), "", "x"))
    rng = random.Random(7)
    for i in range(1, 5):
        order = msgs[:]
        rng.shuffle(order)
        for msg in order:
            w.d[i].broadcast_seen(msg, addr(5), w.now)
            w.d[i].remember(msg, encode(msg), w.now)
    w.advance(300.0)
    before = sum(w.d[i].counters["haves_sent"] for i in range(1, 5))
    w.advance(300.0)
    assert sum(w.d[i].counters["haves_sent"] for i in range(1, 5)) == before  # idle: quiet


def test_a_node_that_gave_up_on_a_seq_stops_summarising_after_a_few_rounds():
    w = World(2)
    w.cut.add((1, 2))
    w.broadcast(1, "lost for good")  # nobody can repair it: node 1 forgets it, node 2 never had it
    w.cut.clear()
    w.d[1]._buffer.clear()
    w.broadcast(1, "seen")
    w.advance(30.0)
    assert w.d[2].counters["gaps_given_up"] == 1
    w.advance(600.0)  # the lost seq is forgotten after 5 minutes: the summary changes once more
    before = w.d[2].counters["haves_sent"]
    w.advance(600.0)
    assert w.d[2].counters["haves_sent"] == before


def test_a_message_being_retried_goes_at_once_when_its_destination_comes_back_up():
    w = World()
    w.down.add(2)
    mid = w.direct(1, 2)
    w.advance(1.5)  # the first retry has gone, the next is seconds away
    d = w.d[1]
    tries = d.counters["retries"]
    w.down.discard(2)
    d.neighbour_up(addr(2), label(2), w.now, WALL)
    w.advance(0.1)
    assert d.counters["retries"] == tries + 1  # not after its backoff: at the next tick
    w.advance(1.0)
    assert [e.mid for e in w.of(1, Delivered)] == [mid]
