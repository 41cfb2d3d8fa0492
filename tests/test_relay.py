"""The flooding core, driven with plain values through an in-memory mesh."""

import json

import pytest

from meshchat.relay import (COUNTERS, MAX_SEND_BYTES, MAX_TRACKED, PING_TIMEOUT_S, PONG_ANSWER_PER_S,
                            PONG_FLOOD_PER_S, PONG_INTERVAL_S, SEEN_FULL_NOTICE_S, Display, Notice, Pong, Relay,
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


def test_an_expired_id_dated_later_is_handled_again_but_the_same_copy_is_refused():
    r = relay(seen_ttl_s=10, max_skew_s=5)
    r.datagram_received(datagram(), addr_of(2), 0.0, WALL)
    r.expire(20.0)
    # The clock check alone lets this through (the wall clock stood still): the horizon does not.
    assert r.datagram_received(datagram(), addr_of(2), 20.0, WALL) == []
    assert r.stats()["dropped_replay"] == 1
    assert r.datagram_received(datagram(ts=WALL + 20), addr_of(2), 20.0, WALL + 20)[0].message.mid == "x1"
    check_accounting(r)


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


def test_pong_answers_have_a_total_budget_whatever_the_askers_claim():
    r = relay(rate_limit=0)
    pongs = 0
    for i in range(100):
        # Fresh forged origins from fresh addresses: no per-asker or per-origin limit applies.
        actions = r.datagram_received(datagram(mid=f"p{i}", kind="PING", src="10.2.0.%d:1" % i, dst=r.label),
                                      ("10.1.0.%d" % i, 1), 0.0, WALL)
        pongs += sum(1 for a in actions if isinstance(a, Send))
    assert pongs == 2 * PONG_ANSWER_PER_S and r.stats()["pongs_unanswered"] == 100 - pongs
    actions = r.datagram_received(datagram(mid="later", kind="PING", dst=r.label), addr_of(2), 1.0, WALL)
    assert [type(a) for a in actions] == [Send], "the budget refills"
    check_accounting(r)


def test_tables_fed_by_strangers_stay_bounded():
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


def test_the_parts_of_a_split_line_say_which_of_how_many_they_are():
    from meshchat.console import part_of
    r = relay()
    body = "\x01" * 700 + "é" * 1500 + "\U0001d11e" * 300  # escapes take up to 12 bytes a character
    messages, sends = r.originate("CHAT", body, "", 0.0, WALL)
    n = len(messages)
    assert n > 2 and [m.extra["part"] for m in messages] == [[i, n] for i in range(1, n + 1)]
    for m, send in zip(messages, sends):
        assert len(send.data) <= MAX_SEND_BYTES
        got = decode(send.data)
        assert got.extra == {"part": m.extra["part"]} and part_of(got) == tuple(m.extra["part"])
    [single], _ = r.originate("CHAT", "short", "", 0.0, WALL)
    assert single.extra == {} and b"part" not in encode(single)


def test_a_line_of_the_largest_size_typed_fits_the_part_bound():
    from meshchat.commands import MAX_LINE_BYTES
    from meshchat.relay import MAX_PARTS
    r = relay()
    messages, _ = r.originate("CHAT", "\x01" * MAX_LINE_BYTES, "", 0.0, WALL)  # 6 bytes on the wire each
    assert len(messages) <= MAX_PARTS and messages[-1].extra["part"] == [len(messages)] * 2


def test_parts_cross_a_relay_with_their_marks_and_a_seed_reader_sees_plain_text():
    sender, middle = relay(), relay(label="10.0.0.2:9000", peers=(addr_of(1), addr_of(3)))
    messages, sends = sender.originate("CHAT", "y" * 3000, "", 0.0, WALL)
    shown = []
    for send in sends:
        actions = middle.datagram_received(send.data, addr_of(1), 0.0, WALL)
        shown += [a.message for a in actions if isinstance(a, Display)]
        relayed = [a for a in actions if isinstance(a, Send)][0]
        seed_view = json.loads(relayed.data)  # what a seed node reads: its seven fields, and one it ignores
        assert seed_view["kind"] == "CHAT" and set(seed_view) - {"part"} == {
            "mid", "ts", "ttl", "kind", "src", "dst", "body"}
    assert [m.extra["part"] for m in shown] == [m.extra["part"] for m in messages]
    assert "".join(m.body for m in shown) == "y" * 3000


def test_a_node_that_displays_nothing_counts_nothing_as_displayed():
    r = relay(display=False)
    actions = r.datagram_received(datagram(mid="a"), addr_of(2), 0.0, WALL)
    assert not any(isinstance(a, Display) for a in actions) and any(isinstance(a, Send) for a in actions)
    r.datagram_received(datagram(mid="b", dst="10.0.0.1:9000"), addr_of(2), 0.0, WALL)
    s = r.stats()
    assert s["displayed"] == 0 and s["relayed"] == 1 and s["consumed"] == 1 and s["handled"] == 2
    check_accounting(r)


# -- replies cannot be multiplied by forged origins ------------------------------------------------


def test_a_pong_goes_back_only_to_the_neighbour_the_ping_came_from():
    r = relay()
    actions = r.datagram_received(datagram(mid="p", kind="PING", src="10.66.0.1:9000"), addr_of(3), 0.0, WALL)
    [answer, relayed] = actions
    assert answer.addrs == (addr_of(3),) and relayed.addrs == (addr_of(2), addr_of(4))
    pong = json.loads(answer.data)
    assert (pong["kind"], pong["dst"], pong["body"], pong["src"]) == ("PONG", "10.66.0.1:9000", "p", r.label)


def test_relays_send_a_pong_on_along_the_path_its_ping_came():
    mesh = SimMesh(5, line(5))
    [ping] = mesh.originate(1, "", dst=label_of(5), kind="PING")
    mesh.run()
    assert [p.mid for p in mesh.pongs[1]] == [ping.mid]
    # 4 hops out, 4 back: nothing else.
    assert mesh.datagrams == 8 and sum(r.stats()["relayed"] for r in mesh.relays.values()) == 6


def test_a_pong_with_no_known_way_back_is_flooded_within_a_budget_and_counted():
    r = relay(rate_limit=0)
    sent = []
    for i in range(100):
        pong = datagram(mid=f"q{i}", kind="PONG", src="10.66.0.%d:1" % i, dst="10.77.0.1:1", body=f"unknown{i}")
        sent += r.datagram_received(pong, addr_of(2), 0.0, WALL)
    assert len(sent) == 2 * PONG_FLOOD_PER_S and all(s.addrs == (addr_of(3), addr_of(4)) for s in sent)
    assert r.stats()["dropped_pong_budget"] == 100 - len(sent)
    check_accounting(r)


def test_the_pings_remembered_for_their_pongs_stay_bounded_and_expire():
    r = relay(rate_limit=0)
    for i in range(MAX_TRACKED + 100):
        r.datagram_received(datagram(mid=f"f{i}", kind="PING", src="10.66.%d.%d:1" % (i >> 8, i & 255)),
                            ("10.1.%d.%d" % (i >> 8, i & 255), 1), 0.0, WALL)
    assert len(r._ping_from) == MAX_TRACKED and "f0" not in r._ping_from, "the oldest make room"
    r.datagram_received(datagram(mid="new", kind="PING"), addr_of(2), 1.0, WALL)
    back = r.datagram_received(datagram(mid="pong", kind="PONG", dst="10.0.0.9:9000", body="new"),
                               addr_of(3), 1.0, WALL)
    assert [s.addrs for s in back] == [(addr_of(2),)], "the newest PING still finds its way back"
    r.expire(1.1 + PING_TIMEOUT_S)
    assert len(r._ping_from) == 0


def flood_cost(kind: str) -> int:
    """Datagrams a full mesh of 8 sends for 10 broadcasts of ``kind`` with fresh forged origins."""
    mesh = SimMesh(8, full(8))
    for i in range(10):
        mesh.inject(1 + i % 8, datagram(mid=f"{kind}{i}", kind=kind, src="10.66.0.%d:9000" % i, body=""),
                    from_addr=("10.66.0.%d" % i, 9000))
        mesh.run()
    for r in mesh.relays.values():
        check_accounting(r)
    return mesh.datagrams


def test_forged_broadcast_pings_cost_a_full_mesh_at_most_three_times_what_chats_cost():
    chats, pings = flood_cost("CHAT"), flood_cost("PING")
    assert chats == 10 * 7 * 7  # 7 copies from the first node, 6 from each of the others
    assert pings <= 3 * chats, (pings, chats)


def test_roll_call_and_addressed_ping_keep_their_round_trip_times_in_a_full_mesh():
    mesh = SimMesh(6, full(6))
    [call] = mesh.originate(1, "", kind="PING")
    mesh.now += 0.01
    mesh.run()
    assert sorted(p.src for p in mesh.pongs[1]) == [label_of(i) for i in range(2, 7)]
    assert all(p.mid == call.mid and p.rtt_ms == pytest.approx(10.0) for p in mesh.pongs[1])
    [one] = mesh.originate(1, "", dst=label_of(4), kind="PING")
    mesh.run()
    assert mesh.pongs[1][-1].src == label_of(4) and mesh.pongs[1][-1].mid == one.mid


# -- admission has a total --------------------------------------------------------------------------


def stranger(i: int):
    return ("10.%d.%d.%d" % (100 + (i >> 16), (i >> 8) & 255, i & 255), 40000)


def test_a_configured_peer_gets_through_while_5000_stranger_addresses_flood():
    r = relay(rate_limit=200)
    shown = 0
    for step in range(100):  # one second of a flood, in steps of 10 ms
        now = step * 0.01
        for k in range(100):
            i = (step * 100 + k) % 5000
            r.datagram_received(datagram(mid=f"s{step}-{k}", src="10.66.0.1:1"), stranger(i), now, WALL)
        if step < 50:
            continue  # the peer's first datagram comes after the strangers have filled the bucket table
        for j in range(6):
            actions = r.datagram_received(datagram(mid=f"peer{step}-{j}", src=label_of(2)), addr_of(2), now, WALL)
            shown += sum(1 for a in actions if isinstance(a, Display))
    s = r.stats()
    assert shown == 300, "every message of the configured peer"
    # Strangers got at most the total's burst and a second's refill (2 s + 1 s of 2,000/s).
    strangers_in = s["handled"] - 300
    assert strangers_in <= 3 * 2000 and s["dropped_rate_total"] > 0
    assert len(r._buckets) <= MAX_TRACKED + 1
    check_accounting(r)


def test_strangers_together_are_held_to_the_total_and_each_to_its_own_bucket():
    r = relay(rate_limit=10, rate_limit_total=50)
    for i in range(200):  # 200 strangers, one datagram each: only the total refuses
        r.datagram_received(datagram(mid=f"a{i}"), stranger(i), 0.0, WALL)
    assert r.stats()["dropped_rate_total"] == 100 and r.stats()["dropped_rate"] == 0
    for i in range(30):  # one stranger, a second later: its own bucket holds 20
        r.datagram_received(datagram(mid=f"b{i}"), stranger(999), 1.0, WALL)
    assert r.stats()["dropped_rate"] == 10 and r.stats()["dropped_rate_total"] == 100
    check_accounting(r)


def test_a_peer_is_never_refused_by_the_total_but_leaves_strangers_less():
    r = relay(rate_limit=1000, rate_limit_total=100)
    for i in range(500):
        assert r.datagram_received(datagram(mid=f"p{i}"), addr_of(2), 0.0, WALL)
    assert r.datagram_received(datagram(mid="s"), stranger(1), 0.0, WALL) == []
    assert r.stats()["dropped_rate_total"] == 1


def test_rate_limit_total_zero_is_no_total():
    r = relay(rate_limit=10, rate_limit_total=0)
    for i in range(1000):
        r.datagram_received(datagram(mid=f"a{i}"), stranger(i), 0.0, WALL)
    assert r.stats()["dropped_rate_total"] == 0 and r.stats()["handled"] == 1000


# -- replay protection that holds -----------------------------------------------------------------


def test_a_message_replayed_after_eviction_is_refused_and_shown_once():
    r = relay(seen_max=100, rate_limit=0)
    first = r.datagram_received(datagram(mid="victim", body="once"), addr_of(2), 0.0, WALL)
    assert [type(a) for a in first] == [Display, Send]
    for i in range(150):  # fresh ids, all younger than --max-skew: the victim is evicted
        r.datagram_received(datagram(mid=f"fill{i}", ts=WALL + i * 0.001), addr_of(3), i * 0.001, WALL)
    assert "victim" not in r.seen
    replayed = r.datagram_received(datagram(mid="victim", body="once"), addr_of(4), 0.2, WALL + 0.2)
    assert replayed == [] and r.stats()["dropped_replay"] == 1 and r.stats()["displayed"] == 151
    fresh = r.datagram_received(datagram(mid="new", ts=WALL + 0.2), addr_of(2), 0.2, WALL + 0.2)
    assert isinstance(fresh[0], Display), "traffic dated now still flows"
    check_accounting(r)


def test_a_replay_at_the_edge_of_expiry_and_stamp_sharing_is_refused():
    # Defaults: --seen-ttl 120, --max-skew 60. The id is recorded 0.49 s after its batch's stamp,
    # so it expires 0.49 s early, and it was dated 60 s ahead: the clock check alone lets the
    # replay through at 120 s (it is 59.51 s off). The horizon does not.
    r = relay(rate_limit=0)
    r.datagram_received(datagram(mid="first"), addr_of(2), 0.0, WALL)
    ahead = WALL + 0.49 + 60.0
    assert r.datagram_received(datagram(mid="edge", ts=ahead), addr_of(2), 0.49, WALL + 0.49)[0].message.mid == "edge"
    r.expire(120.0)
    assert "edge" not in r.seen
    assert r.datagram_received(datagram(mid="edge", ts=ahead), addr_of(3), 120.0, WALL + 120.0) == []
    assert r.stats()["dropped_replay"] == 1 and r.stats()["displayed"] == 2
    # Normal traffic after the expiry is not refused, even from a clock 59 s behind ours.
    for mid, ts in (("now", WALL + 120.0), ("behind", WALL + 61.0)):
        assert r.datagram_received(datagram(mid=mid, ts=ts), addr_of(2), 120.0, WALL + 120.0)[0].message.mid == mid


def test_the_user_is_told_once_a_minute_that_young_ids_are_being_forgotten():
    r = relay(seen_max=100, rate_limit=0)
    assert r.expire(0.0) == []
    for i in range(300):
        r.datagram_received(datagram(mid=f"f{i}"), addr_of(2), 0.0, WALL)
    [notice] = r.expire(1.0)
    assert "flood" in notice.text and "--seen-max 100" in notice.text
    for i in range(300):
        r.datagram_received(datagram(mid=f"g{i}", ts=WALL + 2), addr_of(2), 2.0, WALL + 2)
    assert r.expire(2.0) == [], "not again within a minute"
    [again] = r.expire(1.0 + SEEN_FULL_NOTICE_S)
    assert "flood" in again.text
    assert r.expire(2.0 + SEEN_FULL_NOTICE_S) == [], "nothing forgotten young since"


    check_accounting(r)
