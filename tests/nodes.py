"""Real nodes on 127.0.0.1 in this process, each bound to a free port.

Each ``Probe`` queues its node's events for the user; a ``Cluster`` also
queues one item per datagram any of its relays has finished with, so tests
wait for "nothing is in flight any more" instead of sleeping.
"""

import queue
import time
from typing import Callable, Dict, List, Optional

from meshchat.node import Node
from meshchat.relay import Display, Relay, RelayConfig

TIMEOUT_S = 5.0


def _get(q: "queue.Queue[object]", deadline: float, what: str):
    try:
        return q.get(timeout=max(deadline - time.monotonic(), 0.001))
    except queue.Empty:
        raise AssertionError(f"no {what} in time") from None


class Probe:
    """One node and the events it reported."""

    def __init__(self, processed: "Optional[queue.Queue[str]]" = None, wrap_socket=lambda s: s,
                 membership=None, discovery=None, port=0, history=None, **config):
        self.events: "queue.Queue[object]" = queue.Queue()
        self.processed: "queue.Queue[str]" = processed or queue.Queue()
        processed = self.processed

        class TracingRelay(Relay):
            def datagram_received(self, *args):
                try:
                    return super().datagram_received(*args)
                finally:
                    processed.put(self.label)

        self.node = Node(RelayConfig(label="", **config), "127.0.0.1", port,
                         on_event=self.events.put, relay_factory=TracingRelay, wrap_socket=wrap_socket,
                         membership=membership, discovery=discovery, history=history)

    @property
    def label(self) -> str:
        return self.node.label

    def next(self, kind=Display, timeout=TIMEOUT_S):
        """The next event of ``kind``, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            event = _get(self.events, deadline, f"{kind.__name__} at {self.label}")
            if isinstance(event, kind):
                return event

    def wait_for_body(self, body: str, timeout=TIMEOUT_S) -> None:
        """Skip displayed messages until one with ``body``."""
        deadline = time.monotonic() + timeout
        while self.next(Display, max(deadline - time.monotonic(), 0.001)).message.body != body:
            pass

    def shown(self, count: int) -> List[str]:
        return [self.next(Display).message.body for _ in range(count)]

    def pending(self) -> List[object]:
        """Events queued now, without waiting."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out


class Cluster:
    """Probes 1..n joined by ``edges`` (pairs of indexes), started, stopped on exit."""

    def __init__(self, n: int, edges=(), wrap_socket=lambda s: s, membership=None, discovery=None, history=None,
                 **config):
        self.probes: Dict[int, Probe] = {}
        self.processed: "queue.Queue[str]" = queue.Queue()  # a label per datagram any node finished
        try:
            for i in range(1, n + 1):
                self.probes[i] = Probe(self.processed, wrap_socket, membership, discovery, history=history, **config)
            for a, b in edges:
                self.probes[a].node.add_peer(self.probes[b].node.addr)
                self.probes[b].node.add_peer(self.probes[a].node.addr)
            for p in self.probes.values():
                p.node.start()
        except BaseException:
            self.stop()
            raise

    def __getitem__(self, i: int) -> Probe:
        return self.probes[i]

    def wait_until(self, condition: Callable[[], bool], timeout=TIMEOUT_S) -> None:
        """Check ``condition`` after each datagram any node processes, until it holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            _get(self.processed, deadline, "datagram that makes the condition hold")

    def quiet(self) -> bool:
        """Every datagram sent has been received: nothing is in flight (on loopback, nothing is lost)."""
        stats = [p.node.stats() for p in self.probes.values()]
        return sum(s["sent"] - s["send_errors"] for s in stats) == sum(s["received"] for s in stats)

    def stop(self) -> None:
        for p in self.probes.values():
            p.node.stop()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
