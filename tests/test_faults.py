"""Network faults: each error a socket can raise is counted, and nothing stops relaying."""

import errno
import socket
import threading

import pytest

from meshchat import cli
from meshchat.node import Node

from nodes import Cluster
from ports import free_ports

WSAENETRESET = 10052
WSAECONNRESET = 10054

SEND_ERRORS = [
    ConnectionResetError(errno.ECONNRESET, "reset"),
    OSError(WSAENETRESET, "WSAENETRESET"),
    OSError(errno.EHOSTUNREACH, "no route to host"),
    OSError(errno.ENETUNREACH, "network unreachable"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    OSError(errno.ENOBUFS, "no buffer space"),
    BlockingIOError(errno.EAGAIN, "would block"),
    OSError(errno.EMSGSIZE, "message too long"),
    socket.gaierror(socket.EAI_NONAME, "name does not resolve"),
]


class Faulty:
    """Wraps a node's socket: sends to ``bad`` raise ``error``; the first recvfrom raises ``recv_error``."""

    def __init__(self, sock, bad=None, error=None, recv_error=None):
        self._sock, self.bad, self.error, self.recv_error = sock, bad, error, recv_error
        self.lock = threading.Lock()

    def sendto(self, data, addr):
        if addr == self.bad:
            raise self.error
        return self._sock.sendto(data, addr)

    def recvfrom(self, size):
        with self.lock:
            error, self.recv_error = self.recv_error, None
        if error is not None:
            raise error
        return self._sock.recvfrom(size)


BAD_PEER = ("127.0.0.1", 9)


@pytest.mark.parametrize("error", SEND_ERRORS, ids=lambda e: type(e).__name__ + str(e.errno))
def test_a_failing_send_is_counted_and_the_other_peers_still_get_it(error):
    wrap = lambda sock: Faulty(sock, bad=BAD_PEER, error=error)  # noqa: E731
    with Cluster(3, [(1, 2)], wrap_socket=wrap) as c:
        # Node 2 tries the bad peer before node 3, so its errors are counted by the time 3 shows.
        c[2].node.add_peer(BAD_PEER)
        c[2].node.add_peer(c[3].node.addr)
        c[3].node.add_peer(c[2].node.addr)
        c[1].node.add_peer(BAD_PEER)
        for i in range(3):
            c[1].node.say(f"m{i}")
        assert c[3].shown(3) == ["m0", "m1", "m2"]
        assert c[1].node.stats()["send_errors"] == 3 and c[2].node.stats()["send_errors"] == 3


@pytest.mark.parametrize("error", [ConnectionResetError(WSAECONNRESET, "WSAECONNRESET"),
                                   OSError(WSAENETRESET, "WSAENETRESET"),
                                   OSError(errno.ENOBUFS, "no buffer space")],
                         ids=["connreset", "netreset", "nobufs"])
def test_a_failing_receive_is_counted_and_the_socket_thread_goes_on(error):
    wrap = lambda sock: Faulty(sock, recv_error=error)  # noqa: E731
    with Cluster(2, [(1, 2)], wrap_socket=wrap) as c:
        c[1].node.say("first")
        c[1].node.say("second")
        shown = c[2].shown(1)
        assert shown in (["first"], ["second"]), "one datagram may be lost to the fault, no more"
        c[1].node.say("third")
        assert c[2].shown(1) in (["second"], ["third"])
        assert c[2].node.stats()["recv_errors"] == 1


def test_a_dead_worker_thread_makes_the_cli_exit_nonzero(monkeypatch, capsys):
    def explode(self, *args):
        raise RuntimeError("bug in the socket thread")

    # Not in the relay: whatever one datagram makes raise there is contained to it.
    monkeypatch.setattr(Node, "_datagrams_ready", explode)
    [port] = free_ports(1)
    result = []
    runner = threading.Thread(target=lambda: result.append(cli.main(["--port", str(port), "--headless",
                                                                      "--json"])))
    runner.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # Until the node is up the datagram may be refused; send until it has an answer.
            for _ in range(200):
                s.sendto(b"{}", ("127.0.0.1", port))
                runner.join(0.05)
                if not runner.is_alive():
                    break
    finally:
        runner.join(5)
    assert result == [1]
    out = capsys.readouterr().out
    assert '"event": "error"' in out and "meshchat-net" in out
