"""The flooding core, driven with plain values through an in-memory mesh."""

import json

import pytest

from meshchat.relay import (COUNTERS, MAX_SEND_BYTES, PONG_INTERVAL_S, Display, Notice, Pong, Relay,
                            RelayConfig, Send, split_body)
from meshchat.wire import Message, decode, encode

from meshsim import SimMesh, addr_of, full, label_of, line

WALL = 1_000_000.0


def relay(label="10.0.0.1:9000", peers=(addr_of(2), addr_of(3), addr_of(4)), **cfg):
    ids = iter(range(10**6))
    return Relay(RelayConfig(label=label, **cfg), peers, new_mid=lambda: "own%d" % next(ids))


def datagram(mid="x1", ttl=8, src="10.0.0.9:9000", dst="", body="hi", kind="CHAT", ts=WALL, **extra):
    return encode(Message(mid, ts, ttl, kind, src, dst, body, extra))


def check_accounting(r: Relay):
    s = r.stats()
    assert s["handled"] + sum(v for k, v in s.items() if k.startswith("dropped_")) == s["received"]


def test_floods_to_every_peer_but_the_sender():
    r = relay()
    actions = r.datagram_received(datagram(), addr_of(2), 0.0, WALL)
    assert isinstance(actions[0], Display) and actions[0].message.body == "hi"
    send = actions[1]
    assert isinstance(send, Send) and send.addrs == (addr_of(3), addr_of(4))
    assert json.loads(send.data)["ttl"] == 7


def test_does_not_send_back_to_the_origin():
    r = relay()
    actions = r.datagram_received(datagram(src=label_of(3)), addr_of(2), 0.0, WALL)
    assert actions[-1].addrs == (addr_of(4),)


def test_a_peer_added_later_gets_the_next_copies():
    r = relay()
    r.datagram_received(datagram(mid="a"), addr_of(2), 0.0, WALL)
    r.add_peer(addr_of(5))
    actions = r.datagram_received(datagram(mid="b"), addr_of(2), 0.0, WALL)
    assert actions[-1].addrs == (addr_of(3), addr_of(4), addr_of(5))


def test_a_ping_to_one_node_with_no_answer_is_reported_once():
    r = relay()
    r.originate("PING", "", "10.0.0.7:9000", 0.0, WALL)
    _, [answered] = r.originate("PING", "", label_of(2), 0.0, WALL)
    r.originate("PING", "", "", 0.0, WALL)  # a roll call: no one in particular is late
    pong = datagram(mid="p1", kind="PONG", src=label_of(2), dst=r.label, body=json.loads(answered.data)["mid"])
    assert [type(a) for a in r.datagram_received(pong, addr_of(2), 0.1, WALL)] == [Pong]
    assert r.expire(5.0) == []
    assert r.expire(10.0) == [Notice("no answer from 10.0.0.7:9000 to our ping within 10 s")]
    assert r.expire(20.0) == []


def test_duplicate_is_dropped_and_counted():
    r = relay()
    r.datagram_received(datagram(), addr_of(2), 0.0, WALL)
    assert r.datagram_received(datagram(), addr_of(3), 0.0, WALL) == []
    # Same id in another layout, which the quick peek cannot see: still a duplicate.
    other = json.dumps({"ts": WALL, "mid": "x1", "ttl": 5, "kind": "CHAT", "src": "10.0.0.9:9000",
                        "dst": "", "body": "hi"}).encode()
    assert r.datagram_received(other, addr_of(4), 0.0, WALL) == []
    assert r.stats()["dropped_duplicate"] == 2
    check_accounting(r)


def test_expired_id_is_handled_again():
    r = relay(seen_ttl_s=10, max_skew_s=5)
    r.datagram_received(datagram(), addr_of(2), 0.0, WALL)
    r.expire(20.0)
    assert r.datagram_received(datagram(), addr_of(2), 20.0, WALL)[0].message.mid == "x1"


def test_unknown_fields_are_relayed_unchanged():
    r = relay()
    actions = r.datagram_received(datagram(sig="abc", v=2), addr_of(2), 0.0, WALL)
    out = json.loads(actions[-1].data)
    assert out["sig"] == "abc" and out["v"] == 2 and out["ttl"] == 7


def test_ttl_one_is_shown_but_not_relayed():
    r = relay()
    actions = r.datagram_received(datagram(ttl=1), addr_of(2), 0.0, WALL)
    assert [type(a) for a in actions] == [Display]


@pytest.mark.parametrize("ttl", [0, -3])
def test_ttl_zero_or_less_is_dropped(ttl):
    r = relay()
    assert r.datagram_received(datagram(ttl=ttl), addr_of(2), 0.0, WALL) == []
    assert r.stats()["dropped_ttl"] == 1


def test_ttl_above_the_maximum_is_lowered():
    r = relay(max_ttl=16)
    actions = r.datagram_received(datagram(ttl=10**6), addr_of(2), 0.0, WALL)
    assert json.loads(actions[-1].data)["ttl"] == 15


def test_addressed_message_is_relayed_unseen_and_shown_only_at_its_target():
    mesh = SimMesh(3, line(3))
    mesh.originate(1, "psst", dst=label_of(3))
    mesh.run()
    assert mesh.bodies(2) == [] and mesh.bodies(3) == ["psst"]
    assert mesh.relays[2].stats()["relayed"] == 1
    assert mesh.relays[3].stats()["relayed"] == 0, "it has arrived"


@pytest.mark.parametrize("ttl", [1, 2, 4])
def test_ttl_n_reaches_exactly_n_hops(ttl):
    mesh = SimMesh(6, line(6), ttl=ttl)
    mesh.originate(1, "far")
    mesh.run()
    reached = [i for i in range(2, 7) if mesh.bodies(i) == ["far"]]
    assert reached == list(range(2, 2 + ttl))


def test_a_later_copy_with_hops_left_goes_on_when_the_first_came_with_none():
    # The first copy raced round a long path and arrived with ttl 1; the copy by the
    # short path still has hops left and must carry the message on (shown once only).
    r = relay()
    first = r.datagram_received(datagram(ttl=1), addr_of(2), 0.0, WALL)
    assert [type(a) for a in first] == [Display]
    late = r.datagram_received(datagram(ttl=4), addr_of(3), 0.001, WALL)
    assert [type(a) for a in late] == [Send], "relayed, not shown again"
    assert late[0].addrs == (addr_of(2), addr_of(4)) and json.loads(late[0].data)["ttl"] == 3
    assert r.datagram_received(datagram(ttl=6), addr_of(4), 0.002, WALL) == [], "only once"
    s = r.stats()
    assert (s["relayed"], s["relayed_late"], s["dropped_duplicate"], s["displayed"]) == (1, 1, 1, 1)
    check_accounting(r)


def test_a_later_copy_addressed_to_us_is_not_relayed_late():
    r = relay()
    r.datagram_received(datagram(ttl=1, dst="10.0.0.5:9000"), addr_of(2), 0.0, WALL)
    assert r.datagram_received(datagram(ttl=6, dst=r.label), addr_of(3), 0.0, WALL) == []
    assert r.stats()["dropped_duplicate"] == 1 and r.stats()["relayed_late"] == 0
    check_accounting(r)


def test_a_later_copy_with_no_hops_left_is_a_duplicate():
    r = relay()
    r.datagram_received(datagram(ttl=1), addr_of(2), 0.0, WALL)
    assert r.datagram_received(datagram(ttl=1), addr_of(3), 0.0, WALL) == []
    assert r.stats()["dropped_duplicate"] == 1
    r.expire(100.0)  # long after: the better copy is no longer waited for
    assert r.datagram_received(datagram(ttl=5), addr_of(3), 100.0, WALL) == []
    assert r.stats()["dropped_duplicate"] == 2 and r.stats()["relayed_late"] == 0


def test_only_the_first_better_copy_is_relayed_late():
    r = relay()
    r.datagram_received(datagram(ttl=1), addr_of(2), 0.0, WALL)
    assert r.datagram_received(datagram(ttl=1), addr_of(4), 0.0, WALL) == [], "no more hops than before"
    late = r.datagram_received(datagram(ttl=4), addr_of(3), 0.0, WALL)
    assert [json.loads(a.data)["ttl"] for a in late] == [3]
    assert r.datagram_received(datagram(ttl=8), addr_of(4), 0.0, WALL) == [], "3 more hops were enough"
    s = r.stats()
    assert (s["relayed_late"], s["dropped_duplicate"]) == (1, 2)
    check_accounting(r)


def test_a_copy_that_was_relayed_with_hops_to_spare_is_not_relayed_again():
    r = relay()
    r.datagram_received(datagram(ttl=2), addr_of(2), 0.0, WALL)
    assert r.datagram_received(datagram(ttl=8), addr_of(3), 0.0, WALL) == []
    assert r.stats()["relayed"] == 1 and r.stats()["dropped_duplicate"] == 1


def test_full_mesh_shows_each_message_exactly_once_everywhere():
    mesh = SimMesh(5, full(5))
    for i in range(1, 6):
        mesh.originate(i, f"from {i}")
    mesh.run()
    for i in range(1, 6):
        assert sorted(mesh.bodies(i)) == sorted(f"from {j}" for j in range(1, 6) if j != i)
        check_accounting(mesh.relays[i])


def test_own_message_coming_back_is_neither_shown_nor_relayed():
    r = relay()
    _, [send] = r.originate("CHAT", "echo?", "", 0.0, WALL)
    echo = json.loads(send.data)
    echo["ttl"] = 5  # as a plain-flooding node would send it back
    assert r.datagram_received(json.dumps(echo).encode(), addr_of(2), 0.0, WALL) == []
    assert r.stats()["dropped_duplicate"] == 1


def test_addressed_ping_gets_a_pong_with_round_trip_time():
    mesh = SimMesh(3, line(3))
    [ping] = mesh.originate(1, "", dst=label_of(3), kind="PING")
    mesh.now += 0.25
    mesh.run()
    [pong] = mesh.pongs[1]
    assert pong.src == label_of(3) and pong.mid == ping.mid
    assert pong.rtt_ms == pytest.approx(250.0)
    assert all(mesh.bodies(i) == [] for i in (1, 2, 3)), "pings are not chat lines"


def test_broadcast_ping_is_a_roll_call():
    mesh = SimMesh(4, line(4))
    mesh.originate(1, "", kind="PING")
    mesh.run()
    assert sorted(p.src for p in mesh.pongs[1]) == [label_of(2), label_of(3), label_of(4)]


def test_broadcast_ping_is_answered_once_per_origin_per_interval():
    mesh = SimMesh(2, line(2))
    for _ in range(3):
        mesh.originate(1, "", kind="PING")
    mesh.run()
    assert len(mesh.pongs[1]) == 1
    mesh.now += PONG_INTERVAL_S
    mesh.relays[2].expire(mesh.now)
    mesh.originate(1, "", kind="PING")
    mesh.run()
    assert len(mesh.pongs[1]) == 2


def test_unknown_kind_is_relayed_but_not_shown():
    r = relay()
    actions = r.datagram_received(datagram(kind="FILE"), addr_of(2), 0.0, WALL)
    assert [type(a) for a in actions] == [Send]


def test_malformed_datagram_is_dropped_and_counted():
    r = relay()
    for junk in (b"", b"\xff", b"{", b"[]", b'{"mid":"a"}', datagram(ttl="8")):
        assert r.datagram_received(junk, addr_of(2), 0.0, WALL) == []
    assert r.stats()["dropped_malformed"] == 6
    check_accounting(r)


def test_oversize_datagram_is_dropped_before_decoding():
    r = relay(max_datagram=100)
    assert r.datagram_received(datagram(body="x" * 200), addr_of(2), 0.0, WALL) == []
    assert r.stats()["dropped_oversize"] == 1


def test_stale_message_is_dropped_and_the_user_told_once_per_source():
    r = relay(max_skew_s=60)
    first = r.datagram_received(datagram(mid="a", ts=WALL - 61), addr_of(2), 0.0, WALL)
    second = r.datagram_received(datagram(mid="b", ts=WALL - 90), addr_of(2), 0.0, WALL)
    ahead = r.datagram_received(datagram(mid="c", ts=WALL + 61, src="10.0.0.8:1"), addr_of(2), 0.0, WALL)
    assert isinstance(first[0], Notice) and "behind" in first[0].text
    assert second == []
    assert "ahead" in ahead[0].text
    assert r.stats()["dropped_stale"] == 3


def test_rate_limit_drops_the_excess_of_one_neighbour_only():
    r = relay(rate_limit=10)
    for i in range(25):
        r.datagram_received(datagram(mid=f"a{i}"), addr_of(2), 0.0, WALL)
    assert r.stats()["dropped_rate"] == 5  # a new bucket holds a burst of 20
    assert r.datagram_received(datagram(mid="b"), addr_of(3), 0.0, WALL), "others still flow"
    assert r.datagram_received(datagram(mid="a-late"), addr_of(2), 0.5, WALL), "refilled"
    check_accounting(r)


def test_rate_limit_zero_is_off():
    r = relay(rate_limit=0)
    for i in range(1000):
        r.datagram_received(datagram(mid=f"a{i}"), addr_of(2), 0.0, WALL)
    assert r.stats()["dropped_rate"] == 0


def test_peers_only_drops_strangers():
    r = relay(peers_only=True)
    assert r.datagram_received(datagram(), ("10.9.9.9", 1), 0.0, WALL) == []
    assert r.datagram_received(datagram(), addr_of(2), 0.0, WALL)
    assert r.stats()["dropped_not_peer"] == 1


def test_strangers_are_accepted_and_relayed_by_default():
    r = relay()
    actions = r.datagram_received(datagram(), ("10.9.9.9", 1), 0.0, WALL)
    assert actions[-1].addrs == (addr_of(2), addr_of(3), addr_of(4))


def test_peer_table_lists_peers_and_strangers():
    r = relay()
    r.datagram_received(datagram(), ("10.9.9.9", 1), 5.0, WALL)
    r.datagram_received(datagram(mid="y"), addr_of(3), 6.0, WALL)
    rows = r.peer_table(now=10.0)
    assert ("10.0.0.2:9000", True, None) in rows
    assert ("10.0.0.3:9000", True, 4.0) in rows
    assert ("10.9.9.9:1", False, 5.0) in rows


def test_long_line_is_split_into_datagrams_that_fit():
    r = relay()
    body = "é" * 700 + "x" * 2000 + "\U0001d11e" * 100
    messages, sends = r.originate("CHAT", body, "", 0.0, WALL)
    assert len(messages) > 1 and "".join(m.body for m in messages) == body
    assert len({m.mid for m in messages}) == len(messages)
    for send in sends:
        assert len(send.data) <= MAX_SEND_BYTES
        decode(send.data)


def test_split_body_never_cuts_a_character():
    pieces = split_body("a\U0001d11eb", room=12)
    assert pieces == ["a", "\U0001d11e", "b"]


def test_originate_records_own_id_and_sends_to_every_peer():
    r = relay()
    [msg], [send] = r.originate("CHAT", "hello", "", 0.0, WALL)
    assert msg.mid in r.seen and msg.ttl == 8 and msg.src == "10.0.0.1:9000"
    assert send.addrs == (addr_of(2), addr_of(3), addr_of(4))


def test_counter_names_are_stable():
    assert set(relay().stats()) == set(COUNTERS) | {"seen_size"}


def test_pong_replies_are_rate_limited_per_asker():
    r = relay(rate_limit=5)
    pongs = 0
    for i in range(30):
        # Each PING comes from another neighbour address, so only the reply limit applies.
        actions = r.datagram_received(datagram(mid=f"p{i}", kind="PING", dst=r.label), ("10.1.0.%d" % i, 1),
                                      0.0, WALL)
        pongs += sum(1 for a in actions if isinstance(a, Send))
    assert pongs == 10  # a burst of twice the rate


def test_tables_fed_by_strangers_stay_bounded():
    from meshchat.relay import MAX_TRACKED
    r = relay(rate_limit=1)
    for i in range(MAX_TRACKED + 500):
        r.datagram_received(b"x", ("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 1), 0.0, WALL)
    assert len(r.heard) <= MAX_TRACKED and len(r._buckets) <= MAX_TRACKED + 1


def test_relayed_copy_keeps_every_other_byte_as_it_came():
    r = relay()
    data = (b'{"mid":"k1","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi",'
            b'"x":1.10,"y":"\\u00e9"}' % WALL)
    out = r.datagram_received(data, addr_of(2), 0.0, WALL)[-1].data
    assert out == data.replace(b'"ttl":5', b'"ttl":4')


@pytest.mark.parametrize("data", [
    # A second "ttl" key: JSON takes the last one, so the copy must too.
    b'{"mid":"k2","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi","ttl":3}' % WALL,
    b'{"mid":"k3","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi","ttl":5}' % WALL,
    # A nested "ttl" in an unknown field is not the message's.
    b'{"mid":"k4","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi","x":{"ttl":9}}' % WALL,
    # A second "ttl" key written with escapes, or with a space before its colon, equal to the first:
    # rewriting only the first would leave the copy with ttl 5 for ever.
    b'{"mid":"k5","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi","\\u0074tl":5}' % WALL,
    b'{"mid":"k6","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi",'
    b'"\\u0074\\u0074\\u006Cx":1,"tt\\u006c":5}' % WALL,
    b'{"mid":"k7","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi","ttl" :5}' % WALL,
    # Leading whitespace: no head to rewrite.
    b' {"mid":"k8","ts":%r,"ttl":5,"kind":"CHAT","src":"10.0.0.9:9000","dst":"","body":"hi"}' % WALL,
])
def test_relayed_copy_is_encoded_anew_when_rewriting_in_place_could_be_wrong(data):
    r = relay()
    expected = json.loads(data)["ttl"] - 1
    out = r.datagram_received(data, addr_of(2), 0.0, WALL)[-1].data
    assert out.count(b'"ttl":%d' % expected) == 1 and json.loads(out)["ttl"] == expected
    assert decode(out).ttl == expected
    check_accounting(r)
