"""The bulk socket (node.py): file link datagrams in a kernel queue of their own, so chat never waits
behind chunks. Membership's ``fport`` with plain values, the drain policy with fake sockets, and real
nodes on loopback: who uses which socket, and what the bulk socket refuses."""

import queue
import random
import socket
import time
from collections import deque
from pathlib import Path

import pytest

from meshchat.files import CHUNK_BYTES, FileDone, FileOffered
from meshchat.membership import PeerUp
from meshchat.node import BULK_SLICE, DRAIN_BATCH, FileSharing, Node, serve_bulk
from meshchat.relay import Display, RelayConfig
from meshchat.wire import Message, encode

from test_files_live import FAST, MEMORY, TIMEOUT_S, FileNode, a_file
from test_membership import WALL, Net, addr, label


# -- membership: the HELLO field --------------------------------------------------------------------

def full_hello(**extra):
    x = dict(mesh="meshchat", tok="abcdef0123456789", caps=["HELLO", "FILES"], **extra)
    return Message("h9", WALL, 1, "HELLO", label(2), label(1), "", x)


def test_a_full_hello_announces_our_bulk_port_and_neighbours_keep_theirs():
    net = Net(2, configured=[(1, 2), (2, 1)], fport=4242)
    net.advance(1.0)
    m1 = net.ms[1]
    assert m1.neighbours[addr(2)].fport == 4242 and m1.bulk_ports() == {addr(2): 4242}
    assert m1.counters["fport_invalid"] == 0


@pytest.mark.parametrize("bad", [0, -1, 65536, 10 ** 20, "4242", True, 1.5, None, [4242]])
def test_a_bad_fport_is_dropped_and_counted_and_the_neighbour_gets_files_on_its_main_address(bad):
    net = Net(2, configured=[(1, 2), (2, 1)], fport=4242)
    net.advance(1.0)
    m1 = net.ms[1]
    version = m1.version
    _, why = m1.hello_received(full_hello(fport=bad), addr(2), 100, net.now, WALL)
    assert why == ""
    assert m1.counters["fport_invalid"] == 1
    assert m1.neighbours[addr(2)].fport == 0 and m1.bulk_ports() == {}
    assert m1.version > version  # the node rebuilds its maps


def test_a_full_hello_without_fport_means_none_and_a_bare_one_changes_nothing():
    net = Net(2, configured=[(1, 2), (2, 1)], fport=4242)
    net.advance(1.0)
    m1 = net.ms[1]
    bare = full_hello()
    del bare.extra["caps"]  # a bare HELLO (no caps) says nothing of the bulk socket
    m1.hello_received(bare, addr(2), 100, net.now, WALL)
    assert m1.bulk_ports() == {addr(2): 4242}
    m1.hello_received(full_hello(), addr(2), 100, net.now, WALL)  # it restarted as an older meshchat
    assert m1.bulk_ports() == {} and m1.counters["fport_invalid"] == 0


def test_only_neighbours_that_are_up_have_a_bulk_port():
    net = Net(2, configured=[(1, 2), (2, 1)], fport=4242)
    net.advance(1.0)
    net.down.add(2)
    net.advance(30.0)
    assert not net.ms[1].neighbours[addr(2)].up and net.ms[1].bulk_ports() == {}


def test_a_bulk_path_given_up_is_given_up_on_both_sides():
    net = Net(2, configured=[(1, 2), (2, 1)], fport=4242)
    net.advance(1.0)
    m1, m2 = net.ms[1], net.ms[2]
    assert m1.give_up_bulk(addr(2), net.now) and not m1.give_up_bulk(addr(2), net.now)
    assert m1.bulk_ports() == {} and m1.counters["bulk_given_up"] == 1
    net.advance(1.0)  # 1's next full HELLO to 2 goes at once, without fport
    assert m2.bulk_ports() == {}
    m1.hello_received(full_hello(fport=4242), addr(2), 100, net.now, WALL)
    assert m1.bulk_ports() == {}  # 2 still announcing it changes nothing: not for this neighbour


# -- the drain policy, with fake sockets ----------------------------------------------------------

class FakeSockets:
    """A main and a bulk queue; handling bulk datagram ``k`` makes ``arrive[k]`` come on the main one."""

    def __init__(self, bulk: int, arrive=None, main=()) -> None:
        self.main = deque(main)
        self.bulk = deque(f"chunk{k}" for k in range(bulk))
        self.arrive = arrive or {}
        self.log = []

    def main_waiting(self) -> bool:
        return bool(self.main)

    def drain_main(self) -> None:
        while self.main:
            self.log.append(self.main.popleft())

    def drain_bulk(self, limit: int) -> int:
        n = 0
        while n < limit and self.bulk:
            item = self.bulk.popleft()
            self.log.append(item)
            n += 1
            if item in self.arrive:
                self.main.append(self.arrive[item])
        return n

    def serve(self) -> int:
        return serve_bulk(self.main_waiting, self.drain_main, self.drain_bulk)


def test_chat_waits_behind_one_slice_of_chunks_at_most():
    rng = random.Random(12)
    arrive = {f"chunk{k}": f"chat{k}" for k in rng.sample(range(200), 12)}
    s = FakeSockets(200, arrive, main=["chat-first"])
    assert s.serve() == 200
    assert s.log[0] == "chat-first"  # what waited on the main socket went before any chunk
    for k, chat in ((int(c[5:]), m) for c, m in arrive.items()):
        behind = s.log.index(chat) - s.log.index(f"chunk{k}") - 1
        assert 0 <= behind < BULK_SLICE, (chat, behind)
    assert sorted(x for x in s.log if x.startswith("chunk")) == sorted(f"chunk{k}" for k in range(200))


def test_the_bulk_turn_ends_when_it_is_empty_or_its_budget_is_spent():
    s = FakeSockets(0)
    assert s.serve() == 0 and s.log == []
    s = FakeSockets(3 * DRAIN_BATCH)
    assert s.serve() == DRAIN_BATCH and len(s.bulk) == 2 * DRAIN_BATCH  # the timers and the waker get a look


# -- real nodes on loopback -------------------------------------------------------------------------

class BulkNode(FileNode):
    def __init__(self, folder: Path, peers=(), bulk: bool = True) -> None:
        self.events = queue.Queue()
        self.folder = folder
        self.node = Node(RelayConfig(label=""), "127.0.0.1", 0, peers, on_event=self.events.put,
                         membership=FAST, history=MEMORY,
                         files=FileSharing(str(folder), 16 << 20, 1 << 30, bulk=bulk)).start()
        self.seen = []


@pytest.fixture
def pair(tmp_path):
    made = []

    def make(b_bulk: bool = True):
        a = BulkNode(tmp_path / "a")
        b = BulkNode(tmp_path / "b", [a.node.addr], bulk=b_bulk)
        made.extend((a, b))
        a.next(PeerUp)
        b.next(PeerUp)
        return a, b

    yield make
    for n in made:
        n.stop()


def spy(node: Node) -> "queue.Queue[bytes]":
    """Every datagram the relay is handed from now on (either socket), once it has been handled."""
    got: "queue.Queue[bytes]" = queue.Queue()
    relay = node.relay
    inner = relay.datagram_received

    def recording(data, addr, now, wall):
        try:
            return inner(data, addr, now, wall)
        finally:
            got.put(bytes(data))

    relay.datagram_received = recording
    return got


def wait_for(got: "queue.Queue[bytes]", data: bytes) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            if got.get(timeout=max(deadline - time.monotonic(), 0.001)) == data:
                return
        except queue.Empty:
            raise AssertionError("the datagram never reached the relay") from None


def test_a_file_between_two_nodes_goes_over_their_bulk_sockets(pair, tmp_path):
    a, b = pair()
    size = 60 * CHUNK_BYTES
    a_file(tmp_path / "f.bin", size)
    assert a.node.send_file(str(tmp_path / "f.bin")) == ""
    b.next(FileDone)
    sa, sb = a.node.stats(), b.node.stats()
    assert sb["bulk_received"] >= size // CHUNK_BYTES and sa["bulk_sent"] >= size // CHUNK_BYTES  # every chunk
    assert sa["bulk_received"] == 0 and sb["bulk_sent"] == 0  # requests and FHAVEs: few, on the main sockets
    for s in (sa, sb):
        assert s["bulk_dropped_stranger"] == 0 and s["dropped_bulk_kind"] == 0 and s["bulk_given_up"] == 0
        assert s["handled"] + sum(v for k, v in s.items() if k.startswith("dropped_")) == s["received"]


def test_a_stranger_and_a_chat_line_on_the_bulk_socket_are_dropped_and_counted(pair):
    a, b = pair()
    got = spy(a.node)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.1", 0))
        chat = encode(Message("bulkchat1", round(time.time(), 3), 3, "CHAT", b.node.label, "", "over bulk", {}))
        stranger.sendto(chat, a.node.bulk_addr)  # not a neighbour's bulk address: never reaches the relay
        b.node._bulk_sock.sendto(chat, a.node.bulk_addr)  # b's bulk address, but a chat line
        wait_for(got, chat)  # one queue: the stranger's copy was taken first
    s = a.node.stats()
    assert s["bulk_dropped_stranger"] == 1 and s["bulk_received"] == 1 and s["dropped_bulk_kind"] == 1
    assert not [e for e in list(a.events.queue) + a.seen if isinstance(e, Display)]


def test_an_older_neighbour_without_a_bulk_socket_still_gets_files_on_the_main_socket(pair, tmp_path):
    a, b = pair(b_bulk=False)
    assert not hasattr(b.node, "bulk_addr")
    a_file(tmp_path / "f.bin", 20 * CHUNK_BYTES)
    assert a.node.send_file(str(tmp_path / "f.bin")) == ""
    assert b.next(FileOffered).fetching
    done = b.next(FileDone)
    assert Path(done.path).read_bytes() == (tmp_path / "f.bin").read_bytes()
    for n in (a, b):
        s = n.node.stats()
        assert s["bulk_sent"] == 0 and s["bulk_received"] == 0


def test_a_bulk_path_that_does_not_work_is_given_up_and_the_file_still_comes(tmp_path):
    """b hears nothing on its bulk socket (as behind a NAT that changes ports, or a firewall): its
    requests get no piece back there, so it gives a's bulk socket up and tells a (no fport in its
    HELLOs to a): the pieces come to b's main socket."""
    a = BulkNode(tmp_path / "a")
    b_node = Node(RelayConfig(label=""), "127.0.0.1", 0, [a.node.addr], on_event=queue.Queue().put,
                  membership=FAST, history=MEMORY, files=FileSharing(str(tmp_path / "b"), 16 << 20, 1 << 30))
    b = BulkNode.__new__(BulkNode)
    b.events, b.folder, b.seen, b.node = queue.Queue(), tmp_path / "b", [], b_node
    b_node._on_event = b.events.put
    maps = b_node._bulk_maps

    def deaf() -> None:  # every datagram on b's bulk socket is from a stranger
        maps()
        b_node._bulk_from = {}

    b_node._bulk_maps = deaf
    b_node.bulk_proof_s = 0.5
    b_node.start()
    try:
        a.next(PeerUp)
        b.next(PeerUp)
        data = a_file(tmp_path / "f.bin", 40 * CHUNK_BYTES)
        assert a.node.send_file(str(tmp_path / "f.bin")) == ""
        done = b.next(FileDone)
        assert Path(done.path).read_bytes() == data
        sb = b.node.stats()
        assert sb["bulk_given_up"] == 1 and sb["bulk_dropped_stranger"] > 0
        assert b.node.membership.bulk_ports() == {}
        assert a.node.stats()["bulk_sent"] > 0  # it did try
        assert a.node.membership.neighbours[b.node.addr].fport == 0  # b's HELLOs no longer announce it
    finally:
        b.stop()
        a.stop()
