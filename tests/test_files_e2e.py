"""Direct files end to end (files.py rule 6): only the destination can read them; relays carry them."""

import base64
import hashlib
import random
from pathlib import Path
from typing import List

import pytest

from meshchat import crypto
from meshchat.files import (CHUNK_BYTES, FileDone, FileFailed, FileOffered, FileProgress, Files, FilesConfig, Offer,
                            WritePiece, open_offer, parse_offer, seal_offer)
from meshchat.membership import PeerUp, Unicast
from meshchat.relay import Notice
from meshchat.wire import Message, WireError, decode

from test_files_live import FileNode

needs_crypto = pytest.mark.skipif(not crypto.available(), reason="needs the secure extra")
MARKER = b"PLAINTEXT-MARKER-7f3a"


def marked_file(path: Path, size: int) -> bytes:
    rng = random.Random(5)
    out = bytearray()
    while len(out) < size:
        out += MARKER + rng.randbytes(97)
    path.write_bytes(bytes(out[:size]))
    return bytes(out[:size])


def spy(fn: FileNode) -> List[bytes]:
    """Every datagram ``fn`` receives from now on, as it came off the socket."""
    got: List[bytes] = []
    relay = fn.node.relay
    inner = relay.datagram_received

    def recording(data, addr, now, wall):
        got.append(bytes(data))
        return inner(data, addr, now, wall)

    relay.datagram_received = recording
    return got


def reveals(datagrams: List[bytes], secrets: List[bytes]) -> List[bytes]:
    """The secrets found in the datagrams, raw or in an FDATA's base64 body."""
    found = []
    for data in datagrams:
        texts = [data]
        try:
            msg = decode(data)
            if msg.kind == "FDATA":
                texts.append(base64.b64decode(msg.body))
        except (WireError, ValueError):
            pass
        found.extend(s for s in secrets if any(s in t for t in texts))
    return found


def on_disk(folder: Path, secret: bytes) -> List[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.fixture
def line(tmp_path):
    made: List[FileNode] = []

    def make(n: int = 3, secure: bool = True) -> List[FileNode]:
        for i in range(n):
            peers = [made[-1].node.addr] if made else []
            made.append(FileNode(tmp_path / f"n{i}", peers, secure=secure,
                                 identity=tmp_path / f"id{i}.key" if secure else None))
        for fn in made:
            fn.next(PeerUp)
        return made

    yield make
    for fn in made:
        fn.stop()


@needs_crypto
def test_a_direct_file_reaches_only_its_destination_and_relays_cannot_read_it(line, tmp_path):
    a, b, c = line(3)
    data = marked_file(tmp_path / "diary-secret.txt", 40_000)
    sha = hashlib.sha256(data).hexdigest()
    seen_by_b = spy(b)
    assert a.node.send_file(str(tmp_path / "diary-secret.txt"), c.node.label) == ""
    offer = c.next(FileOffered)
    assert offer.offer.name == "diary-secret.txt" and offer.offer.sha == sha and offer.fetching
    done = c.next(FileDone)
    assert done.sha == sha and done.name == "diary-secret.txt" and Path(done.path).read_bytes() == data
    sent = a.next(Notice, where=lambda e: "goes to" in e.text)
    assert "end-to-end encrypted" in sent.text
    # b carried it (it served c) and never read it: no plaintext, name or hash in what it got or wrote.
    assert b.node.stats()["files_carried"] == 1
    assert seen_by_b and not reveals(seen_by_b, [MARKER, b"diary-secret", sha.encode()])
    assert not on_disk(b.folder, MARKER) and not on_disk(b.folder, b"diary-secret")
    assert not [e for e in b.seen + list(b.events.queue) if isinstance(e, (FileOffered, FileDone, FileProgress,
                                                                          FileFailed))]
    [row] = b.node.file_rows()
    assert row["state"] in ("carrying", "carried") and row["name"] == "(sealed)" and row["encrypted"] is True
    assert not any(v for k, v in row.items() if isinstance(v, str) and "diary" in v)
    assert [r["encrypted"] for r in a.node.file_rows()] == [True]


@needs_crypto
def test_a_direct_file_waits_for_its_destinations_key_then_goes_sealed(tmp_path):
    a = FileNode(tmp_path / "a", secure=True, identity=tmp_path / "a.key")
    c = FileNode(tmp_path / "c", secure=True, identity=tmp_path / "c.key")
    try:
        data = marked_file(tmp_path / "later.bin", 5000)
        assert a.node.send_file(str(tmp_path / "later.bin"), c.node.label) == ""
        held = a.next(Notice, where=lambda e: "not offered yet" in e.text)
        assert f"waits for {c.node.label}'s key" in held.text
        assert [r["state"] for r in a.node.file_rows()] == ["waiting"]
        c.node.add_peer(a.node.addr)  # c comes: its key with it
        done = c.next(FileDone)
        assert Path(done.path).read_bytes() == data and done.sha == hashlib.sha256(data).hexdigest()
        assert "end-to-end encrypted" in a.next(Notice, where=lambda e: "goes to" in e.text).text
        assert [r["state"] for r in a.node.file_rows()] == ["own"]
    finally:
        a.stop()
        c.stop()


def test_without_keys_a_direct_file_goes_in_clear_and_says_so(line, tmp_path):
    a, b, c = line(3, secure=False)
    data = marked_file(tmp_path / "open.txt", 20_000)
    seen_by_b = spy(b)
    assert a.node.send_file(str(tmp_path / "open.txt"), c.node.label) == ""
    done = c.next(FileDone)
    assert Path(done.path).read_bytes() == data
    assert "not encrypted" in a.next(Notice, where=lambda e: "goes to" in e.text).text
    assert [r["encrypted"] for r in c.node.file_rows()] == [False]
    # In clear, a relay does see it: the check above is one that can fail.
    assert MARKER in reveals(seen_by_b, [MARKER])
    assert not [e for e in b.seen + list(b.events.queue) if isinstance(e, (FileOffered, FileDone))]


@needs_crypto
def test_plain_on_purpose_goes_in_clear(line, tmp_path):
    a, b = line(2)
    data = marked_file(tmp_path / "p.txt", 3000)
    assert a.node.send_file(str(tmp_path / "p.txt"), b.node.label, plain=True) == ""
    done = b.next(FileDone)
    assert Path(done.path).read_bytes() == data
    assert "not encrypted" in a.next(Notice, where=lambda e: "goes to" in e.text).text


# -- pure: sealed offers and chunks (files.py with crypto.py, no sockets) -----------------------------------

def _sealed(content: bytes, fid: str = "00112233445566aa", src: str = "127.0.0.1:1", dst: str = "127.0.0.1:2"):
    """Our sealed offer of ``content`` to ``dst`` as filedisk makes it: (offer with key, hash list, chunks sent)."""
    from meshchat.files import SEALED_CHUNK_BYTES

    key = crypto.new_file_key()
    cipher = crypto.FileCipher(key, fid)
    plain = [content[i:i + SEALED_CHUNK_BYTES] for i in range(0, len(content), SEALED_CHUNK_BYTES)]
    sealed = [cipher.seal(i, c) for i, c in enumerate(plain)]
    hashes = b"".join(hashlib.sha256(c).digest() for c in sealed)
    offer = Offer(fid, "notes.txt", len(content), hashlib.sha256(content).hexdigest(),
                  hashlib.sha256(hashes).hexdigest(), CHUNK_BYTES, src, dst, "", 2, key.hex())
    return offer, hashes, sealed


def _offer_msg(offer: Offer, ttl: int = 8, ttl0: int = 8) -> Message:
    return Message("m" + offer.fid, 0.0, ttl, "FOFFER", offer.src, offer.dst, "",
                   {"file": offer.fields(), "ttl0": ttl0})


@needs_crypto
def test_a_sealed_offer_shows_no_name_or_hash_and_opens_only_for_its_destination():
    theirs = crypto.Identity.generate().box
    offer, _, _ = _sealed(b"x" * 2000)
    sealed = seal_offer(offer, theirs.public, crypto.seal_to)
    fields = sealed.fields()
    assert set(fields) == {"fid", "size", "hl", "cs", "box", "hops"}
    assert "notes" not in str(fields) and offer.sha not in str(fields) and offer.key not in str(fields)
    parsed = parse_offer(_offer_msg(sealed))
    assert parsed is not None and parsed.name == "" and parsed.key == "" and parsed.chunks == offer.chunks
    opened = open_offer(parsed, theirs.open)
    assert opened is not None and (opened.name, opened.sha, opened.key) == (offer.name, offer.sha, offer.key)
    # Another key, or the box moved onto another offer (or its size changed), does not open.
    assert open_offer(parsed, crypto.Identity.generate().box.open) is None
    assert open_offer(parsed._replace(size=parsed.size + 1), theirs.open) is None
    assert open_offer(parsed._replace(fid="ffffffffffffffff"), theirs.open) is None


def test_parse_offer_refuses_a_box_with_what_it_hides_beside_it_or_without_a_destination():
    offer = Offer("00112233445566aa", "", 10, "", "a" * 64, CHUNK_BYTES, "s:1", "d:2", "QUJD", 2)
    assert parse_offer(_offer_msg(offer)) is not None
    for bad in ({"name": "x"}, {"sha": "b" * 64}, {"box": ""}, {"box": "a b"}, {"box": 7}, {"box": "A" * 4096},
                {"hops": -1}, {"hops": 256}, {"hops": "2"}):
        msg = _offer_msg(offer)
        msg.extra["file"].update(bad)
        assert parse_offer(msg) is None, bad
    assert parse_offer(_offer_msg(offer)._replace(dst="")) is None


class _Pair:
    """A sealed file's origin and destination Files wired directly, with a hook to tamper with FDATA."""

    def __init__(self, content: bytes) -> None:
        ident = crypto.Identity.generate()
        self.rng = random.Random(3)
        mid = lambda: "%012x" % self.rng.getrandbits(48)  # noqa: E731
        self.a_addr, self.b_addr = ("127.0.0.1", 1), ("127.0.0.1", 2)
        self.a = Files(FilesConfig("127.0.0.1:1"), mid, neighbours=lambda: [self.b_addr])
        self.b = Files(FilesConfig("127.0.0.1:2"), mid, neighbours=lambda: [self.a_addr], open_box=ident.box.open)
        offer, hashes, self.chunks = _sealed(content)
        self.offer = seal_offer(offer, ident.box.public, crypto.seal_to)
        self.a.share(self.offer, hashes, "/nowhere", 0.0)
        self.written = {}
        self.events: list = []
        self.tamper = lambda piece, data: data
        self.now = 0.0

    def run(self, actions, at):
        queue = [(at, x) for x in actions]
        while queue:
            who, x = queue.pop(0)
            other = self.b if who is self.a else self.a
            if type(x) is Unicast:
                msg = decode(x.data)
                if msg.kind == "FDATA":
                    msg = msg._replace(body=base64.b64encode(self.tamper(msg.extra["i"], base64.b64decode(msg.body))).decode())
                handler = {"FGET": other.get_received, "FDATA": other.data_received, "FHAVE": other.have_received}
                src = self.a_addr if who is self.a else self.b_addr
                out, _ = handler[msg.kind](msg, src, len(x.data), self.now, self.now)
                queue.extend((other, y) for y in out)
            elif type(x).__name__ == "ReadPiece":
                raw = who.piece_read(x.fid, x.index, self.chunks[x.index], x.addr, self.now)
                if raw is not None:
                    queue.append((who, Unicast(raw, x.addr)))
            elif type(x) is WritePiece:
                assert x.key == self.offer.key or who is self.b
                self.written[x.index] = crypto.FileCipher(bytes.fromhex(x.key), x.fid).open(x.index, x.data)
            else:
                self.events.append(x)

    def go(self) -> None:
        self.run(self.b.offer_received(_offer_msg(self.offer), True, 0.0), self.b)
        for _ in range(200):
            self.now += 0.1
            self.run(self.a.tick(self.now, self.now), self.a)
            self.run(self.b.tick(self.now, self.now), self.b)
            if any(type(e).__name__ == "Finish" for e in self.events):
                return


@needs_crypto
def test_a_tampered_ciphertext_chunk_is_rejected_and_fetched_again():
    from meshchat.files import SEALED_CHUNK_BYTES

    content = bytes(random.Random(9).randbytes(20 * SEALED_CHUNK_BYTES + 100))
    pair = _Pair(content)
    hit = []

    def tamper(piece, data):
        if piece == pair.offer.parts + 5 and not hit:
            hit.append(piece)
            return data[:10] + bytes([data[10] ^ 1]) + data[11:]
        return data

    pair.tamper = tamper
    pair.go()
    assert hit and pair.b.counters["file_dropped_bad_piece"] == 1
    [finish] = [e for e in pair.events if type(e).__name__ == "Finish"]
    assert finish.offer.name == "notes.txt" and finish.offer.sha == hashlib.sha256(content).hexdigest()
    assert b"".join(pair.written[i] for i in range(len(pair.chunks))) == content


@needs_crypto
def test_a_carrier_fetches_a_direct_file_on_its_way_only_and_never_shows_it():
    offer, _, _ = _sealed(b"y" * 3000)
    sealed = seal_offer(offer, crypto.Identity.generate().box.public, crypto.seal_to)
    hops = {"127.0.0.1:2": 1}
    carrier = Files(FilesConfig("127.0.0.1:9"), lambda: "0" * 12, hops_to=hops.get)
    out = carrier.offer_received(_offer_msg(sealed, ttl=8, ttl0=8), True, 0.0)  # 1 hop from a, 1 to c: on its way
    assert carrier.counters["files_carried"] == 1 and not [e for e in out if isinstance(e, FileOffered)]
    off_the_way = Files(FilesConfig("127.0.0.1:8"), lambda: "0" * 12, hops_to={"127.0.0.1:2": 3}.get)
    assert off_the_way.offer_received(_offer_msg(sealed, ttl=8, ttl0=8), True, 0.0) == []
    unverified = Files(FilesConfig("127.0.0.1:7"), lambda: "0" * 12, hops_to=hops.get)
    assert unverified.offer_received(_offer_msg(sealed), False, 0.0) == []
    assert off_the_way.counters["files_carried"] == unverified.counters["files_carried"] == 0


@needs_crypto
def test_the_destination_keeps_plaintext_and_the_key_and_resumes_after_a_restart(tmp_path):
    import json

    from meshchat.filedisk import PARTIAL_DIR, Callbacks, FileDisk
    from meshchat.files import SEALED_CHUNK_BYTES

    content = bytes(random.Random(4).randbytes(10 * SEALED_CHUNK_BYTES + 7))
    offer, hashes, sealed = _sealed(content)
    got: dict = {}
    cb = Callbacks(hashed=None, hash_failed=None, read=lambda fid, i, data, addr: got.__setitem__(i, data),
                   write_failed=lambda fid, i, why: got.__setitem__("failed", why), finished=None,
                   resumed=lambda o, h, have: got.__setitem__("resumed", (o, h, have)))
    disk = FileDisk(str(tmp_path), cb)
    disk._jobs(("meta", offer, hashes))  # the offer as opened: with its key, in the node's data dir
    for i in (0, 1, 2, 7):
        disk._jobs(("write", offer.fid, i, sealed[i], offer.key))
    disk._jobs(("write", offer.fid, 3, sealed[3][:-1] + bytes([sealed[3][-1] ^ 1]), offer.key))
    assert "does not open" in got.pop("failed")
    part = (tmp_path / PARTIAL_DIR / f"{offer.fid}.part").read_bytes()
    assert part[:3 * SEALED_CHUNK_BYTES] == content[:3 * SEALED_CHUNK_BYTES]  # plaintext, at plaintext offsets
    assert json.loads((tmp_path / PARTIAL_DIR / f"{offer.fid}.json").read_text())["key"] == offer.key
    disk._jobs(("read", offer.fid, "", 1, ("127.0.0.1", 1), offer.key))
    assert got[1] == sealed[1]  # served sealed again, as it travelled
    disk._close(offer.fid)
    disk._jobs(("resume",))  # a restart: the chunks on disk are checked sealed against the hash list
    resumed, resumed_hashes, have = got["resumed"]
    assert resumed == offer and resumed_hashes == hashes and have == [0, 1, 2, 7]
