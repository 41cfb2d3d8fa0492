"""files.py, pure: offers, hash lists, fetching from several sources, verification, names (no I/O)."""

import base64
import hashlib
import random
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import pytest

from meshchat.files import (CAP, CHUNK_BYTES, HASH_BYTES, MAX_SOURCES, Discard, FileDone, FileFailed, FileOffered,
                            FileProgress, Files, FilesConfig, Finish, Offer, ReadPiece, SaveMeta, WritePiece,
                            numbered, parse_offer, ranges_of, safe_name)
from meshchat.bucket import new_bucket
from meshchat.membership import Unicast
from meshchat.relay import MAX_SEND_BYTES
from meshchat.wire import Message, decode, encode


def make_offer(content: bytes, fid: str = "0123456789abcdef", src: str = "127.0.0.1:1", name: str = "f.bin",
               dst: str = "") -> Tuple[Offer, bytes]:
    chunks = [content[i:i + CHUNK_BYTES] for i in range(0, len(content), CHUNK_BYTES)]
    hashes = b"".join(hashlib.sha256(c).digest() for c in chunks)
    return Offer(fid, name, len(content), hashlib.sha256(content).hexdigest(), hashlib.sha256(hashes).hexdigest(),
                 CHUNK_BYTES, src, dst), hashes


def offer_message(offer: Offer) -> Message:
    return Message("m" + offer.fid, 0.0, 8, "FOFFER", offer.src, offer.dst, "", {"file": offer.fields()})


class Peer:
    def __init__(self, net: "Net", i: int, accept: int = 16 << 20, quota: int = 1 << 30) -> None:
        self.addr = ("127.0.0.1", 1000 + i)
        self.net = net
        self.files = Files(FilesConfig(f"127.0.0.1:{1000 + i}", accept_bytes=accept, quota_bytes=quota),
                           new_mid=lambda: "%012x" % net.rng.getrandbits(48),
                           neighbours=lambda: [n.addr for n in net.links.get(self.addr, ())])
        self.disk: Dict[str, bytearray] = {}
        self.content: Dict[str, bytes] = {}  # what we share
        self.events: List[object] = []


class Net:
    """Peers wired by links, datagrams delivered in order with seeded loss, time advanced by hand."""

    def __init__(self, n: int, edges: List[Tuple[int, int]], loss: float = 0.0, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.peers = [Peer(self, i) for i in range(n)]
        self.by_addr = {p.addr: p for p in self.peers}
        self.links: Dict[tuple, List[Peer]] = {}
        for a, b in edges:
            self.links.setdefault(self.peers[a].addr, []).append(self.peers[b])
            self.links.setdefault(self.peers[b].addr, []).append(self.peers[a])
        self.loss = loss
        self.queue: List[Tuple[tuple, bytes, tuple]] = []  # (to, data, from)
        self.now = 0.0
        self.datagrams = 0
        self.tamper = None  # a function of (data) -> data, applied to FDATA

    def act(self, peer: Peer, actions: list) -> None:
        f = peer.files
        for a in actions:
            if type(a) is Unicast:
                self.datagrams += 1
                if self.rng.random() >= self.loss:
                    self.queue.append((a.addr, a.data, peer.addr))
            elif type(a) is ReadPiece:
                whole = peer.content.get(a.fid) or peer.disk[a.fid]  # shared, or the download so far
                data = bytes(whole[a.index * CHUNK_BYTES:(a.index + 1) * CHUNK_BYTES])
                raw = f.piece_read(a.fid, a.index, data, a.addr, self.now)
                if raw is not None:
                    self.act(peer, [Unicast(raw, a.addr)])
            elif type(a) is WritePiece:
                buf = peer.disk.setdefault(a.fid, bytearray())
                end = a.index * CHUNK_BYTES + len(a.data)
                if len(buf) < end:
                    buf.extend(bytes(end - len(buf)))
                buf[a.index * CHUNK_BYTES:end] = a.data
            elif type(a) is Finish:
                whole = bytes(peer.disk.get(a.offer.fid, b""))[:a.offer.size]
                ok = hashlib.sha256(whole).hexdigest() == a.offer.sha
                peer.content[a.offer.fid] = whole
                self.act(peer, f.finished(a.offer.fid, "/d/" + a.offer.name if ok else None, "sha256 differs",
                                          self.now))
            elif type(a) in (SaveMeta, Discard):
                pass
            else:
                peer.events.append(a)

    def deliver(self) -> None:
        while self.queue:
            to, data, frm = self.queue.pop(0)
            peer = self.by_addr[to]
            msg = decode(data)
            if msg.kind == "FDATA" and self.tamper is not None:
                msg = self.tamper(msg)
            handler = {"FGET": peer.files.get_received, "FDATA": peer.files.data_received,
                       "FHAVE": peer.files.have_received}[msg.kind]
            out, why = handler(msg, frm, len(data), self.now, self.now)
            assert not why
            self.act(peer, out)

    def run(self, until: float, step: float = 0.01) -> None:
        while self.now < until:
            self.now += step
            for p in self.peers:
                self.act(p, p.files.tick(self.now, self.now))
            self.deliver()
            if all(self.done(p) for p in self.peers):
                return

    @staticmethod
    def done(p: Peer) -> bool:
        return all(t.state in ("own", "done", "failed") for t in p.files.transfers.values()) and bool(
            p.files.transfers)

    def share(self, i: int, content: bytes) -> Offer:
        p = self.peers[i]
        offer, hashes = make_offer(content, src=p.files.label)
        p.content[offer.fid] = content
        p.files.share(offer, hashes, "/src/f.bin", self.now)
        for q in self.peers:
            if q is not p:
                self.act(q, q.files.offer_received(offer_message(offer), True, self.now))
        return offer


def content_of(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def test_a_file_reaches_every_node_of_a_line_verified():
    net = Net(4, [(0, 1), (1, 2), (2, 3)])
    data = content_of(200 * CHUNK_BYTES + 17)
    offer = net.share(0, data)
    net.run(30.0)
    for p in net.peers[1:]:
        assert p.content[offer.fid] == data
        done = [e for e in p.events if type(e) is FileDone]
        assert done and done[0].sha == offer.sha
        assert any(type(e) is FileProgress for e in p.events)


def test_an_empty_file_and_a_one_chunk_file_complete():
    for size in (0, 1, CHUNK_BYTES):
        net = Net(2, [(0, 1)])
        data = content_of(size)
        offer = net.share(0, data)
        net.run(5.0)
        assert net.peers[1].content[offer.fid] == data, size


def test_loss_on_every_link_still_completes():
    net = Net(4, [(0, 1), (1, 2), (2, 3)], loss=0.1, seed=3)
    data = content_of(300 * CHUNK_BYTES)
    offer = net.share(0, data)
    net.run(60.0)
    assert net.peers[3].content.get(offer.fid) == data
    assert net.peers[3].files.counters["file_timeouts"] > 0  # loss was felt, and repaired


def test_a_tampered_chunk_is_rejected_and_fetched_again():
    net = Net(2, [(0, 1)])
    data = content_of(50 * CHUNK_BYTES)
    spoiled = []

    def tamper(msg: Message) -> Message:
        if msg.extra["i"] == 10 and not spoiled:  # one piece, once: a bit flipped on the way
            spoiled.append(1)
            raw = bytearray(base64.b64decode(msg.body))
            raw[0] ^= 1
            return msg._replace(body=base64.b64encode(bytes(raw)).decode())
        return msg

    net.tamper = tamper
    offer = net.share(0, data)
    net.run(10.0)
    assert spoiled
    assert net.peers[1].files.counters["file_dropped_bad_piece"] == 1
    assert net.peers[1].content[offer.fid] == data


def test_a_source_that_keeps_lying_is_dropped_and_the_others_serve():
    # 1 fetches from 0 and 2, which both have the file; whatever 2 sends is garbage of the right length.
    net = Net(3, [(0, 1), (2, 1)])
    data = content_of(200 * CHUNK_BYTES)
    liar = net.peers[2].files.label

    def tamper(msg: Message) -> Message:
        if msg.src == liar:
            return msg._replace(body=base64.b64encode(bytes(len(base64.b64decode(msg.body)))).decode())
        return msg

    net.tamper = tamper
    offer, hashes = make_offer(data, src=net.peers[0].files.label)
    for i in (0, 2):
        net.peers[i].content[offer.fid] = data
        net.peers[i].files.share(offer, hashes, "/src", 0.0)
    net.act(net.peers[1], net.peers[1].files.offer_received(offer_message(offer), True, 0.0))
    net.run(30.0)
    assert net.peers[1].content[offer.fid] == data
    bad = net.peers[1].files.counters["file_dropped_bad_piece"]
    assert 3 <= bad <= 3 + 32  # dropped at the third (what was already on its way still came)
    assert net.peers[2].addr not in net.peers[1].files.transfers[offer.fid].sources


def test_rarest_first_and_many_sources_share_the_load():
    # 0 shares, slowly; 1 and 2 fetch from 0 and from each other: both finish, and the origin sent the
    # file about once (rarest first: what the other has is asked of the other).
    net = Net(3, [(0, 1), (0, 2), (1, 2)])
    slow = net.peers[0].files
    slow.config = replace(slow.config, serve_per_s=300.0)
    slow._serve = new_bucket(300.0, 0.1)
    data = content_of(400 * CHUNK_BYTES)
    offer = net.share(0, data)
    net.run(30.0)
    assert net.peers[1].content[offer.fid] == data and net.peers[2].content[offer.fid] == data
    served = [p.files.counters["file_pieces_served"] for p in net.peers]
    pieces = offer.parts + offer.chunks
    assert served[0] < 1.5 * pieces, served  # the origin did not send the file twice
    assert served[1] + served[2] > 0.5 * pieces, served


def test_the_sender_gone_after_one_has_it_does_not_stop_the_others():
    net = Net(3, [(0, 1), (1, 2)])
    data = content_of(100 * CHUNK_BYTES)
    offer = net.share(0, data)
    # 2 cannot fetch yet (its only neighbour has nothing): run until 1 is done, then cut 0 off.
    while net.peers[1].files.transfers[offer.fid].state != "done":
        net.run(net.now + 0.05)
    net.links[net.peers[1].addr].remove(net.peers[0])
    net.links.pop(net.peers[0].addr)
    net.peers.remove(net.peers[0])
    net.run(net.now + 20.0)
    assert net.peers[1].content[offer.fid] == data  # net.peers[1] is the old 2 now


def test_an_offer_above_the_limit_waits_for_accept():
    net = Net(2, [(0, 1)])
    net.peers[1].files.config = FilesConfig(net.peers[1].files.label, accept_bytes=1000)
    data = content_of(5000)
    offer = net.share(0, data)
    assert [e for e in net.peers[1].events if type(e) is FileOffered][0].fetching is False
    net.run(2.0)
    assert net.peers[1].files.transfers[offer.fid].state == "offered"
    text, actions = net.peers[1].files.accept(offer.fid[:6], net.now)
    assert text == ""
    net.act(net.peers[1], actions)
    net.run(10.0)
    assert net.peers[1].content[offer.fid] == data


def test_a_cancelled_transfer_is_fetched_again_whole_by_accept_and_ones_own_file_says_so():
    net = Net(2, [(0, 1)])
    data = content_of(40 * CHUNK_BYTES)
    offer = net.share(0, data)
    f = net.peers[1].files
    assert f.transfers[offer.fid].state == "fetching"  # under way, not done
    text, actions = f.cancel(offer.fid, net.now)
    net.act(net.peers[1], actions)
    assert f.transfers[offer.fid].state == "failed"
    text, actions = f.accept(offer.fid[:6], net.now)
    assert text == "" and f.transfers[offer.fid].state == "fetching"
    net.act(net.peers[1], actions)
    net.run(10.0)
    assert net.peers[1].content[offer.fid] == data and f.transfers[offer.fid].state == "done"
    assert "your own file" in net.peers[0].files.accept(offer.fid, net.now)[0]
    assert "already" in f.accept(offer.fid, net.now)[0]


def test_a_transfer_shows_a_row_at_once_and_no_time_left_from_its_first_fraction_of_a_second():
    net = Net(2, [(0, 1)])
    offer = net.share(0, content_of(400 * CHUNK_BYTES))
    first = [e for e in net.peers[1].events if type(e) is FileProgress]
    assert first and first[0].have == 0 and first[0].left_s is None
    t = net.peers[1].files.transfers[offer.fid]
    t.samples.append((t.started + 0.1, 2500))
    assert net.peers[1].files._progress(t, t.started + 0.2).left_s is None
    assert net.peers[1].files._progress(t, t.started + 1.5).left_s is not None


def test_the_rate_is_over_the_time_pieces_have_been_coming_not_since_the_transfer_started():
    net = Net(2, [(0, 1)])
    offer = net.share(0, content_of(400 * CHUNK_BYTES))
    f = net.peers[1].files
    t = f.transfers[offer.fid]
    t.samples = [(t.started + 10.0 + k / 100, 1000) for k in range(100)]  # 100 kB in the second second
    rate = f._rate(t, t.started + 11.0)
    assert 95_000 <= rate <= 105_000, rate  # not 100 kB over 3 s


def test_an_unverified_offer_is_not_fetched_and_zero_always_asks():
    f = Files(FilesConfig("127.0.0.1:2", accept_bytes=0), new_mid=lambda: "m")
    offer, _ = make_offer(b"x" * 10)
    out = f.offer_received(offer_message(offer), True, 0.0)
    assert out == [FileOffered(offer, True, False)]
    f2 = Files(FilesConfig("127.0.0.1:2"), new_mid=lambda: "m")
    assert f2.offer_received(offer_message(offer), False, 0.0) == [FileOffered(offer, False, False)]


def test_a_transfer_that_does_not_fit_the_quota_is_refused_before_it_starts():
    f = Files(FilesConfig("127.0.0.1:2", quota_bytes=10_000, used_bytes=8_000), new_mid=lambda: "m")
    offer, _ = make_offer(b"x" * 5000)
    out = f.offer_received(offer_message(offer), True, 0.0)
    failed = [e for e in out if type(e) is FileFailed]
    assert failed and "quota" in failed[0].reason
    assert not any(type(e) is SaveMeta for e in out)


def test_resume_asks_only_for_what_is_missing():
    net = Net(2, [(0, 1)])
    data = content_of(100 * CHUNK_BYTES)
    offer, hashes = make_offer(data, src=net.peers[0].files.label)
    net.peers[0].content[offer.fid] = data
    net.peers[0].files.share(offer, hashes, "/src", 0.0)
    have = list(range(0, 100, 2))
    net.peers[1].disk[offer.fid] = bytearray(data)  # the even chunks are there (the odd ones get rewritten)
    net.act(net.peers[1], net.peers[1].files.resume(offer, hashes, have, 0.0))
    net.run(10.0)
    assert net.peers[1].content[offer.fid] == data
    assert net.peers[1].files.counters["file_pieces_received"] == 50


def test_bounds_sources_and_malformed_fields():
    f = Files(FilesConfig("127.0.0.1:2"), new_mid=lambda: "m")
    offer, _ = make_offer(content_of(10 * CHUNK_BYTES))
    f.offer_received(offer_message(offer), True, 0.0)
    for i in range(MAX_SOURCES + 10):
        have = Message("h", 0.0, 1, "FHAVE", "127.0.0.1:9", "", "", {"fid": offer.fid, "have": [[0, 3]]})
        f.have_received(have, ("10.0.0.1", 1 + i), 0, 0.0, 0.0)
    assert len(f.transfers[offer.fid].sources) == MAX_SOURCES
    for bad in ([[3, 1]], [[0, 10 ** 6]], [[0]], "x", [[0, 1]] * 65, [[True, 2]]):
        before = f.counters["file_dropped_malformed"]
        f.have_received(Message("h", 0.0, 1, "FHAVE", "127.0.0.1:9", "", "", {"fid": offer.fid, "have": bad}),
                        ("10.0.0.1", 1), 0, 0.0, 0.0)
        assert f.counters["file_dropped_malformed"] == before + 1, bad
    bad_get = Message("g", 0.0, 1, "FGET", "127.0.0.1:9", "", "", {"fid": offer.fid, "want": list(range(33))})
    assert f.get_received(bad_get, ("10.0.0.1", 1), 0, 0.0, 0.0) == ([], "")
    data = Message("d", 0.0, 1, "FDATA", "127.0.0.1:9", "", "not base64!", {"fid": offer.fid, "i": 0})
    f.data_received(data, ("10.0.0.1", 1), 0, 0.0, 0.0)
    assert f.counters["file_dropped_malformed"] >= 7


def test_parse_offer_refuses_what_rule_1_does_not_allow():
    offer, _ = make_offer(b"abc")
    assert parse_offer(offer_message(offer)) == offer
    for key, value in (("fid", "XYZ"), ("size", -1), ("size", True), ("size", 1 << 40), ("cs", 7), ("name", ""),
                       ("name", "x" * 300), ("sha", "0" * 63), ("hl", None)):
        msg = offer_message(offer)
        msg.extra["file"][key] = value
        assert parse_offer(msg) is None, key
    assert parse_offer(Message("m", 0.0, 8, "FOFFER", "127.0.0.1:1", "", "", {"file": "x"})) is None


def test_an_fdata_fits_the_datagram_limit_with_a_long_label():
    label = "h" * 190 + ".example:65535"
    f = Files(FilesConfig(label), new_mid=lambda: "0" * 12)
    raw = f._fdata("0123456789abcdef", 12_345_678, bytes(CHUNK_BYTES), 0.0, 1730563200.123)
    assert len(raw) <= MAX_SEND_BYTES
    assert decode(raw).kind == "FDATA"


def test_ranges_of():
    assert ranges_of(bytearray([1, 1, 0, 1, 0, 0, 1])) == [[0, 2], [3, 4], [6, 7]]
    assert ranges_of(bytearray([0, 0])) == []
    assert ranges_of(bytearray([1, 0] * 100), limit=3) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("offered, safe", [
    ("../../etc/passwd", "passwd"), ("C:\\x\\evil", "evil"), ("..", "file"), ("", "file"), ("a\x00b.txt", "a_b.txt"),
    ("CON", "_CON"), ("com1.txt", "_com1.txt"), ("photo.jpg", "photo.jpg"), (" .hidden. ", "hidden"),
    ("x\u202egpj.exe", "x_gpj.exe"), ("a:b", "a_b"), ("/", "file"),
])
def test_safe_names(offered, safe):
    assert safe_name(offered) == safe


def test_a_long_name_is_cut_keeping_its_extension():
    name = safe_name("é" * 300 + ".jpeg")
    assert name.endswith(".jpeg") and len(name.encode()) <= 200


def test_numbered():
    assert numbered("photo.jpg", 1) == "photo (1).jpg"
    assert numbered("README", 2) == "README (2)"
    assert numbered(".bashrc", 1) == ".bashrc (1)"


def test_requests_go_a_quarter_window_at_a_time_not_one_per_chunk():
    # One FGET per chunk ran at the chunk rate and met the neighbour's datagram rate limit (200/s):
    # a 2 MiB transfer lost 937 of them. Batched, a receiver sends a small fraction of that.
    net = Net(2, [(0, 1)])
    data = content_of(1000 * CHUNK_BYTES)
    offer = net.share(0, data)
    net.run(30.0)
    assert net.peers[1].content[offer.fid] == data
    assert net.peers[1].files.counters["file_requests_sent"] < (offer.parts + offer.chunks) / 4


def test_the_files_thread_opens_a_download_once_for_all_its_writes_and_reads(tmp_path, monkeypatch):
    import builtins

    from meshchat import filedisk

    opened = []
    real_open = builtins.open

    def counting_open(path, mode="r", *a, **k):
        if str(path).endswith(".part"):
            opened.append(mode)
        return real_open(path, mode, *a, **k)

    disk = filedisk.FileDisk(str(tmp_path), filedisk.Callbacks(*(lambda *a: None,) * 6))
    offer, _ = make_offer(content_of(10 * CHUNK_BYTES))
    disk._meta(offer, None)
    monkeypatch.setattr(filedisk, "open", counting_open, raising=False)
    for i in range(10):
        disk._write(offer.fid, i, b"x" * CHUNK_BYTES)
        disk._read(offer.fid, "", i, ("127.0.0.1", 1))
    assert opened == ["r+b"]  # not once per chunk (a normalised mode, "rb+", never matched "r+b")
    disk._close(offer.fid)


def test_the_files_thread_remembers_finished_files_across_a_restart_and_keeps_only_the_newest(tmp_path):
    from meshchat import filedisk

    done = []
    cb = filedisk.Callbacks(*(lambda *a: None,) * 4, lambda fid, path, why: done.append((fid, path, why)),
                            lambda *a: None)
    disk = filedisk.FileDisk(str(tmp_path), cb)
    content = content_of(3 * CHUNK_BYTES)
    offer, _ = make_offer(content)
    disk._meta(offer, None)
    for i in range(3):
        disk._write(offer.fid, i, content[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
    disk._finish(offer)
    assert done and done[0][2] == "" and done[0][0] == offer.fid
    again = filedisk.FileDisk(str(tmp_path), cb)  # a restart
    assert again.done_fids() == [offer.fid]
    for k in range(3 * filedisk.DONE_KEEP):
        again._note_done("%016x" % k)
    kept = again.done_fids()
    assert len(kept) == filedisk.DONE_KEEP and kept[-1] == "%016x" % (3 * filedisk.DONE_KEEP - 1)
    assert (tmp_path / filedisk.PARTIAL_DIR / filedisk.DONE_FILE).stat().st_size <= 2 * filedisk.DONE_KEEP * 17 + 17
