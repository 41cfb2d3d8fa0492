"""Real nodes on 127.0.0.1 in this process, each bound to a free port.

Each ``Probe`` keeps two queues: the node's events for the user, and one
item per datagram its relay has finished with, so tests wait for "node 3
has handled 2 datagrams" instead of sleeping.
"""

import queue
import time
from typing import Dict, List

from meshchat.node import Node
from meshchat.relay import Display, Relay, RelayConfig

TIMEOUT_S = 5.0


def _get(q: "queue.Queue[object]", deadline: float, what: str):
    try:
        return q.get(timeout=max(deadline - time.monotonic(), 0.001))
    except queue.Empty:
        raise AssertionError(f"no {what} in time") from None


class Probe:
    """One node, what it reported, and how many datagrams it has processed."""

    def __init__(self, **config):
        self.events: "queue.Queue[object]" = queue.Queue()
        self.processed: "queue.Queue[int]" = queue.Queue()
        processed = self.processed

        class TracingRelay(Relay):
            def datagram_received(self, *args):
                try:
                    return super().datagram_received(*args)
                finally:
                    processed.put(1)

        self.node = Node(RelayConfig(label="", **config), "127.0.0.1", 0,
                         on_event=self.events.put, relay_factory=TracingRelay)

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

    def shown(self, count: int) -> List[str]:
        return [self.next(Display).message.body for _ in range(count)]

    def wait_processed(self, count: int, timeout=TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for i in range(count):
            _get(self.processed, deadline, f"datagram {i + 1} of {count} at {self.label}")

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

    def __init__(self, n: int, edges=(), **config):
        self.probes: Dict[int, Probe] = {}
        try:
            for i in range(1, n + 1):
                self.probes[i] = Probe(**config)
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

    def stop(self) -> None:
        for p in self.probes.values():
            p.node.stop()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
