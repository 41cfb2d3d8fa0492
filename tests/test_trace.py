"""Observability: /why's records, /peers' per-neighbour counters, and /trace's TRACE and HOP kinds."""

import io
import json
import random
import time

from meshchat.console import JsonConsole, TerminalConsole, peer_lines, trace_lines, why_lines
from meshchat.commands import Bad, TraceRoute, Why, parse_line
from meshchat.delivery import Delivered, Undelivered
from meshchat.membership import MembershipConfig, PeerDown, PeerUp
from meshchat.node import History
from meshchat.relay import Send
from meshchat.trace import DROP_REASONS, MAX_DUPS_KEPT, MAX_LINKS, Trace
from meshchat.traceroute import ANSWERS_PER_S, MAX_PATHS, TraceHop, TraceResult
from meshchat.wire import Message, decode, encode

from meshsim import MemberMesh, SimMesh, addr_of, label_of, line
from nodes import Cluster, Probe

WALL = 1_000_000.0


def settled(n, edges):
    """A mesh with membership whose neighbours are all up and whose routes are known."""
    net = MemberMesh(n, edges)
    net.advance(5.0)
    return net


def why_of(net, i, mid):
    t = net.relays[i].trace
    found, error = t.find(mid)
    assert found is not None, error
    return t.why(found, net.now)


# -- /why ---------------------------------------------------------------------------------------


def test_why_names_both_neighbours_a_message_came_through_and_which_copy_was_first():
    # 1 reaches 4 through 2 and through 3; the copy through 2 is delivered first.
    net = settled(4, [(1, 2), (1, 3), (2, 4), (3, 4)])
    [msg] = net.originate(1, "two ways")
    net.run()
    rec = why_of(net, 4, msg.mid[:10])
    assert rec["first_from"] == label_of(2) and rec["hops"] == 2
    assert [d["from"] for d in rec["duplicates"]] == [label_of(3)] and rec["duplicates_total"] == 1
    assert rec["shown"] and not rec["own"]
    text = "\n".join(why_lines(rec))
    assert f"first copy from {label_of(2)}" in text and f"duplicates: 1: {label_of(3)} +0 ms" in text


def test_why_on_a_message_we_relayed_lists_where_it_went_and_on_our_own_where_we_sent_it():
    net = settled(4, [(1, 2), (2, 3), (2, 4)])
    [msg] = net.originate(1, "pass it on")
    net.run()
    assert sorted(why_of(net, 2, msg.mid)["relayed_to"]) == [label_of(3), label_of(4)]
    assert why_of(net, 3, msg.mid)["relayed_to"] == []  # a leaf: nobody left to send it to
    own = why_of(net, 1, msg.mid)
    assert own["own"] and own["relayed_to"] == [label_of(2)] and own["first_from"] is None
    assert f"sent by us to {label_of(2)}" in why_lines(own)
    # /why alone: the last message shown
    t = net.relays[3].trace
    assert t.find("")[0] == msg.mid


def test_why_on_a_message_dropped_as_stale_says_so():
    net = SimMesh(3, line(3))
    old = Message("stale1", WALL - 3600, 5, "CHAT", label_of(1), "", "from the past", {"ttl0": 8})
    net.inject(2, encode(old), from_addr=addr_of(1))
    rec = why_of(net, 2, "stale")
    assert rec["dropped"] == "stale" and not rec["shown"] and rec["relayed_to"] == [] and rec["hops"] == 4
    assert any(line.startswith("dropped: stale: its time is too far") for line in why_lines(rec))
    assert net.relays[2].trace.links[addr_of(1)].drops == {"stale": 1}


def test_why_finds_a_unique_prefix_only():
    net = SimMesh(2, line(2), ttl=3)
    for body in ("a", "b"):
        net.originate(1, body)
    net.run()
    t = net.relays[2].trace
    assert t.find("m1-")[0] is None and "start of 2 message ids" in t.find("m1-")[1]
    assert t.find("nope")[0] is None and "no message 'nope'" in t.find("nope")[1]
    assert t.find("m1-0")[0] == "m1-0"


def test_records_and_duplicates_kept_are_bounded_and_the_oldest_go_first():
    t = Trace(max_records=5)
    for i in range(12):
        t.first(Message("id%d" % i, WALL, 3, "CHAT", label_of(1), "", ""), addr_of(1), float(i))
    assert list(t.records) == ["id%d" % i for i in range(7, 12)]
    for k in range(3 * MAX_DUPS_KEPT):
        t.duplicate("id11", addr_of(k % 5 + 2), 20.0 + k)
    rec = t.why("id11", 30.0)
    assert len(rec["duplicates"]) == MAX_DUPS_KEPT and rec["duplicates_total"] == 3 * MAX_DUPS_KEPT


def test_tracing_off_keeps_nothing_and_relays_the_same():
    on, off = SimMesh(3, line(3)), SimMesh(3, line(3), trace=False)
    for net in (on, off):
        net.originate(1, "x")
        net.run()
    assert off.relays[2].trace is None and on.relays[2].trace is not None
    assert on.bodies(3) == off.bodies(3) == ["x"] and on.datagrams == off.datagrams


# -- per-neighbour counters ------------------------------------------------------------------------


def test_neighbour_counters_add_up_to_the_node_wide_ones_and_strangers_share_one_row():
    rng = random.Random(5)
    net = settled(3, line(3))
    r = net.relays[2]
    for i in range(300):
        kind = rng.randrange(4)
        sender = rng.choice([addr_of(1), addr_of(3), ("10.8.%d.%d" % (i >> 8, i & 255), 9000)])
        if kind == 0:
            data = b"not json %d" % i
        elif kind == 1:
            data = encode(Message("old%d" % i, WALL - 999, 3, "CHAT", label_of(1), "", "x"))
        else:
            data = encode(Message("d%d" % (i % 40), WALL, 3, "CHAT", label_of(1), "", "x"))
        net._post(2, r.datagram_received(data, sender, net.now, WALL))
    net.run()
    rows = {row["addr"]: row for row in r.trace.neighbour_rows(net.now) + [r.trace.strangers_row(net.now)]}
    assert set(rows) == {label_of(1), label_of(3), "*"}
    assert rows["*"]["label"] == "strangers" and len(r.trace.links) == 2
    s = r.stats()
    assert sum(row["in"] for row in rows.values()) == s["received"]
    assert sum(row["dups"] for row in rows.values()) == s["dropped_duplicate"]
    for reason in DROP_REASONS:
        assert sum(row["drops"].get(reason, 0) for row in rows.values()) == s["dropped_" + reason], reason
    assert rows[label_of(1)]["state"] == "up" and rows[label_of(1)]["rtt_ms"] is not None


def test_sends_are_counted_per_neighbour():
    net = settled(3, line(3))
    r = net.relays[2]
    before = {row["addr"]: row["out"] for row in r.trace.neighbour_rows(net.now)}
    for k in range(5):
        net.originate(1, "m%d" % k)
    net.run()
    after = {row["addr"]: row["out"] for row in r.trace.neighbour_rows(net.now)}
    assert after[label_of(3)] - before[label_of(3)] >= 5  # each relayed on to 3
    assert after[label_of(1)] - before[label_of(1)] < 5  # and none back to where it came from


def test_link_table_is_bounded():
    t = Trace()
    for i in range(MAX_LINKS + 50):
        t.link_in(("10.1.%d.%d" % (i >> 8, i & 255), 9000), True, 1.0)
    t.link_in(("10.2.0.1", 9000), False, 1.0)
    assert len(t.links) == MAX_LINKS and t.strangers.rx == 51
    t.forget(lambda a: a[0].endswith(".7"), 1000.0, 600.0)
    assert all(a[0].endswith(".7") for a in t.links)


def test_a_neighbour_whose_loss_or_duplicate_share_stands_out_is_flagged():
    rows = []
    for i, (loss, rx, dups) in enumerate([(0.0, 100, 30), (0.02, 100, 35), (0.25, 100, 32), (0.0, 100, 90)]):
        rows.append({"addr": label_of(i + 2), "label": label_of(i + 2), "nick": "", "configured": True,
                     "state": "up", "last_heard_s": 0.5, "rtt_ms": 1.0, "loss": loss})
    t = Trace(links=lambda now: rows)
    for i, (_, rx, dups) in enumerate([(0.0, 100, 30), (0.02, 100, 35), (0.25, 100, 32), (0.0, 100, 90)]):
        link = t.link_in(addr_of(i + 2), True, 1.0)
        link.rx, link.dups = rx, dups
    flags = [r["flags"] for r in t.neighbour_rows(2.0)]
    assert flags == [[], [], ["loss"], ["dups"]]
    text = peer_lines(t.neighbour_rows(2.0))
    assert "!loss" in text[3] and "!dups" in text[4] and "dup share" in text[5]
    out = io.StringIO()
    JsonConsole(out).peers(t.neighbour_rows(2.0))
    event = json.loads(out.getvalue())
    assert event["event"] == "peers" and event["peers"][2]["flags"] == ["loss"]
    # the fields the peers event had before are all still there
    assert set(rows[0]) <= set(event["peers"][0]) and {"in", "out", "dups", "dup_share", "drops"} <= set(
        event["peers"][0])


# -- /trace -------------------------------------------------------------------------------------------


def run_timed(net, step_s=0.001):
    """Deliver what is in flight, each datagram ``step_s`` after the one before (a link's latency)."""
    while net._queue:
        sender, addr, data = net._queue.popleft()
        net.now += step_s
        target = int(addr[0].rsplit(".", 1)[1])
        net.carried.append((sender, target, decode(data).kind))
        net._post(target, net.relays[target].datagram_received(data, addr_of(sender), net.now, net.wall))


def test_trace_through_a_five_node_line_lists_the_hops_in_order_with_growing_times():
    net = settled(5, line(5))
    msg, sends, error = net.relays[1].trace_route(label_of(5), net.now, net.wall)
    assert error == "" and [s.addrs for s in sends] == [(addr_of(2),)]
    net._post(1, sends)
    run_timed(net)
    [result] = [e for e in net.events[1] if isinstance(e, TraceResult)]
    assert result.complete and result.target == label_of(5) and result.mid == msg.mid
    assert [(h.hop, h.label) for h in result.hops] == [(k - 1, label_of(k)) for k in range(2, 6)]
    times = [h.rtt_ms for h in result.hops]
    assert times == sorted(times) and times[0] > 0
    # Only the path carried it: one TRACE and one way back per hop, nothing else.
    carried = [(a, b) for a, b, kind in net.carried if kind in ("TRACE", "HOP")]
    there = [(k, k + 1) for k in range(1, 5)]
    back = [(j, j - 1) for b in range(2, 6) for j in range(b, 1, -1)]  # node b's answer, hop by hop to 1
    assert sorted(carried) == sorted(there + back)
    lines = trace_lines(result)
    assert lines[0] == f"trace to {label_of(5)}: 4 hops" and lines[2].split()[:2] == ["1", label_of(2)]


def test_a_trace_the_target_never_answers_is_reported_with_the_hops_that_did():
    net = settled(3, line(3))
    net.dead.add(3)
    msg, sends, _ = net.relays[1].trace_route(label_of(3), net.now, net.wall)
    net._post(1, sends)
    net.run()
    assert not [e for e in net.events[1] if isinstance(e, TraceResult)]
    [result] = [e for e in net.relays[1].expire(net.now + 6.0) if isinstance(e, TraceResult)]
    assert not result.complete and [h.label for h in result.hops] == [label_of(2)]
    assert "no answer from it" in trace_lines(result)[0]


def trace_datagram(mid, src, dst, ttl=5, ttl0=8, kind="TRACE", body="", **extra):
    return encode(Message(mid, WALL, ttl, kind, src, dst, body, dict({"ttl0": ttl0}, **extra)))


def test_trace_from_a_forged_source_gets_nothing_and_a_hop_with_no_way_back_is_not_flooded():
    net = settled(3, line(3))
    r = net.relays[2]
    stranger = ("10.66.0.1", 9000)
    before = r.stats()
    assert r.datagram_received(trace_datagram("t1", "10.66.0.1:9000", label_of(3)), stranger, net.now, WALL) == []
    hop = trace_datagram("h1", label_of(3), label_of(1), kind="HOP", body="never-sent", hop=1)
    assert r.datagram_received(hop, addr_of(3), net.now, WALL) == []
    after = r.stats()
    assert after["dropped_unproven"] == before["dropped_unproven"] + 1
    assert after["dropped_no_route"] == before["dropped_no_route"] + 1 and after["sent"] == before["sent"]


def test_answers_to_traces_are_held_to_a_budget():
    net = settled(3, line(3))
    r = net.relays[2]
    answers = 0
    for i in range(200):
        for a in r.datagram_received(trace_datagram("t%d" % i, label_of(1), label_of(2)), addr_of(1), net.now, WALL):
            if isinstance(a, Send) and decode(a.data).kind == "HOP":
                answers += 1
                assert len(a.data) <= 200 and a.addrs == (addr_of(1),)  # small, and to the proved neighbour only
    assert answers == 2 * ANSWERS_PER_S  # one burst, then nothing until the bucket refills


def test_a_neighbour_that_never_said_trace_gets_none():
    net = settled(3, line(3))
    n3 = net.relays[2].membership.neighbours[addr_of(3)]
    n3.caps = frozenset(("HELLO",))  # as an older meshchat says
    _, sends, error = net.relays[2].trace_route(label_of(3), net.now, net.wall)
    assert all(addr_of(3) not in s.addrs for s in sends)
    assert net.relays[1].trace_route(label_of(1), net.now, net.wall) == (None, [], "that is this node")
    _, sends, error = net.relays[1].trace_route(label_of(3), net.now, net.wall)
    net._post(1, sends)
    net.run()
    assert not [1 for a, b, kind in net.carried if kind == "TRACE" and b == 3]


def test_way_back_memory_is_bounded():
    from meshchat.traceroute import Traceroute

    tr = Traceroute()
    for i in range(MAX_PATHS + 10):
        tr.came_from("t%d" % i, addr_of(2), 1.0)
    assert tr.way_back("t0") is None and tr.way_back("t%d" % (MAX_PATHS + 9)) == addr_of(2)
    tr.expire(100.0)
    assert tr.way_back("t%d" % (MAX_PATHS + 9)) is None


# -- the console -------------------------------------------------------------------------------------


def test_console_parses_why_and_trace():
    assert parse_line("/why") == Why("")
    assert parse_line("/why 9f1c") == Why("9f1c")
    assert isinstance(parse_line("/why 9f 1c"), Bad)
    assert isinstance(parse_line("/why " + "a" * 65), Bad)
    assert parse_line("/trace alice#ab12") == TraceRoute("alice#ab12")
    assert parse_line("/trace 127.0.0.1:9002") == TraceRoute("127.0.0.1:9002")
    assert isinstance(parse_line("/trace"), Bad)
    assert isinstance(parse_line("/trace 127.0.0.1:99999"), Bad)


def test_why_and_trace_events_in_json_and_for_people():
    net = settled(3, line(3))
    [msg] = net.originate(1, "hi")
    net.run()
    rec = why_of(net, 2, msg.mid)
    result = TraceResult(label_of(3), "t1", (TraceHop(1, label_of(2), 0.5), TraceHop(2, label_of(3), 1.25)), True)
    out, jout = io.StringIO(), io.StringIO()
    for con in (TerminalConsole(out, color=False, interactive=False), JsonConsole(jout)):
        con.why(rec)
        con.show(result)
    events = [json.loads(line) for line in jout.getvalue().splitlines()]
    assert events[0]["event"] == "why" and events[0]["mid"] == msg.mid and events[0]["relayed_to"] == [label_of(3)]
    assert events[1] == {"event": "trace", "target": label_of(3), "mid": "t1", "complete": True,
                         "hops": [{"hop": 1, "label": label_of(2), "rtt_ms": 0.5},
                                  {"hop": 2, "label": label_of(3), "rtt_ms": 1.25}]}
    text = out.getvalue()
    assert f"relayed to {label_of(3)}" in text and "the node stopped" not in text and "1.2 ms" in text


# -- real nodes ------------------------------------------------------------------------------------------

FAST = MembershipConfig(label="", hello_max_s=0.4)
MEMORY = History(enabled=False)


def test_why_on_a_direct_message_we_sent_lists_its_retries_and_its_ack():
    with Cluster(2, [(1, 2)], membership=FAST, history=MEMORY) as c:
        c[1].next(PeerUp)
        c[2].next(PeerUp)
        port, label = c[2].node.addr[1], c[2].label
        c[2].node.stop()
        c[1].next(PeerDown, timeout=10)
        [msg] = c[1].node.say("while you were out", dst=label)
        assert c[1].next(Undelivered).mid == msg.mid
        back = Probe(membership=FAST, history=MEMORY, port=port)
        try:
            back.node.add_peer(c[1].node.addr)
            back.node.start()
            assert c[1].next(Delivered, timeout=10).mid == msg.mid
        finally:
            back.node.stop()
        rec, error = c[1].node.why(msg.mid)
        assert rec is not None, error
        assert rec["own"] and rec["retries"] and rec["retries"][0]["mid"].startswith(msg.mid + "~")
        assert rec["acked"] is not None and rec["acked"]["tries"] >= 2
        text = why_lines(rec)
        assert any(line.startswith("retry ") for line in text) and any("acknowledged after" in x for x in text)


def test_trace_between_real_nodes_and_no_trace_switches_records_off():
    with Cluster(3, [(1, 2), (2, 3)], membership=FAST) as c:
        c[1].next(PeerUp)
        c[3].next(PeerUp)
        c[2].next(PeerUp)
        c[2].next(PeerUp)
        mid, error = c[1].node.trace_route(c[3].label)
        assert mid is not None, error
        result = c[1].next(TraceResult)
        assert result.complete and [h.label for h in result.hops] == [c[2].label, c[3].label]
        assert 0 < result.hops[0].rtt_ms <= result.hops[1].rtt_ms
    with Cluster(1, trace=False) as c:
        assert c[1].node.why("") == (None, "this node keeps no records: it runs with --no-trace")


def test_a_lossy_link_shows_its_loss_on_exactly_that_neighbour():
    from lossy import LinkSpec, LossyHub  # imported here: it is a large module only this test needs

    fast = MembershipConfig(label="", hello_max_s=0.1)  # ten HELLOs a second: a loss estimate in seconds
    hub = LossyHub(seed=11, max_life_s=60.0)
    probes = []
    try:
        processed = None
        for _ in range(3):
            probes.append(Probe(processed, membership=fast))
            processed = probes[0].processed
        ids = [hub.add_node() for _ in probes]
        lossy_0, lossy_1 = hub.link(ids[0], ids[1], LinkSpec(loss=0.4))
        clean_0, clean_2 = hub.link(ids[0], ids[2])
        for i, p in zip(ids, probes):
            hub.set_up(i, p.node.addr[1])
        hub.start()
        probes[0].node.add_peer(("127.0.0.1", lossy_0))
        probes[0].node.add_peer(("127.0.0.1", clean_0))
        probes[1].node.add_peer(("127.0.0.1", lossy_1))
        probes[2].node.add_peer(("127.0.0.1", clean_2))
        for p in probes:
            p.node.start()
        m = probes[0].node.membership
        lossy, clean = ("127.0.0.1", lossy_0), ("127.0.0.1", clean_0)
        deadline = time.monotonic() + 30.0
        # Woken by each datagram any of the nodes handles, until 40 HELLOs' worth were expected on both links.
        while not all(a in m.neighbours and m.neighbours[a].rx_expected >= 40 for a in (lossy, clean)):
            assert time.monotonic() < deadline, "not enough HELLOs in time"
            processed.get(timeout=max(deadline - time.monotonic(), 0.01))
        rows = {r["addr"]: r for r in probes[0].node.neighbour_rows()}
        bad, good = rows["127.0.0.1:%d" % lossy_0], rows["127.0.0.1:%d" % clean_0]
        assert bad["loss"] >= 0.2 and bad["flags"] == ["loss"], bad
        assert good["loss"] <= 0.05 and good["flags"] == [], good
        assert bad["in"] > 0 and good["in"] > bad["in"]  # fewer of the lossy neighbour's datagrams arrive
    finally:
        for p in probes:
            p.node.stop()
        if hub._thread is not None:
            hub.stop()


def test_why_and_trace_typed_at_a_running_node_and_no_trace_on_the_command_line():
    from meshchat.cli import parse_args, run_command

    assert parse_args(["--no-trace"]).no_trace and not parse_args([]).no_trace
    with Cluster(2, [(1, 2)], membership=FAST) as c:
        c[1].next(PeerUp)
        c[2].next(PeerUp)
        [msg] = c[1].node.say("hello")
        c[2].wait_for_body("hello")
        out = io.StringIO()
        con = JsonConsole(out)
        for line in ("/why", "/why " + msg.mid[:12], "/why zzz", "/trace nobody", f"/trace {c[1].label}"):
            assert run_command(parse_line(line), c[2].node, con)
        result = c[2].next(TraceResult)
        events = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [e["event"] for e in events] == ["why", "why", "error", "error", "notice"]
        assert events[0]["mid"] == events[1]["mid"] == msg.mid and events[0]["first_from"] == c[1].label
        assert "no message 'zzz'" in events[2]["error"] and "no node called 'nobody'" in events[3]["error"]
        assert result.complete and [h.label for h in result.hops] == [c[1].label]
