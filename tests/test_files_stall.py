"""files.py, pure: a transfer never stalls for good, and asks its sources at a pace their rate limit
takes (virtual time, in memory, no I/O).

A lost FOFFER is asked for again (the neighbour's FHAVE names it); a fetch that makes no progress
starts afresh after STALL_RESET_S (requests out forgotten, windows back to their start, silent sources
dropped), and fails with a reason after FETCH_STALL_S.
"""

import random
from typing import Callable, Optional

from meshchat.files import (FETCH_STALL_S, FGET_GAP_S, HAVE_REFRESH_S, INITIAL_WINDOW, MAX_OFFERS, OFFER_ASKS,
                            STALL_RESET_S, FileFailed)
from meshchat.membership import Unicast
from meshchat.wire import Message, decode

from test_files import Net, content_of, make_offer, offer_message


class FloodNet(Net):
    """Net, plus FOFFERs taken as a relay takes a flood's first copy (kept, flooded on), and a filter
    that drops chosen datagrams (``cut(frm, to, msg)``)."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.cut: Optional[Callable[[tuple, tuple, Message], bool]] = None
        self.seen = {p.addr: set() for p in self.peers}

    def offer_arrives(self, peer, msg: Message, frm: Optional[tuple]) -> None:
        if msg.mid in self.seen[peer.addr]:
            return
        self.seen[peer.addr].add(msg.mid)
        self.act(peer, peer.files.offer_received(msg, True, self.now))
        peer.files.keep_offer(msg, msg.ttl - 1)
        if msg.ttl > 1:
            for q in self.links.get(peer.addr, ()):
                if q.addr != frm:
                    self.act(peer, [Unicast(encode_ttl(msg, msg.ttl - 1), q.addr)])

    def deliver(self) -> None:
        handlers = {"FGET": "get_received", "FDATA": "data_received", "FHAVE": "have_received"}
        while self.queue:
            to, data, frm = self.queue.pop(0)
            peer = self.by_addr[to]
            msg = decode(data)
            if self.cut is not None and self.cut(frm, to, msg):
                continue
            if msg.kind == "FOFFER":
                self.offer_arrives(peer, msg, frm)
                continue
            out, why = getattr(peer.files, handlers[msg.kind])(msg, frm, len(data), self.now, self.now)
            assert not why
            self.act(peer, out)


def encode_ttl(msg: Message, ttl: int) -> bytes:
    from meshchat.wire import encode
    return encode(msg._replace(ttl=ttl))


def share(net: FloodNet, i: int, content: bytes):
    """Peer ``i`` shares ``content`` and floods its offer (the net's cut decides who gets a copy)."""
    p = net.peers[i]
    offer, hashes = make_offer(content, src=p.files.label)
    p.content[offer.fid] = content
    p.files.share(offer, hashes, "/src/f.bin", net.now)
    msg = offer_message(offer)
    net.seen[p.addr].add(msg.mid)
    p.files.keep_offer(msg, msg.ttl)
    for q in net.links[p.addr]:
        net.act(p, [Unicast(encode_ttl(msg, msg.ttl), q.addr)])
    return offer


def test_a_lost_offer_is_asked_for_again_and_the_line_beyond_it_completes():
    net = FloodNet(4, [(0, 1), (1, 2), (2, 3)])
    lost = {"n": 0}

    def cut(frm, to, msg):  # the flood's one copy from 1 to 2 is lost
        if msg.kind == "FOFFER" and frm == net.peers[1].addr and to == net.peers[2].addr and not lost["n"]:
            lost["n"] += 1
            return True
        return False

    net.cut = cut
    data = content_of(40 * 768 + 5)
    offer = share(net, 0, data)
    net.run(30.0)
    assert lost["n"] == 1
    for p in net.peers[1:]:
        assert p.content.get(offer.fid) == data
    assert net.peers[2].files.counters["file_offer_asks"] >= 1
    assert net.peers[1].files.counters["file_offers_served"] >= 1


def test_a_wedged_window_starts_afresh_and_the_transfer_completes():
    net = FloodNet(2, [(0, 1)])
    data = content_of(300 * 768)
    f = net.peers[1].files
    wedged = []

    def cut(frm, to, msg):
        if wedged or msg.kind != "FDATA" or f.counters["file_pieces_received"] < 50:
            return False
        # Mid-transfer, a count of requests out that no answer will ever bring down: the window looks
        # full for good, and no request is left to time out.
        t = f.transfers[offer.fid]
        for s in t.sources.values():
            s.out = 10 ** 6
        for piece in t.inflight:
            t.need[piece] = 1
        t.inflight.clear()
        wedged.append(net.now)
        return True

    net.cut = cut
    offer = share(net, 0, data)
    net.run(STALL_RESET_S + 30.0)
    assert wedged and net.peers[1].content.get(offer.fid) == data
    assert f.counters["file_stall_resets"] == 1


def _stall_after_the_hash_list(serving: bool):
    """A 2-node transfer whose source stops sending chunks after the hash list: it still announces
    (``serving``) or is silent altogether."""
    net = FloodNet(2, [(0, 1)])
    src = net.peers[0].addr
    offer = share(net, 0, content_of(200 * 768))

    def cut(frm, to, msg):
        if frm == src and msg.kind == "FDATA" and msg.extra.get("i", 0) >= offer.parts:
            return True
        return not serving and frm == src and msg.kind == "FHAVE" and net.now > 1.0

    net.cut = cut
    net.run(STALL_RESET_S - 1.0)
    t = net.peers[1].files.transfers[offer.fid]
    assert t.state == "fetching" and t.sources and t.inflight  # stuck, its source still counted
    net.run(STALL_RESET_S + 1.0)
    assert net.peers[1].files.counters["file_stall_resets"] == 1
    if serving:
        assert list(t.sources) == [src]
        assert all(s.window == INITIAL_WINDOW for s in t.sources.values())
    else:
        assert not t.sources  # silent for as long: not counted on any more
    net.run(FETCH_STALL_S + 5.0)
    failed = [e for e in net.peers[1].events if type(e) is FileFailed]
    assert t.state == "failed" and len(failed) == 1
    return failed[0].reason, net.peers[1].files.counters["file_stall_resets"]


def test_a_source_that_announces_but_never_serves_fails_the_transfer_with_a_reason():
    reason, resets = _stall_after_the_hash_list(serving=True)
    assert reason == f"no progress for {FETCH_STALL_S:g} s from 1 node(s) that have it"
    assert resets >= FETCH_STALL_S // STALL_RESET_S - 1


def test_a_source_gone_silent_is_dropped_and_the_transfer_fails_with_a_reason():
    reason, _ = _stall_after_the_hash_list(serving=False)
    assert reason == f"no node had it for {FETCH_STALL_S:g} s"


def test_offer_asks_are_few_spaced_and_bounded():
    net = FloodNet(2, [(0, 1)])
    f = net.peers[1].files
    frm = net.peers[0].addr

    def fhave(fid: str) -> Message:
        return Message("h" + fid, 0.0, 1, "FHAVE", "x", "", "", {"fid": fid, "have": [[0, 3]]})

    asks = []
    for k in range(40):
        now = k * 0.5
        out, _ = f.have_received(fhave("00000000000000aa"), frm, 100, now, now)
        asks.extend((now, decode(u.data)) for u in out)
    assert len(asks) == OFFER_ASKS
    assert all(b[0] - a[0] >= HAVE_REFRESH_S for a, b in zip(asks, asks[1:]))
    assert all(m.kind == "FGET" and m.extra == {"fid": "00000000000000aa", "want": [], "offer": True}
               for _, m in asks)
    f.have_received(fhave("not a fid"), frm, 100, 30.0, 30.0)
    assert f.counters["file_dropped_malformed"] == 1
    rng = random.Random(5)
    for k in range(3 * MAX_OFFERS):
        f.have_received(fhave("%016x" % rng.getrandbits(64)), frm, 100, 40.0, 40.0)
    assert len(f._offer_asks) <= MAX_OFFERS


def test_the_offer_is_served_only_for_a_transfer_we_have_and_as_it_came():
    net = FloodNet(2, [(0, 1)])
    p = net.peers[0]
    offer, hashes = make_offer(content_of(3000), src=p.files.label)
    p.files.share(offer, hashes, "/src/f.bin", 0.0)
    ask = Message("g1", 0.0, 1, "FGET", "x", "", "", {"fid": offer.fid, "want": [], "offer": True})
    out, _ = p.files.get_received(ask, net.peers[1].addr, 100, 1.0, 1.0)
    assert out == []  # not kept yet: nothing to serve
    msg = offer_message(offer)._replace(extra=dict(offer_message(offer).extra, sig="s1"))
    p.files.keep_offer(msg, 5)
    out, _ = p.files.get_received(ask, net.peers[1].addr, 100, 1.0, 1.0)
    assert len(out) == 1 and decode(out[0].data) == msg._replace(ttl=5)
    unknown = ask._replace(extra={"fid": "ffffffffffffffff", "want": [], "offer": True})
    assert p.files.get_received(unknown, net.peers[1].addr, 100, 1.0, 1.0)[0] == []
    assert p.files.counters["file_dropped_unknown"] == 1


def test_a_direct_files_offer_is_kept_too_so_a_carrier_that_lost_it_can_ask_for_it():
    net = FloodNet(2, [(0, 1)])
    p = net.peers[0]
    offer, hashes = make_offer(content_of(3000), src=p.files.label, dst="127.0.0.1:1009")
    p.files.share(offer, hashes, "/src/f.bin", 0.0)
    msg = offer_message(offer)
    p.files.keep_offer(msg, 5)
    ask = Message("g1", 0.0, 1, "FGET", "x", "", "", {"fid": offer.fid, "want": [], "offer": True})
    out, _ = p.files.get_received(ask, net.peers[1].addr, 100, 1.0, 1.0)
    assert len(out) == 1 and decode(out[0].data) == msg._replace(ttl=5)


class _Later(list):
    """A net's queue whose appends arrive ``latency`` later (what is due is put in by ``deliver``)."""

    def __init__(self, net: "DelayNet") -> None:
        super().__init__()
        self.net = net

    def append(self, item) -> None:
        self.net.pending.append((self.net.now + self.net.latency, item))


class DelayNet(FloodNet):
    """FloodNet with a one-way latency on every link, and every datagram sent logged (when, from, kind)."""

    def __init__(self, *a, latency: float = 0.005, **k) -> None:
        super().__init__(*a, **k)
        self.latency = latency
        self.pending: list = []
        self.queue = _Later(self)
        self.sent: list = []

    def act(self, peer, actions: list) -> None:
        for a in actions:
            if type(a) is Unicast:
                self.sent.append((self.now, peer.addr, decode(a.data).kind))
        super().act(peer, actions)

    def deliver(self) -> None:
        due = self.now + 1e-9
        list.extend(self.queue, [item for when, item in self.pending if when <= due])
        self.pending = [(when, item) for when, item in self.pending if when > due]
        super().deliver()


def test_a_source_with_requests_out_is_asked_at_most_once_per_fget_gap():
    # Each answer freeing a quarter of the window sent an FGET: with a short round trip that ran well
    # over the 200 datagrams a second a neighbour takes (relay.py), and each one dropped was a round of
    # timeouts and a halved window.
    net = DelayNet(2, [(0, 1)], latency=0.01)
    data = content_of(3000 * 768)
    offer = share(net, 0, data)
    net.run(20.0, step=0.001)
    assert net.peers[1].content.get(offer.fid) == data
    fgets = [when for when, frm, kind in net.sent if frm == net.peers[1].addr and kind == "FGET"]
    busiest = max(sum(1 for w in fgets if t <= w < t + 0.1) for t in fgets)
    assert busiest <= 0.1 / FGET_GAP_S + 1
    assert net.peers[1].files.counters["file_timeouts"] == 0


def test_a_transfer_no_one_serves_wakes_the_timer_only_when_something_is_due():
    # A deadline in the past makes the node's select() spin; one with nothing due must lie ahead.
    net = FloodNet(2, [(0, 1)])
    offer, _ = make_offer(content_of(5000), src=net.peers[0].files.label)
    f = net.peers[1].files
    net.act(net.peers[1], f.offer_received(offer_message(offer), True, 0.0))
    for now in (0.5, STALL_RESET_S + 1.0, 3 * STALL_RESET_S):
        net.act(net.peers[1], f.tick(now, now))
        assert f.next_deadline() > now
    assert f.counters["file_stall_resets"] == 0


# -- a restart never fetches a file again, nor our own; an old offer asked for is no skewed clock ------------

def test_our_own_offer_served_back_is_never_fetched_and_a_file_done_before_a_restart_is_not_fetched_again():
    net = FloodNet(2, [(0, 1)])
    f = net.peers[1].files
    mine, _ = make_offer(content_of(3000), fid="00000000000000a1", src=f.label)
    assert f.offer_received(offer_message(mine), True, 1.0) == [] and mine.fid not in f.transfers
    other, _ = make_offer(content_of(3000), fid="00000000000000a2", src=net.peers[0].files.label)
    f.remember_done(["00000000000000a2", "not a fid"])
    assert f.offer_received(offer_message(other), True, 1.0) == [] and other.fid not in f.transfers
    fresh, _ = make_offer(content_of(3000), fid="00000000000000a3", src=net.peers[0].files.label)
    assert f.offer_received(offer_message(fresh), True, 1.0), "an offer not done before is taken as ever"


def test_an_old_offer_is_served_back_one_hop_and_the_asker_takes_it_as_asked_for():
    net = FloodNet(2, [(0, 1)])
    p, q = net.peers
    offer, hashes = make_offer(content_of(3000), src=p.files.label)
    p.files.share(offer, hashes, "/src/f.bin", 0.0)
    msg = offer_message(offer)._replace(ts=1000.0)
    p.files.keep_offer(msg, 5)
    ask = Message("g1", 0.0, 1, "FGET", "x", "", "", {"fid": offer.fid, "want": [], "offer": True})
    [fresh] = p.files.get_received(ask, q.addr, 100, 1.0, 1010.0)[0]
    assert decode(fresh.data).ttl == 5  # 10 s old: it floods on from the asker
    [old] = p.files.get_received(ask, q.addr, 100, 2.0, 1000.0 + 120.0)[0]
    assert decode(old.data).ttl == 1  # 2 minutes old: one hop, as repair serves
    assert not q.files.asked_offer(decode(old.data))
    fhave = Message("h1", 0.0, 1, "FHAVE", "x", "", "", {"fid": offer.fid, "have": [[0, 3]]})
    q.files.have_received(fhave, p.addr, 100, 3.0, 1123.0)
    assert q.files.asked_offer(decode(old.data))


def test_a_relay_takes_an_old_offer_it_asked_for_without_calling_the_senders_clock_skewed():
    from meshchat.files import Files, FilesConfig
    from meshchat.membership import Membership, MembershipConfig
    from meshchat.relay import Notice, Relay, RelayConfig
    from meshchat.wire import encode
    from meshsim import addr_of, label_of

    m = Membership(MembershipConfig(label=label_of(1)), secret=b"t")
    m.is_up = lambda addr: True  # the neighbour proved itself
    files = Files(FilesConfig(label_of(1)), new_mid=lambda: "000000000001")
    r = Relay(RelayConfig(label=label_of(1), rate_limit=0), [addr_of(2)], membership=m, files=files)
    offer, _ = make_offer(content_of(3000), src=label_of(3))
    old = offer_message(offer)._replace(mid="00000000000000aa-1", ts=1000.0, ttl=1)
    wall = 1000.0 + 300.0  # five minutes old: past --max-skew
    out = r.datagram_received(encode(old), addr_of(2), 1.0, wall)
    assert any(isinstance(a, Notice) and "clock" in a.text for a in out), "not asked for: refused as before"
    assert r.counters.dropped_stale == 1 and offer.fid not in files.transfers
    fhave = Message("h1", wall, 1, "FHAVE", label_of(2), "", "", {"fid": offer.fid, "have": [[0, 3]]})
    r.datagram_received(encode(fhave), addr_of(2), 2.0, wall)  # we ask addr_of(2) for the offer
    out = r.datagram_received(encode(old), addr_of(2), 3.0, wall)  # the answer: the same datagram
    assert not any(isinstance(a, Notice) and "clock" in a.text for a in out)
    assert r.counters.dropped_stale == 1 and offer.fid in files.transfers
