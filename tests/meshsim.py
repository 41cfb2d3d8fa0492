"""An in-memory mesh of sans-I/O relays joined by a fake link, for deterministic tests."""

import json
import random
from collections import deque
from typing import Dict, List, Tuple

from meshchat.relay import Display, Pong, Relay, RelayConfig, Send


def addr_of(i: int) -> Tuple[str, int]:
    return ("10.0.0.%d" % i, 9000)


def label_of(i: int) -> str:
    return "10.0.0.%d:9000" % i


class SimMesh:
    """Relays 1..n; ``edges`` lists neighbour pairs. Time stands still unless moved."""

    def __init__(self, n: int, edges, wall: float = 1_000_000.0, **config):
        self.now = 100.0
        self.wall = wall
        self.relays: Dict[int, Relay] = {}
        self.shown: Dict[int, List] = {i: [] for i in range(1, n + 1)}
        self.pongs: Dict[int, List[Pong]] = {i: [] for i in range(1, n + 1)}
        self.datagrams = 0  # sent by any relay, to the mesh or outside it
        neighbours = {i: [] for i in range(1, n + 1)}
        for a, b in edges:
            neighbours[a].append(addr_of(b))
            neighbours[b].append(addr_of(a))
        counter = iter(range(10**9))
        for i in range(1, n + 1):
            cfg = RelayConfig(label=label_of(i), **config)
            self.relays[i] = Relay(cfg, neighbours[i], new_mid=lambda i=i: "m%d-%d" % (i, next(counter)))
        self._queue = deque()

    def _post(self, sender: int, actions) -> None:
        for action in actions:
            if isinstance(action, Send):
                for addr in action.addrs:
                    self._queue.append((sender, addr, action.data))
            elif isinstance(action, Display):
                self.shown[sender].append(action.message)
            elif isinstance(action, Pong):
                self.pongs[sender].append(action)

    def originate(self, i: int, body: str = "hi", dst: str = "", kind: str = "CHAT"):
        messages, sends = self.relays[i].originate(kind, body, dst, self.now, self.wall)
        self._post(i, sends)
        return messages

    def inject(self, i: int, data: bytes, from_addr=("10.9.9.9", 9000)):
        self._post(i, self.relays[i].datagram_received(data, from_addr, self.now, self.wall))

    def run(self) -> None:
        """Deliver every datagram in flight, breadth first, until the mesh is quiet."""
        while self._queue:
            sender, addr, data = self._queue.popleft()
            self.datagrams += 1
            target = int(addr[0].rsplit(".", 1)[1])
            if addr != addr_of(target) or target not in self.relays:
                continue  # to an address outside the mesh (a stranger that sent something)
            actions = self.relays[target].datagram_received(data, addr_of(sender), self.now, self.wall)
            self._post(target, actions)

    def bodies(self, i: int) -> List[str]:
        return [m.body for m in self.shown[i]]


def line(n: int):
    return [(i, i + 1) for i in range(1, n)]


def full(n: int):
    return [(a, b) for a in range(1, n + 1) for b in range(a + 1, n + 1)]


def connected(links) -> bool:
    """Whether neighbour sets ``links`` (node i's neighbours at index i) join every node."""
    seen, todo = {0}, [0]
    while todo:
        for b in links[todo.pop()]:
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return len(seen) == len(links)


class MemberMesh:
    """Relays 1..n with membership, on a perfect network in virtual time: HELLOs, presence, routes.

    ``edges`` are configured peers (both ways); ``dead`` nodes neither send nor receive. Every
    datagram that crosses the network is counted by kind in ``sent_kinds``.
    """

    def __init__(self, n: int, edges, seed: int = 1, wall: float = 1_000_000.0, **config):
        from meshchat.membership import Membership, MembershipConfig

        self.now = 100.0
        self.wall = wall
        self.relays: Dict[int, Relay] = {}
        self.shown: Dict[int, List] = {i: [] for i in range(1, n + 1)}
        self.events: Dict[int, List] = {i: [] for i in range(1, n + 1)}
        self.dead: set = set()
        self.sent_kinds: Dict[str, int] = {}
        self.carried: List[Tuple[int, int, str]] = []  # (from, to, kind) of every datagram delivered
        neighbours = {i: [] for i in range(1, n + 1)}
        for a, b in edges:
            neighbours[a].append(addr_of(b))
            neighbours[b].append(addr_of(a))
        counter = iter(range(10**9))
        rng = random.Random(seed)
        for i in range(1, n + 1):
            new_mid = (lambda i=i: "m%d-%d" % (i, next(counter)))
            m = Membership(MembershipConfig(label=label_of(i)), secret=b"k%d" % i, new_mid=new_mid,
                           rng=random.Random(rng.random()))
            self.relays[i] = Relay(RelayConfig(label=label_of(i), **config), neighbours[i], new_mid=new_mid,
                                   membership=m)
        self._queue = deque()

    def _post(self, sender: int, actions) -> None:
        from meshchat.membership import Originate

        for action in actions:
            if isinstance(action, Send):
                for addr in action.addrs:
                    self._queue.append((sender, addr, action.data))
            elif isinstance(action, Display):
                self.shown[sender].append(action.message)
            elif isinstance(action, Originate):
                _, sends = self.relays[sender].originate(action.kind, action.body, "", self.now, self.wall,
                                                         action.extra, action.ttl)
                self._post(sender, sends)
            else:
                self.events[sender].append(action)

    def originate(self, i: int, body: str = "hi", dst: str = "", kind: str = "CHAT"):
        messages, sends = self.relays[i].originate(kind, body, dst, self.now, self.wall)
        self._post(i, sends)
        return messages

    def run(self) -> None:
        while self._queue:
            sender, addr, data = self._queue.popleft()
            target = int(addr[0].rsplit(".", 1)[1])
            if sender in self.dead or target in self.dead or target not in self.relays:
                continue
            kind = json.loads(data)["kind"]
            self.sent_kinds[kind] = self.sent_kinds.get(kind, 0) + 1
            self.carried.append((sender, target, kind))
            self._post(target, self.relays[target].datagram_received(data, addr_of(sender), self.now, self.wall))

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move time on, firing every node's timers (HELLOs, liveness, presence) as they fall due."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += step
            for i, r in self.relays.items():
                if i not in self.dead:
                    self._post(i, r.timers_due(self.now, self.wall))
            self.run()

    def flooded(self) -> int:
        """Datagrams carried so far that were not HELLOs."""
        return sum(v for k, v in self.sent_kinds.items() if k != "HELLO")


def random_edges(n: int, degree: int, seed: int):
    """A connected random graph on 1..n: a ring plus seeded chords up to about ``degree`` each."""
    rng = random.Random(seed)
    edges = {(i, i % n + 1) if i < i % n + 1 else (i % n + 1, i) for i in range(1, n + 1)}
    deg = {i: 2 for i in range(1, n + 1)}
    for _ in range(n * degree):
        a, b = rng.sample(range(1, n + 1), 2)
        e = (min(a, b), max(a, b))
        if e not in edges and deg[a] < degree and deg[b] < degree:
            edges.add(e)
            deg[a] += 1
            deg[b] += 1
    return sorted(edges)
