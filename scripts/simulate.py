#!/usr/bin/env python3
"""Simulate a meshchat mesh of 100 to 10,000 nodes in virtual time, running the real sans-I/O modules.

Each node is a real ``meshchat.relay.Relay`` with its ``Membership`` and ``Delivery`` (acks, gap
repair), wired as ``meshchat.node.Node`` wires them; only the network and the clock are simulated:
one heap of timed events (datagram arrivals, each node's next timer, the reaper, the messages and
the churn), seeded per-link loss and latency with jitter, and nodes that leave and come back.

    python scripts/simulate.py                          # 1,000 nodes, random 4-regular, 100 messages
    python scripts/simulate.py --nodes 100 300 1000     # the same at several sizes, and how it grows
    python scripts/simulate.py --topology small-world --loss 0.2 --churn 0.05
    python scripts/simulate.py --quick                  # a small run, for CI
    python scripts/simulate.py --json                   # one JSON object instead of tables

A run: the HELLO handshakes (real, in virtual time) for ``--settle`` seconds, so each link's
HELLO interval has backed off to its steady 9 s; an idle window (``--idle`` s) measures the
overhead of a settled mesh; then ``--messages`` broadcasts at ``--rate`` a second from random
nodes (while churn takes nodes down and back); then ``--drain`` seconds for repair to finish.

Start-up shortcut (``--startup shortcut``, the default above 500 nodes): in a real start every
node floods a PRESENCE as its links come up (N floods of about N x degree datagrams: 400 million
at 10,000 nodes). The shortcut skips those start-up floods: neighbours are proved by real HELLO
handshakes, presence then runs at the interval a settled mesh uses (``15 s x members``, at most an
hour) from a random phase, and each origin's ttl is what the adaptive ttl of a settled mesh gives
(its eccentricity + 2, at most ``--max-ttl``). ``--startup real`` runs the start-up floods too.

Deterministic for a seed (and independent of PYTHONHASHSEED). The node model is pluggable:
``MODELS`` maps a name (``--model``) to a function that builds one node; a new relaying scheme
(lazy push, say) registers itself there and every figure here applies to it.
"""

import argparse
import gc
import heapq
import json
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from meshchat.delivery import CAPS as DELIVERY_CAPS  # noqa: E402
from meshchat.delivery import Delivery, DeliveryConfig  # noqa: E402
from meshchat.repair import ServeSince  # noqa: E402
from meshchat.membership import (CAPS as MEMBERSHIP_CAPS, MAX_MEMBERS, PRESENCE_MAX_S, PRESENCE_MIN_S,  # noqa: E402
                                 PRESENCE_PER_MEMBER_S, Membership, MembershipConfig, Originate)
from meshchat.lazypush import CAP as LAZY_CAP  # noqa: E402
from meshchat.relay import Display, Relay, RelayConfig, Send  # noqa: E402

WALL0 = 1_700_000_000.0  # the wall clock at virtual time 0 (every node's clock agrees)
REAP_INTERVAL_S = 5.0  # as node.REAP_INTERVAL_S: the reaper's expire() round
SHORTCUT_ABOVE = 500  # --startup auto: the shortcut above this many nodes
SIZE_SAMPLE = 3  # nodes whose state is measured in bytes (a deep walk: slow on 10,000)
INF = math.inf

# Event tags (the fourth item of a heap entry; >= 0 is a datagram's sender).
_TIMER, _REAP, _SAY, _DOWN, _UP = -1, -2, -3, -4, -5


# -- topologies -----------------------------------------------------------------------------------

def connected(links: Sequence[Sequence[int]]) -> bool:
    """Whether neighbour lists ``links`` (node i's at index i) join every node."""
    if not links:
        return True
    seen = bytearray(len(links))
    seen[0] = 1
    todo = [0]
    while todo:
        for b in links[todo.pop()]:
            if not seen[b]:
                seen[b] = 1
                todo.append(b)
    return all(seen)


def distances(links: Sequence[Sequence[int]], src: int) -> List[int]:
    """Hops from ``src`` to every node (-1: unreachable), breadth first."""
    dist = [-1] * len(links)
    dist[src] = 0
    frontier = [src]
    d = 0
    while frontier:
        d += 1
        nxt = []
        for a in frontier:
            for b in links[a]:
                if dist[b] < 0:
                    dist[b] = d
                    nxt.append(b)
        frontier = nxt
    return dist


def _as_lists(n: int, edges) -> List[List[int]]:
    links: List[List[int]] = [[] for _ in range(n)]
    for a, b in sorted(edges):
        links[a].append(b)
        links[b].append(a)
    return links


def random_regular(n: int, degree: int, rng: random.Random) -> List[List[int]]:
    """A connected simple graph where every node has ``degree`` neighbours (n x degree even).

    Stubs paired at random, then each self-loop or double edge swapped away with a random other
    pair (the pairing model with switchings): fast at 10,000 nodes, and uniform enough here."""
    if degree >= n or (n * degree) % 2:
        raise ValueError(f"no {degree}-regular graph on {n} nodes")
    for _ in range(100):
        stubs = [i for i in range(n) for _ in range(degree)]
        rng.shuffle(stubs)
        pairs = [[stubs[k], stubs[k + 1]] for k in range(0, len(stubs), 2)]
        count: Dict[Tuple[int, int], int] = {}
        for a, b in pairs:
            key = (a, b) if a < b else (b, a)
            count[key] = count.get(key, 0) + 1

        def bad(p) -> bool:
            key = (p[0], p[1]) if p[0] < p[1] else (p[1], p[0])
            return p[0] == p[1] or count[key] > 1

        for _ in range(100 * len(pairs)):
            wrong = [k for k, p in enumerate(pairs) if bad(p)]
            if not wrong:
                break
            for k in wrong:
                if not bad(pairs[k]):
                    continue
                j = rng.randrange(len(pairs))
                p, q = pairs[k], pairs[j]
                new1, new2 = (p[0], q[1]), (q[0], p[1])
                if new1[0] == new1[1] or new2[0] == new2[1]:
                    continue
                for a, b in (p, q):
                    count[(a, b) if a < b else (b, a)] -= 1
                for a, b in (new1, new2):
                    key = (a, b) if a < b else (b, a)
                    count[key] = count.get(key, 0) + 1
                pairs[k], pairs[j] = list(new1), list(new2)
        else:
            continue
        links = _as_lists(n, {(min(a, b), max(a, b)) for a, b in pairs})
        if connected(links):
            return links
    raise RuntimeError("no connected random regular graph found")


def small_world(n: int, degree: int, rewire: float, rng: random.Random) -> List[List[int]]:
    """Watts-Strogatz: a ring where each node joins its ``degree`` nearest, each edge rewired to a
    random node with probability ``rewire``; redrawn until connected."""
    half = degree // 2
    if half < 1 or degree >= n:
        raise ValueError("small world needs 2 <= degree < nodes")
    for _ in range(100):
        edges = set()
        for i in range(n):
            for k in range(1, half + 1):
                j = (i + k) % n
                edges.add((min(i, j), max(i, j)))
        for a, b in sorted(edges):
            if rng.random() < rewire:
                c = rng.randrange(n)
                e = (min(a, c), max(a, c))
                if c != a and e not in edges:
                    edges.discard((a, b))
                    edges.add(e)
        links = _as_lists(n, edges)
        if connected(links):
            return links
    raise RuntimeError("no connected small-world graph found")


def lan_clusters(n: int, size: int, bridges: int, rng: random.Random) -> List[List[int]]:
    """LANs of ``size`` nodes, each a full mesh (discovery on one LAN finds everyone there), the
    LANs in a ring joined by one link each, plus ``bridges`` links from each LAN to random others."""
    size = max(2, min(size, n))
    groups = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    edges = set()
    for g in groups:
        for x in range(len(g)):
            for y in range(x + 1, len(g)):
                edges.add((g[x], g[y]))
    k = len(groups)
    if k > 1:
        for c in range(k):
            for other in ([(c + 1) % k] if k > 2 or c == 0 else []) + [rng.randrange(k) for _ in range(bridges)]:
                if other == c:
                    continue
                a, b = rng.choice(groups[c]), rng.choice(groups[other])
                edges.add((min(a, b), max(a, b)))
    return _as_lists(n, edges)


TOPOLOGIES = ("random-regular", "small-world", "lan-clusters")


def make_topology(kind: str, n: int, degree: int, rng: random.Random, rewire: float = 0.1,
                  cluster: int = 10, bridges: int = 1) -> List[List[int]]:
    if kind == "random-regular":
        return random_regular(n, degree, rng)
    if kind == "small-world":
        return small_world(n, degree, rewire, rng)
    if kind == "lan-clusters":
        return lan_clusters(n, cluster, bridges, rng)
    raise ValueError(f"unknown topology {kind!r}")


# -- the node model ---------------------------------------------------------------------------------

def addr_of(i: int) -> Tuple[str, int]:
    return ("10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255), 9000)


def label_of(i: int) -> str:
    return "%s:%d" % addr_of(i)


class SimMembership(Membership):
    """Membership with the start-up shortcut's two hooks; everything else is the real code."""

    settled_interval: Optional[float] = None  # presence interval of a settled mesh (shortcut)
    hold_presence = False  # while True (the shortcut's start-up), links coming up announce nothing

    def _presence_interval(self) -> float:
        if self.settled_interval is not None:
            return self.settled_interval
        return super()._presence_interval()

    def _schedule_presence(self, now: float) -> None:
        if not self.hold_presence:
            super()._schedule_presence(now)

    def rephase(self, now: float, fraction: float) -> None:
        """The next presence at ``fraction`` of a settled interval from now: a mesh long settled."""
        interval = 0.9 * self._presence_interval()  # the mean of its jittered gap (x 0.8 to 1.0)
        self._presence_due = now + fraction * interval
        self._last_presence = now - (1.0 - fraction) * interval


@dataclass
class NodeSpec:
    """What a model needs to build node ``index`` (one incarnation of it)."""

    index: int
    incarnation: int
    peers: List[Tuple[str, int]]
    seed: int
    ttl: int = 0  # 0: adaptive
    max_ttl: int = 16
    shortcut: bool = False
    settled_interval: Optional[float] = None


def flood_node(spec: NodeSpec, lazy: bool = False) -> Relay:
    """Today's node: flooding, membership, acks and gap repair, with no history on disk; ``lazy``:
    with lazy push (LAZY in its caps, so its neighbours with it get announcements, not payloads)."""
    i = spec.index
    label = label_of(i)
    counter = iter(range(1 << 62))
    prefix = "m%x.%x-" % (i, spec.incarnation)

    def new_mid() -> str:
        return prefix + str(next(counter))

    rng = random.Random(spec.seed)
    mcfg = MembershipConfig(label=label, max_ttl=spec.max_ttl,
                            caps=MEMBERSHIP_CAPS + DELIVERY_CAPS + ((LAZY_CAP,) if lazy else ()))
    m = SimMembership(mcfg, secret=b"k%d.%d" % (i, spec.incarnation), new_mid=new_mid,
                      rng=random.Random(rng.random()))
    if spec.shortcut:
        m.hold_presence = True
        m.settled_interval = spec.settled_interval
    node_id = "%016x" % ((i << 20 | spec.incarnation) & (1 << 64) - 1)
    d = Delivery(DeliveryConfig(label, node_id, catch_up_s=0.0), neighbours=m.repair_neighbours,
                 rng=random.Random(rng.random()), new_mid=new_mid)
    cfg = RelayConfig(label=label, ttl=spec.ttl, max_ttl=spec.max_ttl, flood=not lazy)
    return Relay(cfg, spec.peers, new_mid=new_mid, membership=m, delivery=d)


def lazy_node(spec: NodeSpec) -> Relay:
    """A node with lazy push (lazypush.py): eager links get payloads, lazy ones IHAVEs."""
    return flood_node(spec, lazy=True)


MODELS: Dict[str, Callable[[NodeSpec], Any]] = {"flood": flood_node, "lazy": lazy_node}


# -- the simulation ---------------------------------------------------------------------------------

@dataclass
class Params:
    nodes: int = 1000
    topology: str = "random-regular"
    degree: int = 4
    rewire: float = 0.1
    cluster: int = 10
    bridges: int = 1
    loss: float = 0.0  # per link and direction
    loss_spread: float = 0.0  # each link's loss drawn from loss +- this
    latency_s: float = 0.010  # each link's one-way latency drawn from (1 - spread)x to (1 + spread)x this
    latency_spread: float = 0.5
    jitter_s: float = 0.002  # added to each datagram, uniformly from 0 to this
    messages: int = 100
    rate: float = 10.0  # broadcasts a second, mesh-wide
    churn: float = 0.0  # share of nodes that go down during the message phase
    down_s: float = 30.0  # how long a node that goes down stays down
    settle_s: float = 30.0
    idle_s: float = 60.0
    drain_s: float = 15.0
    startup: str = "auto"  # "real", "shortcut", or "auto"
    ttl: int = 0  # every node's --ttl; 0: adaptive (as the CLI's default)
    max_ttl: int = 16
    model: str = "flood"
    seed: int = 1


def _kind_of(data: bytes) -> str:
    k = data.find(b'"kind":"')
    if k < 0:
        return "?"
    return data[k + 8:data.find(b'"', k + 8)].decode("ascii", "replace")


class Counts:
    """Datagrams and bytes by kind."""

    __slots__ = ("n", "bytes")

    def __init__(self) -> None:
        self.n: Dict[str, int] = {}
        self.bytes: Dict[str, int] = {}

    def snapshot(self) -> Tuple[Dict[str, int], Dict[str, int]]:
        return dict(self.n), dict(self.bytes)


class Simulation:
    def __init__(self, p: Params, links: Optional[List[List[int]]] = None) -> None:
        """``links``: a topology of one's own (node i's neighbours at index i) instead of ``p``'s."""
        self.p = p
        self.rng = random.Random(p.seed)
        n = p.nodes
        topology_rng = random.Random(self.rng.random())
        self.links = links if links is not None else make_topology(p.topology, n, p.degree, topology_rng,
                                                                   p.rewire, p.cluster, p.bridges)
        if len(self.links) != n:
            raise ValueError("the topology has %d nodes, not %d" % (len(self.links), n))
        self.shortcut = p.startup == "shortcut" or (p.startup == "auto" and n > SHORTCUT_ABOVE)
        settled_members = min(n - 1, MAX_MEMBERS)
        self.settled_interval = min(PRESENCE_MAX_S, max(PRESENCE_MIN_S, PRESENCE_PER_MEMBER_S * settled_members))
        self.addrs = [addr_of(i) for i in range(n)]
        self.index = {a: i for i, a in enumerate(self.addrs)}
        # Per node: neighbour address -> (index, latency, loss), drawn once per link and direction.
        lrng = random.Random(self.rng.random())
        self.out: List[Dict[Tuple[str, int], Tuple[int, float, float]]] = [{} for _ in range(n)]
        for a in range(n):
            for b in self.links[a]:
                lat = p.latency_s * lrng.uniform(1.0 - p.latency_spread, 1.0 + p.latency_spread)
                loss = min(1.0, max(0.0, p.loss + (lrng.uniform(-1, 1) * p.loss_spread if p.loss_spread else 0.0)))
                self.out[a][self.addrs[b]] = (b, lat, loss)
        self.model = MODELS[p.model]
        self.node_seeds = [self.rng.getrandbits(48) for _ in range(n)]
        self.net_rng = random.Random(self.rng.random())
        self.incarnation = [0] * n
        self.ttl = [p.ttl] * n
        self.nodes: List[Any] = [self._build(i) for i in range(n)]
        self.alive = [True] * n
        self.up_since = [0.0] * n  # when the present incarnation started
        self.sched = [INF] * n  # the time of each node's pending timer event
        self.heap: List[tuple] = []
        self.seq = 0
        self.now = 0.0
        self.sent = Counts()
        self.arrived = Counts()
        self.lost = 0  # datagrams the links dropped
        self.to_dead = 0  # datagrams for a node that was down
        self.unroutable = 0  # datagrams for an address that is no neighbour (none expected)
        self.events = 0
        self.messages: Dict[str, Tuple[int, float, int]] = {}  # mid -> (origin, sent at, origin incarnation)
        self.got: Dict[str, Dict[int, Tuple[float, int, bool]]] = {}  # mid -> node -> (when, hops, late)
        self.downs: List[Tuple[int, float, float]] = []  # (node, down at, up at)
        self.presence_floods = 0

    def _build(self, i: int, now: float = 0.0) -> Any:
        spec = NodeSpec(i, self.incarnation[i], [self.addrs[b] for b in self.links[i]],
                        self.node_seeds[i] ^ self.incarnation[i], self.ttl[i], self.p.max_ttl,
                        self.shortcut, self.settled_interval if self.shortcut else None)
        return self.model(spec)

    # -- the event loop ----------------------------------------------------------------------------

    def _push(self, t: float, j: int, tag: int, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, j, tag, data))

    def _post(self, i: int, actions: list, now: float) -> None:
        """Carry out node ``i``'s actions at ``now``: datagrams onto the links, the rest recorded."""
        out = self.out[i]
        sent_n, sent_b = self.sent.n, self.sent.bytes
        rnd = self.net_rng.random
        heap, push = self.heap, heapq.heappush
        jitter = self.p.jitter_s
        for a in actions:
            kind = type(a)
            if kind is Send:
                data = a.data
                k = _kind_of(data)
                size = len(data)
                for addr in a.addrs:
                    sent_n[k] = sent_n.get(k, 0) + 1
                    sent_b[k] = sent_b.get(k, 0) + size
                    link = out.get(addr)
                    if link is None:
                        self.unroutable += 1
                        continue
                    j, lat, loss = link
                    if loss and rnd() < loss:
                        self.lost += 1
                        continue
                    self.seq += 1
                    push(heap, (now + lat + (rnd() * jitter if jitter else 0.0), self.seq, j, i, data))
            elif kind is Display:
                msg = a.message
                got = self.got.get(msg.mid)
                if got is not None and i not in got:
                    ttl0 = msg.extra.get("ttl0") if msg.extra else None
                    hops = ttl0 - msg.ttl + 1 if type(ttl0) is int and not a.late else -1
                    got[i] = (now, hops, a.late)
            elif kind is Originate:
                if a.kind == "PRESENCE":
                    self.presence_floods += 1
                _, sends = self.nodes[i].originate(a.kind, a.body, "", now, WALL0 + now, a.extra, a.ttl)
                self._post(i, sends, now)
            elif kind is ServeSince:
                d = self.nodes[i].delivery
                if d is not None:
                    d.serve(a.addr, d.recent_since(a.ts, a.limit), now)
            # Anything else (PeerUp, Notice, Delivered, Store, ...) is for a user or a disk: none here.

    def _reschedule(self, j: int, now: float) -> None:
        d = self.nodes[j].next_deadline()
        if d is not None and d < self.sched[j]:
            self.sched[j] = d
            self.seq += 1
            heapq.heappush(self.heap, (d if d > now else now, self.seq, j, _TIMER, d))

    def run_until(self, end: float) -> None:
        heap, pop = self.heap, heapq.heappop
        nodes, alive, addrs, sched = self.nodes, self.alive, self.addrs, self.sched
        arr_n, arr_b = self.arrived.n, self.arrived.bytes
        post, resched = self._post, self._reschedule
        events = 0
        while heap and heap[0][0] <= end:
            t, _, j, tag, data = pop(heap)
            events += 1
            if tag >= 0:  # a datagram from node ``tag``
                if not alive[j]:
                    self.to_dead += 1
                    continue
                k = _kind_of(data)
                arr_n[k] = arr_n.get(k, 0) + 1
                arr_b[k] = arr_b.get(k, 0) + len(data)
                node = nodes[j]
                handled = node.counters.handled
                actions = node.datagram_received(data, addrs[tag], t, WALL0 + t)
                if actions:
                    post(j, actions, t)
                    resched(j, t)
                elif node.counters.handled != handled:
                    resched(j, t)
                # else dropped (a duplicate, mostly) with nothing to do: no timer can have come sooner
            elif tag == _TIMER:
                if data != sched[j] or not alive[j]:
                    continue  # superseded by an earlier one, or the node went down
                sched[j] = INF
                actions = nodes[j].timers_due(t, WALL0 + t)
                if actions:
                    post(j, actions, t)
                resched(j, t)
            else:
                self.now = t
                self._control(t, j, tag, data)
        self.now = end
        self.events += events

    def _control(self, t: float, j: int, tag: int, data: Any) -> None:
        if tag == _REAP:
            for i, node in enumerate(self.nodes):
                if self.alive[i]:
                    node.expire(t)
            self._push(t + REAP_INTERVAL_S, -1, _REAP)
        elif tag == _SAY:
            self.say(j, data, t)
        elif tag == _DOWN:
            self.alive[j] = False
            self.sched[j] = INF
        elif tag == _UP:
            self.incarnation[j] += 1
            self.nodes[j] = self._build(j, t)
            self.alive[j] = True
            self.up_since[j] = t
            self._reschedule(j, t)

    def say(self, i: int, body: str, now: float) -> None:
        if not self.alive[i]:
            return
        messages, sends = self.nodes[i].originate("CHAT", body, "", now, WALL0 + now)
        for msg in messages:
            self.messages[msg.mid] = (i, now, self.incarnation[i])
            self.got[msg.mid] = {}
        self._post(i, sends, now)
        self._reschedule(i, now)

    # -- the phases ----------------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(len(self.nodes)):
            self._reschedule(i, 0.0)
        self._push(REAP_INTERVAL_S, -1, _REAP)

    def settle(self) -> None:
        self.run_until(self.p.settle_s)
        # From here on the mesh is taken as long settled: each node's next presence comes at a
        # random point of its interval (else the start-up's second round would be measured as idle).
        prng = random.Random(self.rng.random())
        for i, node in enumerate(self.nodes):
            m = node.membership
            m.hold_presence = False
            m.rephase(self.now, prng.random())
            self._reschedule(i, self.now)

    def plan_messages(self, start: float, origins: Optional[List[int]] = None) -> List[int]:
        """Origins (drawn, unless given), times and churn for the message phase, before it starts."""
        p = self.p
        mrng = random.Random(self.rng.random())
        n = len(self.nodes)
        drawn = [mrng.randrange(n) for _ in range(p.messages)]
        origins = drawn if origins is None else list(origins)
        if self.shortcut and not p.ttl:
            # A settled mesh's adaptive ttl: the farthest member it knows + 2 (membership rule 5).
            for o in sorted(set(origins)):
                far = max(distances(self.links, o))
                self.ttl[o] = max(2, min(p.max_ttl, far + 2))
                self.nodes[o].config = replace(self.nodes[o].config, ttl=self.ttl[o])
        for k, o in enumerate(origins):
            self._push(start + k / p.rate, o, _SAY, "m%d" % k)
        span = p.messages / p.rate
        for j in mrng.sample(range(n), int(round(p.churn * n))):
            down = start + mrng.uniform(0.0, span)
            self._push(down, j, _DOWN)
            self._push(down + p.down_s, j, _UP)
            self.downs.append((j, down, down + p.down_s))
        return origins

    # -- what it measured -----------------------------------------------------------------------------

    def eligible(self, mid: str) -> List[int]:
        """Nodes that were up, in one incarnation, from the message's sending to the end."""
        origin, t0, _ = self.messages[mid]
        return [i for i in range(len(self.nodes))
                if i != origin and self.alive[i] and self.up_since[i] <= t0]


def pct(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(math.ceil(q * len(values))) - 1))
    return values[k]


def deep_size(obj: Any, seen: Optional[set] = None) -> int:
    """Bytes of ``obj`` and everything it holds (shared small constants counted once per walk)."""
    seen = set() if seen is None else seen
    todo = [obj]
    total = 0
    while todo:
        o = todo.pop()
        if id(o) in seen or callable(o):
            continue  # classes, functions and bound methods: code, not this node's state
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset, deque)):
            todo.extend(o)
        elif isinstance(o, (str, bytes, int, float, bool)) or o is None:
            pass
        else:
            if hasattr(o, "__dict__"):
                todo.append(vars(o))
            for slot in getattr(type(o), "__slots__", ()):
                if hasattr(o, slot):
                    todo.append(getattr(o, slot))
    return total


def node_state(node: Any) -> Dict[str, int]:
    """Entries in each table a node keeps (the relay's, membership's, delivery's)."""
    m, d = node.membership, node.delivery
    row = {"seen": len(node.seen), "targets": len(node._targets), "heard": len(node.heard),
           "neighbours": len(m.neighbours) if m else 0, "members": len(m.members) if m else 0}
    if d is not None:
        row.update(streams=len(d._streams), gaps=len(d._gaps), buffered=len(d._buffer))
    return row


def _diff(after: Dict[str, int], before: Dict[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def run(p: Params, progress: Callable[[str], None] = lambda s: None, links: Optional[List[List[int]]] = None,
        origins: Optional[List[int]] = None) -> Dict[str, Any]:
    """One simulation (on ``links`` and from ``origins`` if given); its figures as a plain dict."""
    t_wall = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()  # millions of short-lived tuples and no cycles worth collecting mid-run
    try:
        sim = Simulation(p, links)
        n = p.nodes
        degrees = [len(x) for x in sim.links]
        progress(f"built {n} nodes ({p.topology}) in {time.perf_counter() - t_wall:.1f} s")
        sim.start()
        sim.settle()
        progress(f"settled at t={sim.now:g} s, {sim.events} events")
        ups = sum(sum(1 for nb in node.membership.neighbours.values() if nb.up) for node in sim.nodes)
        # The idle window: a settled mesh with nothing said.
        before, _ = sim.sent.snapshot()
        t_idle = sim.now
        sim.run_until(t_idle + p.idle_s)
        idle = _diff(sim.sent.n, before)
        start = sim.now
        origins = sim.plan_messages(start, origins)
        before_n, before_b = sim.sent.snapshot()
        served_before = sum(node.delivery.counters["served"] for node in sim.nodes if node.delivery)
        arr_before = dict(sim.arrived.n)
        end = start + p.messages / p.rate + p.drain_s
        sim.run_until(end)
        progress(f"messages done at t={sim.now:g} s, {sim.events} events")
        sent_n, sent_b = _diff(sim.sent.n, before_n), _diff(sim.sent.bytes, before_b)
        arrived = _diff(sim.arrived.n, arr_before)
        served = sum(node.delivery.counters["served"] for node in sim.nodes if node.delivery) - served_before

        pairs = first = repaired = 0
        hops: List[int] = []
        lat_first: List[float] = []
        lat_all: List[float] = []
        unreached_ttl = 0
        for mid, (origin, t0, _) in sim.messages.items():
            got = sim.got[mid]
            for i in sim.eligible(mid):
                pairs += 1
                g = got.get(i)
                if g is None:
                    continue
                when, h, late = g
                lat_all.append(when - t0)
                if late:
                    repaired += 1
                else:
                    first += 1
                    lat_first.append(when - t0)
                    hops.append(h)
            if sim.shortcut or p.ttl:
                dist = distances(sim.links, origin)
                unreached_ttl += sum(1 for x in dist if x > sim.ttl[origin] or x < 0)
        msgs = max(1, len(sim.messages))
        chat = sent_n.get("CHAT", 0)
        states = [node_state(node) for i, node in enumerate(sim.nodes) if sim.alive[i]]
        keys = states[0].keys() if states else []
        state = {k: {"mean": round(sum(s[k] for s in states) / len(states), 1), "max": max(s[k] for s in states)}
                 for k in keys}
        srng = random.Random(p.seed)
        sample = srng.sample(range(n), min(SIZE_SAMPLE, n))
        state_bytes = round(sum(deep_size(sim.nodes[i]) for i in sample) / len(sample))
        elapsed = time.perf_counter() - t_wall
        kinds = sorted(set(sent_n) | set(idle))
        result = {
            "params": asdict(p),
            "startup": "shortcut" if sim.shortcut else "real",
            "topology": {"nodes": n, "links": sum(degrees) // 2, "degree_mean": round(sum(degrees) / n, 2),
                         "degree_max": max(degrees),
                         "diameter_sampled": max(max(distances(sim.links, o)) for o in sorted(set(origins))[:5]),
                         "links_up_after_settle": ups // 2},
            "messages": len(sim.messages),
            "delivery_first_copy": round(first / pairs, 5) if pairs else None,
            "delivery_after_repair": round((first + repaired) / pairs, 5) if pairs else None,
            "pairs": pairs,
            "unreached_by_ttl": unreached_ttl,
            "chat_datagrams_per_message": round(chat / msgs, 1),
            "flood_datagrams_per_message": round((chat - served) / msgs, 1),
            "repair_datagrams_per_message": round((served + sent_n.get("WANT", 0)) / msgs, 2),
            "chat_bytes_per_message": round(sent_b.get("CHAT", 0) / msgs),
            "all_bytes_per_message": round(sum(sent_b.values()) / msgs),
            "datagrams_per_message_per_node": round(chat / msgs / n, 2),
            "duplicates_per_message": round((arrived.get("CHAT", 0) - first - repaired) / msgs, 1),
            "hops_p50": pct(hops, 0.5), "hops_p99": pct(hops, 0.99), "hops_max": max(hops) if hops else None,
            "latency_first_p50_ms": _ms(pct(lat_first, 0.5)), "latency_first_p99_ms": _ms(pct(lat_first, 0.99)),
            "latency_all_p99_ms": _ms(pct(lat_all, 0.99)),
            "sent_by_kind": {k: sent_n.get(k, 0) for k in kinds if sent_n.get(k)},
            "sent_bytes_by_kind": {k: sent_b.get(k, 0) for k in kinds if sent_b.get(k)},
            "lost_by_links": sim.lost, "to_dead_nodes": sim.to_dead, "unroutable": sim.unroutable,
            "churned": len(sim.downs),
            "idle_per_node_per_s": {k: round(v / n / p.idle_s, 4) for k, v in sorted(idle.items())},
            "idle_total_per_node_per_s": round(sum(idle.values()) / n / p.idle_s, 4),
            "presence_interval_s": sim.settled_interval if sim.shortcut else None,
            # A settled mesh's presence cost, from the flood's measured size: the idle window sees
            # only about N x idle / interval floods, too few at small N for a steady figure.
            "presence_expected_per_node_per_s": round((chat - served) / msgs / (0.9 * sim.settled_interval), 4),
            "state_entries": state,
            "state_bytes_per_node": state_bytes,
            "events": sim.events,
            "virtual_s": round(sim.now, 1),
            "elapsed_s": round(elapsed, 2),
        }
        return result
    finally:
        if gc_was:
            gc.enable()


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000.0, 1)


# -- output -------------------------------------------------------------------------------------------

ROWS = (
    ("nodes", lambda r: r["topology"]["nodes"]),
    ("links", lambda r: r["topology"]["links"]),
    ("diameter (from 5 origins)", lambda r: r["topology"]["diameter_sampled"]),
    ("start-up", lambda r: r["startup"]),
    ("delivery, first copy", lambda r: _pc(r["delivery_first_copy"])),
    ("delivery, after repair", lambda r: _pc(r["delivery_after_repair"])),
    ("unreached (beyond ttl)", lambda r: r["unreached_by_ttl"]),
    ("CHAT datagrams / msg", lambda r: r["chat_datagrams_per_message"]),
    ("  of which repair", lambda r: r["repair_datagrams_per_message"]),
    ("CHAT datagrams / msg / node", lambda r: r["datagrams_per_message_per_node"]),
    ("duplicates / msg", lambda r: r["duplicates_per_message"]),
    ("CHAT KiB / msg", lambda r: round(r["chat_bytes_per_message"] / 1024, 1)),
    ("all KiB / msg", lambda r: round(r["all_bytes_per_message"] / 1024, 1)),
    ("hops p50 / p99", lambda r: f"{r['hops_p50']} / {r['hops_p99']}"),
    ("latency p50 / p99 ms", lambda r: f"{r['latency_first_p50_ms']} / {r['latency_first_p99_ms']}"),
    ("latency incl. repair p99 ms", lambda r: r["latency_all_p99_ms"]),
    ("idle datagrams / node / s", lambda r: r["idle_total_per_node_per_s"]),
    ("  HELLO", lambda r: r["idle_per_node_per_s"].get("HELLO", 0)),
    ("  PRESENCE", lambda r: r["idle_per_node_per_s"].get("PRESENCE", 0)),
    ("  HAVE", lambda r: r["idle_per_node_per_s"].get("HAVE", 0)),
    ("  PRESENCE, settled rate", lambda r: r["presence_expected_per_node_per_s"]),
    ("seen entries / node", lambda r: r["state_entries"]["seen"]["mean"]),
    ("members / node", lambda r: r["state_entries"]["members"]["mean"]),
    ("streams / node", lambda r: r["state_entries"].get("streams", {}).get("mean")),
    ("buffered / node", lambda r: r["state_entries"].get("buffered", {}).get("mean")),
    ("state KiB / node", lambda r: round(r["state_bytes_per_node"] / 1024)),
    ("lost by links", lambda r: r["lost_by_links"]),
    ("nodes churned", lambda r: r["churned"]),
    ("events", lambda r: r["events"]),
    ("wall time s", lambda r: r["elapsed_s"]),
)


def _pc(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"


def table(results: List[Dict[str, Any]]) -> str:
    width = max(len(name) for name, _ in ROWS)
    cells = [[str(f(r)) for r in results] for _, f in ROWS]
    colw = [max(len(row[c]) for row in cells) for c in range(len(results))]
    lines = []
    for (name, _), row in zip(ROWS, cells):
        lines.append(name.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(row, colw)))
    return "\n".join(lines)


def growth(results: List[Dict[str, Any]]) -> str:
    """How each per-message and per-node figure grows from the smallest N to the largest."""
    if len(results) < 2:
        return ""
    a, b = results[0], results[-1]
    na, nb = a["topology"]["nodes"], b["topology"]["nodes"]
    out = [f"growth from {na} to {nb} nodes (x{nb / na:g}):"]
    for name, key in (("CHAT datagrams / msg", "chat_datagrams_per_message"),
                      ("datagrams / msg / node", "datagrams_per_message_per_node"),
                      ("idle datagrams / node / s", "idle_total_per_node_per_s"),
                      ("state bytes / node", "state_bytes_per_node")):
        x, y = a[key], b[key]
        if x:
            exp = math.log(y / x) / math.log(nb / na) if y and y > 0 and x > 0 else float("nan")
            out.append(f"  {name}: x{y / x:.2f} (~ N^{exp:.2f})")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000], help="mesh sizes to run (default 1000)")
    ap.add_argument("--topology", choices=TOPOLOGIES, default="random-regular")
    ap.add_argument("--degree", type=int, default=4, help="neighbours per node (random-regular, small-world)")
    ap.add_argument("--rewire", type=float, default=0.1, help="small-world rewiring probability")
    ap.add_argument("--cluster", type=int, default=10, help="nodes per LAN (lan-clusters)")
    ap.add_argument("--bridges", type=int, default=1, help="extra links from each LAN to random others")
    ap.add_argument("--loss", type=float, default=0.0, help="loss per link and direction, 0..1")
    ap.add_argument("--loss-spread", type=float, default=0.0, help="each link's loss drawn from loss +- this")
    ap.add_argument("--latency-ms", type=float, default=10.0, help="mean one-way link latency")
    ap.add_argument("--jitter-ms", type=float, default=2.0)
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--rate", type=float, default=10.0, help="broadcasts a second, mesh-wide")
    ap.add_argument("--churn", type=float, default=0.0, help="share of nodes that go down and come back")
    ap.add_argument("--down", type=float, default=30.0, help="seconds a churned node stays down")
    ap.add_argument("--settle", type=float, default=30.0, help="virtual seconds of start-up before measuring")
    ap.add_argument("--idle", type=float, default=60.0, help="virtual seconds of idle mesh measured")
    ap.add_argument("--drain", type=float, default=15.0, help="virtual seconds for repair after the last message")
    ap.add_argument("--startup", choices=("auto", "real", "shortcut"), default="auto")
    ap.add_argument("--model", choices=sorted(MODELS), default="flood")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a small run (60 nodes, 20 messages), for CI")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    if not 0.0 <= args.loss <= 1.0 or args.rate <= 0 or any(x < 2 for x in args.nodes):
        ap.error("--loss must be within 0..1, --rate positive, --nodes at least 2")
    sizes = [60] if args.quick else args.nodes
    results = []
    for n in sizes:
        p = Params(nodes=n, topology=args.topology, degree=args.degree, rewire=args.rewire, cluster=args.cluster,
                   bridges=args.bridges, loss=args.loss, loss_spread=args.loss_spread,
                   latency_s=args.latency_ms / 1000.0, jitter_s=args.jitter_ms / 1000.0,
                   messages=20 if args.quick else args.messages, rate=args.rate, churn=args.churn,
                   down_s=args.down, settle_s=args.settle, idle_s=20.0 if args.quick else args.idle,
                   drain_s=args.drain, startup=args.startup, model=args.model, seed=args.seed)
        try:
            results.append(run(p, (lambda s: print(s, file=sys.stderr)) if args.verbose else (lambda s: None)))
        except (ValueError, RuntimeError) as e:
            print(f"simulate.py: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"runs": results}, indent=1, sort_keys=True))
    else:
        print(table(results))
        g = growth(results)
        if g:
            print()
            print(g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
