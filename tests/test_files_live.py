"""File sharing on real sockets: nodes in this process, each with its own downloads folder."""

import hashlib
import queue
import random
import time
from pathlib import Path
from typing import List, Optional

import pytest

from meshchat import crypto
from meshchat.files import FileDone, FileFailed, FileOffered, FileProgress
from meshchat.membership import MembershipConfig, PeerUp
from meshchat.node import FileSharing, History, Node, Security
from meshchat.relay import RelayConfig

FAST = MembershipConfig(label="", hello_max_s=0.4)
MEMORY = History(enabled=False)
TIMEOUT_S = 20.0


class FileNode:
    def __init__(self, folder: Path, peers=(), port: int = 0, accept: int = 16 << 20, secure: bool = False,
                 identity: Optional[Path] = None) -> None:
        self.events: "queue.Queue[object]" = queue.Queue()
        self.folder = folder
        self.node = Node(RelayConfig(label=""), "127.0.0.1", port, peers, on_event=self.events.put,
                         membership=FAST, history=MEMORY,
                         security=Security(str(identity)) if secure else None,
                         files=FileSharing(str(folder), accept, 1 << 30)).start()
        self.seen: List[object] = []

    def next(self, kind, timeout: float = TIMEOUT_S, where=lambda e: True):
        deadline = time.monotonic() + timeout
        for e in self.seen:
            if isinstance(e, kind) and where(e):
                self.seen.remove(e)
                return e
        while True:
            try:
                e = self.events.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind.__name__} at {self.node.label} in time") from None
            if isinstance(e, kind) and where(e):
                return e
            self.seen.append(e)

    def stop(self) -> None:
        self.node.stop()


@pytest.fixture
def nodes(tmp_path):
    made: List[FileNode] = []

    def make(n: int, line: bool = True, **kw) -> List[FileNode]:
        for i in range(n):
            peers = [made[-1].node.addr] if made and line else []
            made.append(FileNode(tmp_path / f"n{len(made)}", peers, **kw))
        if len(made) > 1 and line:
            for fn in made[-n:]:
                fn.next(PeerUp)
        return made[-n:]

    yield make
    for fn in made:
        fn.stop()


def a_file(path: Path, size: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def test_a_file_sent_to_all_arrives_at_every_node_with_its_sha256(nodes, tmp_path):
    a, b, c = nodes(3)
    data = a_file(tmp_path / "photo.jpg", 300_000)
    assert a.node.send_file(str(tmp_path / "photo.jpg")) == ""
    mine = a.next(FileOffered)
    for n in (b, c):
        offer = n.next(FileOffered)
        assert offer.offer.sha == hashlib.sha256(data).hexdigest() == mine.offer.sha
        done = n.next(FileDone)
        assert done.sha == offer.offer.sha
        assert Path(done.path).read_bytes() == data
        assert Path(done.path).parent == n.folder and Path(done.path).name == "photo.jpg"
    assert c.next(FileProgress, where=lambda e: e.have == e.size)


def test_a_bad_path_is_a_one_line_error(nodes, tmp_path):
    [a] = nodes(1)
    for path in (str(tmp_path / "nope.txt"), str(tmp_path)):
        error = a.node.send_file(path)
        assert error and "\n" not in error and path in error


def test_an_offer_above_the_limit_waits_for_accept(nodes, tmp_path):
    a, b = nodes(2, accept=1000)
    data = a_file(tmp_path / "big.bin", 5000)
    a.node.send_file(str(tmp_path / "big.bin"))
    offer = b.next(FileOffered)
    assert not offer.fetching
    assert b.node.file_rows()[0]["state"] == "offered"
    assert b.node.accept_file(offer.offer.fid[:6]) == ""
    done = b.next(FileDone)
    assert Path(done.path).read_bytes() == data
    # /accept's first requests are datagrams sent at once, never events shown as "the node stopped".
    assert not [e for e in b.seen if type(e).__name__ == "Unicast"]


def test_files_listed_after_a_cancel_and_a_path_with_a_tilde(nodes, tmp_path, monkeypatch):
    a, b = nodes(2, accept=1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    a_file(tmp_path / "big.bin", 50_000)
    assert a.node.send_file("~/big.bin") == ""  # as a user types it
    offer = b.next(FileOffered)
    assert b.node.accept_file(offer.offer.fid) == ""
    assert b.node.cancel_file(offer.offer.fid) == ""
    rows = b.node.file_rows()  # raised IndexError after a cancel
    assert [r["state"] for r in rows if r["fid"] == offer.offer.fid] == ["failed"]


def test_an_existing_file_is_never_overwritten(nodes, tmp_path):
    a, b = nodes(2)
    (b.folder / "notes.txt").write_bytes(b"mine")
    data = a_file(tmp_path / "notes.txt", 2000)
    a.node.send_file(str(tmp_path / "notes.txt"))
    done = b.next(FileDone)
    assert Path(done.path).name == "notes (1).txt" and Path(done.path).read_bytes() == data
    assert (b.folder / "notes.txt").read_bytes() == b"mine"


def test_the_sender_stopped_after_another_has_it_does_not_stop_the_others(nodes, tmp_path):
    a, b = nodes(2)
    [c] = nodes(1, accept=1000)  # a - b - c: c waits for /accept
    data = a_file(tmp_path / "x.bin", 200_000)
    a.node.send_file(str(tmp_path / "x.bin"))
    b.next(FileDone)
    offer = c.next(FileOffered)
    a.stop()  # the origin is gone; b has the whole file
    assert c.node.accept_file(offer.offer.fid) == ""
    done = c.next(FileDone)
    assert Path(done.path).read_bytes() == data


def _offer_for(path: Path, name: str, src: str):
    from meshchat.files import CHUNK_BYTES, Offer

    data = path.read_bytes()
    hashes = b"".join(hashlib.sha256(data[i:i + CHUNK_BYTES]).digest() for i in range(0, len(data), CHUNK_BYTES))
    return Offer("%016x" % random.Random(name).getrandbits(64), name, len(data), hashlib.sha256(data).hexdigest(),
                 hashlib.sha256(hashes).hexdigest(), CHUNK_BYTES, src), hashes


@pytest.mark.parametrize("offered", ["../../etc/passwd", "C:\\x\\evil"])
def test_a_hostile_name_lands_as_a_safe_name_inside_downloads(nodes, tmp_path, offered):
    a, b = nodes(2)
    data = a_file(tmp_path / "payload", 3000)
    offer, hashes = _offer_for(tmp_path / "payload", offered, a.node.label)
    a.node._file_hashed(offer, hashes, str(tmp_path / "payload"))  # as if the files thread had hashed it
    done = b.next(FileDone)
    landed = Path(done.path)
    assert landed.parent == b.folder and landed.name in ("passwd", "evil")
    assert landed.read_bytes() == data


def test_a_receiver_restarted_mid_transfer_resumes_from_what_is_on_disk(nodes, tmp_path):
    import json

    from meshchat.files import CHUNK_BYTES
    from meshchat.filedisk import PARTIAL_DIR

    [a] = nodes(1)
    data = a_file(tmp_path / "big.bin", 100 * CHUNK_BYTES)
    offer, hashes = _offer_for(tmp_path / "big.bin", "big.bin", a.node.label)
    # What a receiver stopped half way leaves: the offer and hash list, and the first 60 chunks.
    partial = tmp_path / "b" / PARTIAL_DIR
    partial.mkdir(parents=True)
    (partial / f"{offer.fid}.part").write_bytes(data[:60 * CHUNK_BYTES] + bytes(5))
    (partial / f"{offer.fid}.json").write_text(json.dumps(dict(offer._asdict(), hashes=hashes.hex())))
    with a.node._lock:
        a.node.files.share(offer, hashes, str(tmp_path / "big.bin"), a.node._clock())
    b = FileNode(tmp_path / "b", [a.node.addr])
    try:
        done = b.next(FileDone)
        assert Path(done.path).read_bytes() == data
        assert b.node.stats()["file_pieces_received"] == 40  # only what was missing
    finally:
        b.stop()
