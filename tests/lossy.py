"""A lossy network for real ``meshchat`` processes, and the chaos scenarios run on it.

``LossyHub`` is a UDP proxy for every link of a mesh, served by one selector
thread: it drops, delays, duplicates and reorders datagrams, each decision
drawn from one seeded ``random.Random``. It needs no privileges and no
asyncio, so it works on any OS.

For a link between nodes A and B the hub binds two sockets: ``S_AB`` (the
address A has for B) and ``S_BA`` (the address B has for A). What A sends to
``S_AB`` goes on to B *from* ``S_BA``, and what B sends to ``S_BA`` goes on to
A from ``S_AB``. So each node always sees a neighbour under the one address it
also sends to, and a node's "not back to the sender" rule works as on a real
link.

``Mesh`` runs N nodes as ``python -m meshchat --json`` processes on such a
network (or, with ``netns=True``, one Linux network namespace per node on a
bridge, with the kernel dropping packets: see ``NetnsNet``), sends messages,
kills nodes with SIGKILL and restarts them on the same port, waits until
nothing is in flight, and counts what every node displayed. ``run_chaos`` is
the timed scenario that ``scripts/chaos.py`` runs.

Everything here is bounded: the hub thread ends by itself after
``max_life_s``, every wait has a deadline, and ``close()`` kills every child
process and joins every thread it started.
"""

import heapq
import json
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

# One-hop chatter of membership, repair and lazy push: HELLO, WANT, HAVE, SINCE, IHAVE, GRAFT, PRUNE
# (nodes count it as link_*).
_LINK_KINDS = re.compile(rb'"kind":"(?:HELLO|WANT|HAVE|SINCE|IHAVE|GRAFT|PRUNE)"')
# A node's bulk socket (file link datagrams, node.py), as its full HELLOs announce it.
_FPORT = re.compile(rb'"fport":([0-9]{1,5})')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
REPAIR_WINDOW_S = 8.0  # delivery.HAVE_SOON_S (3 s) for the summary, then up to 8 WANTs half a second apart
STOP_TIMEOUT_S = 5.0
RECV_BATCH = 256
PROXY_RCVBUF_BYTES = 1 << 20
GRACE_S = 1.0  # a node counts for a message if up from its writing to this long after it was sent


# -- topology ------------------------------------------------------------------------------


def regular_links(n: int, degree: int, seed: int) -> List[Set[int]]:
    """Neighbour sets of nodes 0..n-1: a ring (so always connected) plus seeded random chords.

    Every node ends with ``degree`` neighbours when that is possible (``n * degree``
    even, ``degree < n``); the ring makes it at least 2 for n > 2.
    """
    if n < 2:
        raise ValueError("a mesh needs at least 2 nodes")
    degree = max(1, min(degree, n - 1))
    rng = random.Random(seed)
    best: Optional[List[Set[int]]] = None
    best_short = None
    for _ in range(100):
        links: List[Set[int]] = [set() for _ in range(n)]
        for a in range(n if n > 2 else 1):
            b = (a + 1) % n
            links[a].add(b)
            links[b].add(a)
        for _ in range(n * degree):
            short = [a for a in range(n) if len(links[a]) < degree]
            if len(short) < 2:
                break
            a = rng.choice(short)
            options = [b for b in short if b != a and b not in links[a]]
            if not options:
                break
            b = rng.choice(options)
            links[a].add(b)
            links[b].add(a)
        missing = sum(max(0, degree - len(s)) for s in links)
        if best is None or missing < best_short:
            best, best_short = links, missing
        if missing <= (n * degree) % 2:
            break
    assert best is not None
    return best


# -- the lossy proxy -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkSpec:
    """What a link does to each datagram: drop with ``loss``, send twice with ``dup``,
    hold for a uniform delay in ``delay`` seconds, and with ``reorder`` hold it back
    until the next datagram in the same direction has gone (or ``hold_s`` passed)."""

    loss: float = 0.0
    dup: float = 0.0
    delay: Tuple[float, float] = (0.0, 0.0)
    reorder: float = 0.0
    hold_s: float = 0.05


class _End:
    """One proxy socket: what it receives from node ``src`` goes to node ``dst`` from ``out``.

    Each link has two more for the nodes' bulk sockets (``bulk``): a HELLO from ``src`` that
    announces its bulk port (``fport``) has it rewritten to ``back_bulk``'s port, the bulk end that
    ``dst`` sends to for ``src``, so that file chunks cross the same lossy link as the rest."""

    __slots__ = ("sock", "src", "dst", "out", "spec", "held", "bulk", "back_bulk")

    def __init__(self, sock: socket.socket, src: int, dst: int, spec: LinkSpec, bulk: bool = False) -> None:
        self.sock = sock
        self.src = src
        self.dst = dst
        self.out: socket.socket = sock
        self.spec = spec
        self.held: List[list] = []  # [data, done] held back for reordering
        self.bulk = bulk
        self.back_bulk: Optional["_End"] = None


COUNTS = ("received", "forwarded", "dropped_loss", "dropped_down", "duplicated", "delayed", "reordered",
          "send_errors", "recv_errors")


class LossyHub:
    """Proxies for every link of a mesh, all served by one thread (``lossy-hub``)."""

    def __init__(self, seed: int = 0, spec: LinkSpec = LinkSpec(), host: str = HOST,
                 max_life_s: float = 600.0) -> None:
        self.host = host
        self.spec = spec
        self.max_life_s = max_life_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._sel.register(self._waker_r, selectors.EVENT_READ, None)
        self._ends: List[_End] = []
        self._ports: Dict[int, Optional[int]] = {}
        self._bulk_ports: Dict[int, int] = {}  # node -> its bulk socket's port, from its HELLOs
        self._up: Dict[int, bool] = {}
        self._early: Set[int] = set()  # starting: membership chatter goes to them already
        self.in_from: Dict[int, int] = {}
        self.out_to: Dict[int, int] = {}
        self.counts: Dict[str, int] = dict.fromkeys(COUNTS, 0)
        self._heap: list = []
        self._seq = 0
        self._pending = 0
        self._hello_rng = random.Random(seed + 1)
        self._last_activity = time.monotonic()
        self._thread: Optional[threading.Thread] = None
        self.decisions: List[Tuple[bool, bool, bool]] = []  # (dropped, duplicated, reordered), if recording
        self.record = False

    # -- building the mesh (before or after start) --

    def add_node(self) -> int:
        with self._lock:
            i = len(self._ports)
            self._ports[i] = None
            self._up[i] = False
            self.in_from[i] = 0
            self.out_to[i] = 0
            return i

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, 0))
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PROXY_RCVBUF_BYTES)
            except OSError:
                pass
        except BaseException:
            sock.close()
            raise
        return sock

    def link(self, a: int, b: int, spec: Optional[LinkSpec] = None) -> Tuple[int, int]:
        """Join nodes ``a`` and ``b``; returns (the port a sends to for b, the port b sends to for a)."""
        spec = spec or self.spec
        s_ab, s_ba = self._bind(), self._bind()
        ab, ba = _End(s_ab, a, b, spec), _End(s_ba, b, a, spec)
        ab.out, ba.out = s_ba, s_ab
        bab, bba = _End(self._bind(), a, b, spec, bulk=True), _End(self._bind(), b, a, spec, bulk=True)
        bab.out, bba.out = bba.sock, bab.sock
        ab.back_bulk, ba.back_bulk = bba, bab
        with self._lock:
            self._ends += [ab, ba, bab, bba]
            for end in (ab, ba, bab, bba):
                self._sel.register(end.sock, selectors.EVENT_READ, end)
        self._wake()
        return s_ab.getsockname()[1], s_ba.getsockname()[1]

    def set_spec(self, spec: LinkSpec) -> None:
        """Every link does ``spec`` from now on (e.g. lossy only once the neighbours know each other)."""
        with self._lock:
            for end in self._ends:
                end.spec = spec
            self.spec = spec

    def set_early(self, i: int, port: int) -> None:
        """Node ``i`` is starting on ``port``: membership's chatter (uncounted) goes to it from now
        on, so that nodes started together, or a restarted one, are not left waiting for a probe;
        what is counted waits for ``set_up``, so the accounting stays exact."""
        with self._lock:
            self._ports[i] = port
            self._early.add(i)

    def set_up(self, i: int, port: int) -> None:
        """Node ``i`` listens on ``port`` from now on; its counters start again from zero."""
        with self._lock:
            self._early.discard(i)
            self._ports[i] = port
            self._up[i] = True
            self.in_from[i] = 0
            self.out_to[i] = 0

    def set_down(self, i: int) -> None:
        """Node ``i`` is dead: what would go to it is dropped (as its closed port would)."""
        with self._lock:
            self._up[i] = False
            self._early.discard(i)

    # -- life cycle --

    def start(self) -> "LossyHub":
        self._thread = threading.Thread(target=self._run, name="lossy-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                raise RuntimeError("lossy-hub thread did not stop")
        self._sel.close()
        for end in self._ends:
            end.sock.close()
        self._waker_r.close()
        self._waker_w.close()

    def __enter__(self) -> "LossyHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wake(self) -> None:
        try:
            self._waker_w.send(b"\0")
        except OSError:
            pass

    # -- observing --

    def snapshot(self) -> dict:
        with self._lock:
            return {"in_from": dict(self.in_from), "out_to": dict(self.out_to), "pending": self._pending,
                    **self.counts}

    def wait_quiet(self, quiet_s: float, timeout: float) -> bool:
        """True once nothing is held and no datagram came for ``quiet_s``; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                now = time.monotonic()
                idle = now - self._last_activity
                if self._pending == 0 and idle >= quiet_s:
                    return True
                if now >= deadline:
                    return False
                self._changed.wait(min(deadline - now, max(quiet_s - idle, 0.005)))

    def wait_received(self, count: int, timeout: float) -> bool:
        """True once ``count`` datagrams have come in and nothing is held; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (self.counts["received"] >= count and self._pending == 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    # -- the thread --

    def _run(self) -> None:
        end_of_life = time.monotonic() + self.max_life_s
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= end_of_life:
                break
            with self._lock:
                due = self._heap[0][0] if self._heap else None
            timeout = min(end_of_life - now, 1.0 if due is None else max(due - now, 0.0))
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    try:
                        while self._waker_r.recv(512):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                else:
                    self._readable(key.data)
            self._run_due()
            with self._changed:
                self._changed.notify_all()

    def _readable(self, end: _End) -> None:
        for _ in range(RECV_BATCH):
            try:
                data, _addr = end.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP report on some systems
                with self._lock:
                    self.counts["recv_errors"] += 1
                continue
            with self._lock:
                self._last_activity = time.monotonic()
                self._arrived(end, data)

    def _arrived(self, end: _End, data: bytes) -> None:
        fport = _FPORT.search(data) if end.back_bulk is not None else None
        if fport is not None:
            self._bulk_ports[end.src] = int(fport.group(1))
            data = b"%s%d%s" % (data[:fport.start(1)], end.back_bulk.sock.getsockname()[1], data[fport.end(1):])
        if _LINK_KINDS.search(data):
            # Membership's own chatter: as lossy as the rest, but outside the accounting that tells
            # when the mesh is quiet (nodes count it apart too: link_received, link_sent), and drawn
            # from its own generator, so the datagrams under test keep their seeded decisions.
            if self._hello_rng.random() >= end.spec.loss:
                port = self._ports.get(end.dst)
                if (self._up.get(end.dst) or end.dst in self._early) and port is not None:
                    try:
                        end.out.sendto(data, (self.host, port))
                    except OSError:
                        pass
            return
        c = self.counts
        c["received"] += 1
        self.in_from[end.src] += 1
        spec = end.spec
        rng = self._rng
        # Always four draws a datagram, so one seed gives one sequence of decisions.
        u_loss, u_dup, u_delay, u_reorder = rng.random(), rng.random(), rng.random(), rng.random()
        dropped = u_loss < spec.loss
        duplicated = not dropped and u_dup < spec.dup
        reordered = not dropped and u_reorder < spec.reorder
        if self.record:
            self.decisions.append((dropped, duplicated, reordered))
        if dropped:
            c["dropped_loss"] += 1
            return
        copies = 2 if duplicated else 1
        if duplicated:
            c["duplicated"] += 1
        lo, hi = spec.delay
        delay = lo + (hi - lo) * u_delay
        for _ in range(copies):
            if delay > 0:
                c["delayed"] += 1
                self._pending += 1
                self._push(time.monotonic() + delay, "delay", end, [data, reordered])
            else:
                self._emit(end, data, reordered)

    def _push(self, due: float, kind: str, end: _End, item: list) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, kind, end, item))

    def _emit(self, end: _End, data: bytes, reorder: bool) -> None:
        if reorder:
            self.counts["reordered"] += 1
            item = [data, False]
            end.held.append(item)
            self._pending += 1
            self._push(time.monotonic() + end.spec.hold_s, "release", end, item)
        else:
            self._forward(end, data)
            held, end.held = end.held, []
            for item in held:  # what was held back goes right after the datagram that overtook it
                if not item[1]:
                    item[1] = True
                    self._pending -= 1
                    self._forward(end, item[0])

    def _forward(self, end: _End, data: bytes) -> None:
        dst = end.dst
        port = self._bulk_ports.get(dst) if end.bulk else self._ports.get(dst)
        if not self._up.get(dst) or port is None:
            self.counts["dropped_down"] += 1
            return
        try:
            end.out.sendto(data, (self.host, port))
        except OSError:
            self.counts["send_errors"] += 1
            return
        self.counts["forwarded"] += 1
        self.out_to[dst] += 1

    def _run_due(self) -> None:
        with self._lock:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, kind, end, item = heapq.heappop(self._heap)
                if kind == "delay":
                    self._pending -= 1
                    self._emit(end, item[0], item[1])
                elif not item[1]:  # a held datagram nothing overtook in time
                    item[1] = True
                    self._pending -= 1
                    end.held.remove(item)
                    self._forward(end, item[0])


# -- node processes --------------------------------------------------------------------------


def child_env() -> Dict[str, str]:
    """The environment for nodes: this checkout's meshchat first on the path, no colours."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NO_COLOR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class NodeProc:
    """One ``meshchat --json`` process; a thread puts ``(index, incarnation, line)`` on ``events``
    for each stdout line and ``(index, incarnation, None)`` at its end."""

    def __init__(self, index: int, incarnation: int, argv: Sequence[str], events: "queue.Queue") -> None:
        self.index = index
        self.incarnation = incarnation
        self.argv = list(argv)
        self._stderr = tempfile.TemporaryFile()
        try:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._stderr, text=True, encoding="utf-8", errors="replace",
                                          env=child_env(), cwd=REPO)
        except BaseException:
            self._stderr.close()
            raise
        self._reader = threading.Thread(target=self._read, args=(events,),
                                        name=f"chaos-reader-{index}.{incarnation}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self, events: "queue.Queue") -> None:
        try:
            for line in self.popen.stdout:
                events.put((self.index, self.incarnation, line))
        except (OSError, ValueError):
            pass
        finally:
            events.put((self.index, self.incarnation, None))

    def send(self, line: str) -> bool:
        try:
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> int:
        """SIGKILL (TerminateProcess on Windows); returns the exit status."""
        if self.popen.poll() is None:
            self.popen.kill()
        return self.popen.wait(STOP_TIMEOUT_S)

    def rss_kib(self) -> Optional[int]:
        """Resident memory from /proc/PID/status, None where there is no such file."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def stderr_text(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def close(self) -> Optional[int]:
        """End of input, then SIGKILL if it does not stop; join the reader. Returns the exit status."""
        try:
            if self.popen.poll() is None:
                try:
                    self.popen.stdin.close()
                except (OSError, ValueError):
                    pass
                try:
                    self.popen.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(STOP_TIMEOUT_S)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)
            self._reader.join(STOP_TIMEOUT_S)
            for stream in (self.popen.stdin, self.popen.stdout):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
        return self.popen.returncode

    def close_stderr(self) -> None:
        self._stderr.close()


# -- the networks nodes run on ---------------------------------------------------------------


def reserve_udp_ports(count: int) -> Dict[int, socket.socket]:
    """``count`` UDP sockets bound to free ports on HOST, held (so no one else gets those ports)
    until the caller closes each just before its node binds it."""
    socks: Dict[int, socket.socket] = {}
    try:
        for i in range(count):
            socks[i] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks[i].bind((HOST, 0))
    except BaseException:
        for sock in socks.values():
            sock.close()
        raise
    return socks


class LoopbackNet:
    """Nodes on 127.0.0.1, every link through a ``LossyHub`` proxy."""

    name = "loopback proxies"
    exact_settle = True

    def __init__(self, links: List[Set[int]], seed: int, spec: LinkSpec, max_life_s: float,
                 ports_first: bool = False, bad_links: Optional[Dict[Tuple[int, int], float]] = None) -> None:
        self.hub = LossyHub(seed, spec, max_life_s=max_life_s)
        self.peer_ports: Dict[int, List[int]] = {i: [] for i in range(len(links))}
        # ports_first: every node's port is chosen (free now) before any starts, so the hub forwards
        # to a node from its spawn on and the first HELLOs of nodes started together are not lost.
        self._reserved = reserve_udp_ports(len(links)) if ports_first else {}
        self.ports: Dict[int, int] = {i: sock.getsockname()[1] for i, sock in self._reserved.items()}
        try:
            for _ in links:
                self.hub.add_node()
            for a, near in enumerate(links):
                for b in sorted(near):
                    if a < b:
                        worse = (bad_links or {}).get((a, b))
                        pa, pb = self.hub.link(a, b) if worse is None else self.hub.link(a, b, replace(spec, loss=worse))
                        self.peer_ports[a].append(pa)
                        self.peer_ports[b].append(pb)
        except BaseException:
            self.hub.stop()  # closes the sockets bound so far
            self._release()
            raise
        self.hub.start()

    def _release(self, i: Optional[int] = None) -> None:
        for j in ([i] if i is not None else list(self._reserved)):
            sock = self._reserved.pop(j, None)
            if sock is not None:
                sock.close()

    def argv(self, i: int) -> List[str]:
        port = self.ports.get(i, 0)  # first start: any free port; restarts: the same one
        return [sys.executable, "-m", "meshchat", "--host", HOST, "--port", str(port),
                "--peers", *[f"{HOST}:{p}" for p in self.peer_ports[i]]]

    def spawning(self, i: int) -> None:
        """Node i is about to start: if its port is known (a restart, or ports_first), HELLOs go to
        it from now on (see ``LossyHub.set_early``)."""
        self._release(i)  # the node binds it in a moment
        port = self.ports.get(i)
        if port is not None:
            self.hub.set_early(i, port)

    def up(self, i: int, label: str) -> None:
        port = int(label.rsplit(":", 1)[1])
        self.ports.setdefault(i, port)
        self.hub.set_up(i, port)

    def down(self, i: int) -> None:
        self.hub.set_down(i)

    def quiet(self, timeout: float) -> bool:
        return self.hub.wait_quiet(0.05, timeout)

    def counters(self) -> dict:
        return self.hub.snapshot()

    def close(self) -> None:
        self._release()
        self.hub.stop()


class NetnsUnavailable(Exception):
    pass


NS_PREFIX = "mchat"
NETNS_PORT = 9001
NFT_TABLE = "meshchat_chaos"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and p.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p


def netns_unavailable_reason() -> Optional[str]:
    """None if namespaces with nftables can be made here, else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"no {tool!r} command (nftables: apt-get install nftables)"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        try:
            p = subprocess.run(["ip", "netns", "exec", probe, "nft", "list", "tables"], capture_output=True,
                               text=True, timeout=20)
            if p.returncode != 0:
                return f"nft does not work in a namespace: {p.stderr.strip()}"
        finally:
            _ip("netns", "del", probe, check=False)
    except (NetnsUnavailable, OSError, subprocess.SubprocessError) as e:
        return f"cannot create a network namespace: {e}"
    return None


def remove_stale_namespaces() -> List[str]:
    """Delete namespaces this harness made in runs whose process is gone (e.g. killed with -9)."""
    removed = []
    p = _ip("netns", "list", check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{NS_PREFIX}(\d+)-", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


class NetnsNet:
    """One network namespace per node, joined by a bridge in a hub namespace of their own.

    Node i is 10.77.0.(i+1)/24 on ``eth0`` in namespace ``mchat<pid>-n<i>``; the
    bridge lives in ``mchat<pid>-hub``, so nothing is added to the host's own
    network. Loss is done by the kernel: an nftables rule in each node's input
    hook, ``udp dport 9001 numgen random mod 10000 < LOSS*10000 counter drop``.
    Links are as ``links`` says (each node's --peers); the bridge itself would
    carry anything. ``close()`` deletes every namespace, whatever happened.
    """

    name = "network namespaces"
    exact_settle = False

    def __init__(self, links: List[Set[int]], loss: float) -> None:
        if len(links) > 250:
            raise ValueError("at most 250 nodes on 10.77.0.0/24")
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        remove_stale_namespaces()
        self.links = links
        self.tag = f"{NS_PREFIX}{os.getpid()}"
        self.hub_ns = f"{self.tag}-hub"
        self.namespaces: List[str] = []
        self.loss = loss
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    @staticmethod
    def address(i: int) -> str:
        return f"10.77.0.{i + 1}"

    def _build(self) -> None:
        self.namespaces.append(self.hub_ns)
        _ip("netns", "add", self.hub_ns)
        _ip("-n", self.hub_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub_ns, "link", "set", "br0", "up")
        threshold = int(round(self.loss * 10000))
        for i in range(len(self.links)):
            ns = self.ns(i)
            self.namespaces.append(ns)
            _ip("netns", "add", ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.hub_ns)
            _ip("-n", self.hub_ns, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            rules = (
                f"table inet {NFT_TABLE} {{\n"
                f"  chain input {{ type filter hook input priority 0; policy accept;\n"
                f"    udp dport {NETNS_PORT} numgen random mod 10000 < {threshold} counter drop\n"
                f"    udp dport {NETNS_PORT} counter accept\n  }}\n"
                f"  chain output {{ type filter hook output priority 0; policy accept;\n"
                f"    udp dport {NETNS_PORT} counter\n  }}\n}}\n"
            )
            p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True,
                               text=True, timeout=20)
            if p.returncode != 0:
                raise NetnsUnavailable(f"nft in {ns}: {p.stderr.strip()}")

    def argv(self, i: int) -> List[str]:
        peers = [f"{self.address(j)}:{NETNS_PORT}" for j in sorted(self.links[i])]
        return ["ip", "netns", "exec", self.ns(i), sys.executable, "-m", "meshchat",
                "--host", self.address(i), "--port", str(NETNS_PORT), "--peers", *peers]

    def spawning(self, i: int) -> None:
        pass

    def up(self, i: int, label: str) -> None:
        pass

    def down(self, i: int) -> None:
        pass

    def quiet(self, timeout: float) -> bool:
        return True

    def nft_counters(self) -> Dict[str, int]:
        """Datagrams the kernel dropped, let in, and sent out, summed over the node namespaces."""
        total = {"dropped": 0, "accepted": 0, "out": 0}
        for ns in self.namespaces[1:]:
            p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", NFT_TABLE],
                               capture_output=True, text=True, timeout=20)
            if p.returncode != 0:
                continue
            for item in json.loads(p.stdout).get("nftables", []):
                rule = item.get("rule")
                if not rule:
                    continue
                packets = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
                verdicts = {k for e in rule["expr"] for k in e if k in ("drop", "accept")}
                if rule["chain"] == "output":
                    total["out"] += packets
                elif "drop" in verdicts:
                    total["dropped"] += packets
                else:
                    total["accepted"] += packets
        return total

    def counters(self) -> dict:
        return self.nft_counters()

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces = []


def rx_queue_bytes(pid: int, port: int) -> Optional[int]:
    """Bytes waiting in the receive queue of the UDP socket on ``port``, seen from ``pid``'s namespace."""
    try:
        with open(f"/proc/{pid}/net/udp") as f:
            next(f)
            total = None
            for line in f:
                cols = line.split()
                if int(cols[1].split(":")[1], 16) == port:
                    total = (total or 0) + int(cols[4].split(":")[1], 16)
            return total
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# -- the mesh --------------------------------------------------------------------------------


@dataclass
class Sent:
    body: str
    origin: int
    mid: str = ""
    t_write: float = 0.0
    t_sent: Optional[float] = None


@dataclass
class Report:
    nodes: int
    network: str
    messages: int
    pairs: int
    delivered: int
    duplicates: int  # a message shown twice by one process
    reshown: int  # a message shown again by a restarted process of the same node
    per_node: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # node -> (delivered, expected)
    kills: int = 0
    restarts: int = 0
    first_flood: int = 0  # pairs shown within grace_s of being sent and not late: delivered without repair
    late: int = 0  # pairs shown marked late (repaired or caught up)
    net: dict = field(default_factory=dict)
    rss_kib: Dict[int, Optional[int]] = field(default_factory=dict)
    exits: Dict[int, Optional[int]] = field(default_factory=dict)
    settled: bool = False
    seconds: float = 0.0
    flagged: List[Tuple[int, int, str, float]] = field(default_factory=list)  # (node, neighbour, flags, loss) from /peers

    @property
    def delivery(self) -> float:
        return self.delivered / self.pairs if self.pairs else 1.0

    @property
    def first_flood_delivery(self) -> float:
        return self.first_flood / self.pairs if self.pairs else 1.0

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["delivery"] = self.delivery
        out["first_flood_delivery"] = self.first_flood_delivery
        out["per_node"] = {str(k): list(v) for k, v in self.per_node.items()}
        out["rss_kib"] = {str(k): v for k, v in self.rss_kib.items()}
        out["exits"] = {str(k): v for k, v in self.exits.items()}
        return out


class Mesh:
    """N meshchat processes on a lossy network; see the module docstring.

    ``grace_s``: a node counts as a receiver of a message only if it was up
    when the message was written and stayed up for ``grace_s`` after the
    origin reported it sent (a flood takes milliseconds).
    """

    def __init__(self, n: int, degree: int = 4, seed: int = 1, loss: float = 0.2, dup: float = 0.0,
                 delay: Tuple[float, float] = (0.0, 0.0), reorder: float = 0.0, netns: bool = False,
                 grace_s: float = GRACE_S, max_life_s: float = 600.0, history: bool = True,
                 links: Optional[List[Set[int]]] = None, ports_first: bool = False,
                 more_peers: Optional[Dict[int, List[str]]] = None,
                 bad_links: Optional[Dict[Tuple[int, int], float]] = None) -> None:
        self.n = n
        self.more_peers = more_peers or {}  # node -> extra HOST:PORT peers (e.g. a seed-design node)
        self.history = history
        self.data_dir = tempfile.mkdtemp(prefix="meshchat-chaos-")
        self.seed = seed
        self.grace_s = grace_s
        self.links = regular_links(n, degree, seed) if links is None else [set(near) for near in links]
        self.events: "queue.Queue" = queue.Queue()
        self.procs: Dict[int, NodeProc] = {}
        self.all_procs: List[NodeProc] = []
        self.incarnation = [0] * n
        self.intervals: List[List[List[Optional[float]]]] = [[] for _ in range(n)]
        self.labels: Dict[int, str] = {}
        self.ready: Set[Tuple[int, int]] = set()
        self.ended: Set[Tuple[int, int]] = set()
        self.killed: Set[Tuple[int, int]] = set()
        self.shown: Dict[Tuple[int, int], Counter] = {}
        self.first_shown: Dict[Tuple[int, str], Tuple[float, bool]] = {}  # (node, mid) -> (when, late)
        self.log: Dict[Tuple[int, int], List[dict]] = {}  # every JSON event of every process, in order
        self.sent: Dict[str, Sent] = {}  # mid -> message
        self._writing: Dict[str, Sent] = {}  # body -> message not yet reported sent
        self.stats: Dict[Tuple[int, int], dict] = {}
        self._stats_seen: Counter = Counter()
        self.bad_lines: List[str] = []
        self.kills = 0
        self.restarts = 0
        self.kill_statuses: List[int] = []
        self._seq = 0
        self.closed = False
        self.exits: Dict[int, Optional[int]] = {}
        self._deadline = time.monotonic() + max_life_s
        for a, b in bad_links or {}:
            if not (0 <= a < n and 0 <= b < n and b in self.links[a]):
                raise ValueError(f"--bad-link {a}-{b}: nodes {a} and {b} are not linked in this mesh "
                                 f"(node {a}'s neighbours: {sorted(self.links[a]) if 0 <= a < n else 'none'})")
        if netns and bad_links:
            raise ValueError("--bad-link works with the loopback proxies only, not --netns")
        self.peer_tables: Dict[int, List[dict]] = {}  # node -> its last /peers rows
        self.net = (NetnsNet(self.links, loss) if netns
                    else LoopbackNet(self.links, seed, LinkSpec(loss, dup, delay, reorder), max_life_s, ports_first,
                                     {(min(a, b), max(a, b)): x for (a, b), x in (bad_links or {}).items()}))

    # -- life cycle --

    def start(self) -> "Mesh":
        try:
            for i in range(self.n):
                self._spawn(i)
            for i in range(self.n):
                self._await_ready(i)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, i: int) -> None:
        # History in a folder of this mesh's own: a restarted node catches up from it, and nothing
        # is left in the user's data folder.
        history = ["--data-dir", self.data_dir] if self.history else ["--no-history"]
        self.net.spawning(i)
        argv = self.net.argv(i) + list(self.more_peers.get(i, ()))  # argv ends with the --peers list
        p = NodeProc(i, self.incarnation[i], argv + ["--json", *history], self.events)
        self.procs[i] = p
        self.all_procs.append(p)

    def _await_ready(self, i: int) -> None:
        key = (i, self.incarnation[i])
        if not self.wait_until(lambda: key in self.ready or key in self.ended, READY_TIMEOUT_S) \
                or key not in self.ready:
            p = self.procs[i]
            raise RuntimeError(f"node {i} did not start (status {p.popen.poll()}): {p.stderr_text().strip()}")
        self.net.up(i, self.labels[i])
        self.intervals[i].append([time.monotonic(), None])

    def close(self) -> Dict[int, Optional[int]]:
        """Stop every process (end of input, SIGKILL if need be) and the network; safe to call twice.

        Returns (and keeps in ``exits``) the exit statuses of the processes not killed on purpose."""
        if self.closed:
            return self.exits
        self.closed = True
        exits = self.exits
        try:
            for p in self.all_procs:
                if p.popen.poll() is None:
                    try:
                        p.popen.stdin.close()
                    except (OSError, ValueError):
                        pass
            for p in self.all_procs:
                status = p.close()
                if self.procs.get(p.index) is p and (p.index, p.incarnation) not in self.killed:
                    exits[p.index] = status
        finally:
            for p in self.all_procs:
                if p.popen.poll() is None:
                    p.popen.kill()
                p.close_stderr()
            self.net.close()
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return exits

    def __enter__(self) -> "Mesh":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- output --

    def pump(self, timeout: float) -> bool:
        """Handle one line of any node's output; False if none came within ``timeout``."""
        try:
            i, inc, line = self.events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return False
        key = (i, inc)
        if line is None:
            self.ended.add(key)
            return True
        try:
            obj = json.loads(line)
            event = obj["event"]
        except (ValueError, KeyError, TypeError):
            self.bad_lines.append(line)
            return True
        self.log.setdefault(key, []).append(obj)
        if event == "ready":
            self.labels[i] = obj["node"]
            self.ready.add(key)
        elif event == "chat":
            self.shown.setdefault(key, Counter())[obj["mid"]] += 1
            self.first_shown.setdefault((i, obj["mid"]), (time.monotonic(), obj.get("late") is True))
        elif event == "sent":
            msg = self._writing.pop(obj.get("body", ""), None)
            if msg is not None and msg.origin == i:
                msg.mid = obj["mid"]
                msg.t_sent = time.monotonic()
                self.sent[msg.mid] = msg
        elif event == "stats":
            self.stats[key] = obj
            self._stats_seen[key] += 1
        elif event == "peers":
            self.peer_tables[i] = obj.get("peers", [])
        return True

    def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = min(time.monotonic() + timeout, self._deadline)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(left)
        return True

    def drain(self, until: float) -> None:
        """Handle output until the monotonic time ``until``."""
        until = min(until, self._deadline)
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            self.pump(left)

    # -- acting --

    def live(self) -> List[int]:
        return [i for i in range(self.n) if (i, self.incarnation[i]) not in self.killed]

    def say(self, i: int, body: Optional[str] = None) -> str:
        self._seq += 1
        body = body or f"s{self.seed}-m{self._seq}-from{i}"
        self._writing[body] = Sent(body, i, t_write=time.monotonic())
        self.procs[i].send(body)
        return body

    def round(self, senders: Optional[Sequence[int]] = None) -> List[str]:
        """One message from each of ``senders`` (default: every live node)."""
        return [self.say(i) for i in (self.live() if senders is None else senders)]

    def sent_by(self, body: str) -> Optional[int]:
        """Which node wrote ``body`` (through ``say``)."""
        msg = self._writing.get(body) or next((m for m in self.sent.values() if m.body == body), None)
        return msg.origin if msg is not None else None

    def events_of(self, i: int, name: str, incarnation: Optional[int] = None) -> List[dict]:
        """The ``name`` events node i printed so far (in its current incarnation unless told)."""
        inc = self.incarnation[i] if incarnation is None else incarnation
        return [e for e in self.log.get((i, inc), []) if e["event"] == name]

    def wait_event(self, i: int, name: str, match: Callable[[dict], bool] = lambda e: True,
                   timeout: float = 10.0) -> Optional[dict]:
        """The first ``name`` event of node i's current incarnation that ``match``es, waiting up to ``timeout``."""
        def found() -> Optional[dict]:
            return next((e for e in self.events_of(i, name) if match(e)), None)
        self.wait_until(lambda: found() is not None, timeout)
        return found()

    def wait_sent(self, bodies: Sequence[str], timeout: float = 10.0) -> bool:
        return self.wait_until(lambda: not any(b in self._writing for b in bodies), timeout)

    def kill(self, i: int) -> int:
        """SIGKILL node i now; returns its exit status (-9 on POSIX)."""
        key = (i, self.incarnation[i])
        self.killed.add(key)
        self.net.down(i)
        status = self.procs[i].kill()
        self.intervals[i][-1][1] = time.monotonic()
        self.kills += 1
        self.kill_statuses.append(status)
        return status

    def restart(self, i: int) -> None:
        """Start node i again with the very same command line (same port, same peers)."""
        assert (i, self.incarnation[i]) in self.killed, "restart only a killed node"
        self.incarnation[i] += 1
        self._spawn(i)
        self._await_ready(i)
        self.restarts += 1

    def write_map(self, i: int, path: str, timeout: float) -> bool:
        """Node ``i`` writes ``/map PATH`` (an SVG); True once it said it did."""
        key = (i, self.incarnation[i])
        seen = len(self.log.get(key, []))
        self.procs[i].send(f"/map {path}")
        return self.wait_until(lambda: any(e.get("event") == "notice" and path in str(e.get("text", ""))
                                           for e in self.log.get(key, [])[seen:]), timeout)

    def query_peers(self, nodes: Sequence[int], timeout: float) -> Dict[int, List[dict]]:
        """Each node's /peers rows (what a user would type to find a bad link)."""
        for i in nodes:
            self.peer_tables.pop(i, None)
            self.procs[i].send("/peers")
        self.wait_until(lambda: all(i in self.peer_tables for i in nodes), timeout)
        return {i: self.peer_tables[i] for i in nodes if i in self.peer_tables}

    # -- waiting for the mesh to go quiet --

    def query_stats(self, nodes: Sequence[int], timeout: float) -> Optional[Dict[int, dict]]:
        keys = {i: (i, self.incarnation[i]) for i in nodes}
        before = {i: self._stats_seen[k] for i, k in keys.items()}
        for i in nodes:
            self.procs[i].send("/stats")
        ok = self.wait_until(lambda: all(self._stats_seen[k] > before[i] for i, k in keys.items()), timeout)
        return {i: self.stats[k] for i, k in keys.items()} if ok else None

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until no datagram is in flight anywhere; False if that did not happen in ``timeout``.

        Over the proxies this is exact: for every live node, the datagrams its
        process counts as received equal those the hub forwarded to it, and those
        it counts as sent equal those the hub got from it, with nothing held.
        In namespaces: every node's counters stay the same over two looks and
        its socket's receive queue is empty.
        """
        deadline = time.monotonic() + timeout
        previous = None
        while time.monotonic() < deadline:
            self.net.quiet(max(deadline - time.monotonic(), 0.0))
            snap = self.net.counters()
            nodes = self.live()
            stats = self.query_stats(nodes, max(deadline - time.monotonic(), 0.0))
            if stats is None:
                continue
            if self.net.exact_settle:
                if snap["pending"] == 0 and all(
                        stats[i].get("received", 0) - stats[i].get("link_received", 0) == snap["out_to"][i]
                        and stats[i].get("sent", 0) - stats[i].get("send_errors", 0) - stats[i].get("link_sent", 0)
                        == snap["in_from"][i]
                        for i in nodes):
                    return True
                continue
            now = (tuple((stats[i].get("received", 0) - stats[i].get("link_received", 0),
                          stats[i].get("sent", 0) - stats[i].get("link_sent", 0)) for i in nodes), snap)
            queued = [rx_queue_bytes(self.procs[i].pid, NETNS_PORT) for i in nodes]
            if now == previous and all(q == 0 for q in queued):
                return True
            previous = now
            self.drain(min(time.monotonic() + 0.25, deadline))
        return False

    # -- results --

    def expected(self, msg: Sent, j: int) -> bool:
        if j == msg.origin or msg.t_sent is None:
            return False
        for up, down in self.intervals[j]:
            if up <= msg.t_write and (down is None or down >= msg.t_sent + self.grace_s):
                return True
        return False

    def report(self, mids: Optional[Sequence[str]] = None, settled: bool = False) -> Report:
        chosen = [self.sent[m] for m in (self.sent if mids is None else mids) if m in self.sent]
        shown_by: Dict[int, Set[str]] = {j: set() for j in range(self.n)}
        duplicates = reshown = 0
        per_node_mids: Dict[int, Counter] = {j: Counter() for j in range(self.n)}
        for (j, _inc), counts in self.shown.items():
            shown_by[j].update(counts)
            per_node_mids[j].update(counts.keys())
            duplicates += sum(c - 1 for c in counts.values() if c > 1)
        for j, across in per_node_mids.items():
            reshown += sum(c - 1 for c in across.values() if c > 1)
        per_node = {}
        pairs = delivered = first_flood = late = 0
        for j in range(self.n):
            want = [m for m in chosen if self.expected(m, j)]
            got = sum(1 for m in want if m.mid in shown_by[j])
            per_node[j] = (got, len(want))
            pairs += len(want)
            delivered += got
            for m in want:
                when, was_late = self.first_shown.get((j, m.mid), (None, False))
                if when is not None and was_late:
                    late += 1
                elif when is not None and m.t_sent is not None and when <= m.t_sent + self.grace_s:
                    first_flood += 1
        return Report(nodes=self.n, network=self.net.name, messages=len(chosen), pairs=pairs,
                      delivered=delivered, duplicates=duplicates, reshown=reshown, per_node=per_node,
                      first_flood=first_flood, late=late,
                      kills=self.kills, restarts=self.restarts, net=self.net.counters(), settled=settled)

    def rss(self) -> Dict[int, Optional[int]]:
        return {i: (p.rss_kib() if p.popen.poll() is None else None) for i, p in sorted(self.procs.items())}


# -- the timed scenario ----------------------------------------------------------------------


def run_chaos(nodes: int = 12, degree: int = 4, loss: float = 0.2, duration_s: float = 30.0,
              kills_per_min: float = 6.0, seed: int = 1, rate: float = 10.0, dup: float = 0.0,
              delay: Tuple[float, float] = (0.0, 0.0), reorder: float = 0.0, netns: bool = False,
              down_s: Tuple[float, float] = (1.0, 3.0), max_down: Optional[int] = None,
              progress: Callable[[str], None] = lambda text: None,
              bad_links: Optional[Dict[Tuple[int, int], float]] = None, map_svg: Optional[str] = None) -> Report:
    """Messages from random live nodes at ``rate`` a second for ``duration_s``; meanwhile random
    nodes are SIGKILLed (``kills_per_min`` on average, at most ``max_down`` down at once) and
    restarted on the same port after ``down_s`` seconds. Then every node is up again, the mesh
    settles, and the report counts delivery, duplicates shown and memory per node."""
    msg_rng = random.Random(seed * 7919 + 17)  # who speaks
    kill_rng = random.Random(seed * 104729 + 3)  # when and whom to kill: the same schedule for one seed
    max_down = max(1, nodes // 4) if max_down is None else max_down
    started = time.monotonic()
    mesh = Mesh(nodes, degree, seed, loss, dup, delay, reorder, netns=netns,
                max_life_s=duration_s + 120.0 + nodes * 2.0, ports_first=True, bad_links=bad_links)
    exits: Dict[int, Optional[int]] = {}
    try:
        mesh.start()
        progress(f"{nodes} nodes up on {mesh.net.name} in {time.monotonic() - started:.1f} s")
        t0 = time.monotonic()
        end = t0 + duration_s
        interval = 1.0 / rate if rate > 0 else float("inf")
        next_msg = t0
        kill_rate = kills_per_min / 60.0
        next_kill = t0 + kill_rng.expovariate(kill_rate) if kill_rate > 0 else float("inf")
        restarts: List[Tuple[float, int]] = []
        # A bound on the loop (each action takes at most two turns of it); the clock ends it first.
        for _ in range(4 * int(duration_s * (rate + 2 * kill_rate + 1)) + 1000):
            now = time.monotonic()
            if now >= end:
                break
            due = min(next_msg, next_kill, min((t for t, _ in restarts), default=end), end)
            if due > now:
                mesh.drain(due)
                continue
            if restarts and min(restarts)[0] <= now:
                restarts.sort()
                _, victim = restarts.pop(0)
                mesh.restart(victim)
                progress(f"{now - t0:6.1f} s  node {victim} restarted")
            elif next_kill <= now:
                next_kill = now + kill_rng.expovariate(kill_rate)
                candidates = mesh.live()
                if len(restarts) < max_down and len(candidates) > 2:
                    victim = kill_rng.choice(candidates)
                    status = mesh.kill(victim)
                    restarts.append((now + kill_rng.uniform(*down_s), victim))
                    progress(f"{now - t0:6.1f} s  node {victim} killed (status {status})")
            elif next_msg <= now:
                mesh.say(msg_rng.choice(mesh.live()))
                next_msg = max(next_msg + interval, now - 1.0)  # after a restart, do not burst to catch up
        for _, victim in sorted(restarts):
            mesh.restart(victim)
        settled = mesh.settle(30.0 + nodes * 0.5)
        # A message lost at the very end is asked for once its origin's summary (HAVE) comes, 3 s
        # after the last broadcast: the repair window is a protocol timer, so it is waited out.
        mesh.drain(time.monotonic() + REPAIR_WINDOW_S)
        settled = mesh.settle(30.0 + nodes * 0.5) and settled
        report = mesh.report(settled=settled)
        report.rss_kib = mesh.rss()
        report.flagged = flagged_links(mesh, mesh.query_peers(mesh.live(), 10.0))
        if map_svg:  # node 0 draws the mesh as it knows it, as a user would type /map FILE.svg
            mesh.write_map(0, os.path.abspath(map_svg), 10.0)
    finally:
        exits = mesh.close()
    report.exits = exits
    report.seconds = time.monotonic() - started
    return report


def flagged_links(mesh: "Mesh", tables: Dict[int, List[dict]]) -> List[Tuple[int, int, str, float]]:
    """What each node's /peers flags (a lossy or redundant link), as (node, neighbour node, flags, loss)."""
    index = {label: i for i, label in mesh.labels.items()}
    out = []
    for i, rows in sorted(tables.items()):
        for row in rows:
            flags = row.get("flags") or []
            j = index.get(row.get("label"))
            if flags and j is not None:
                out.append((i, j, " ".join(flags), row.get("loss") or 0.0))
    return out


def format_report(r: Report, args_line: str = "") -> str:
    lines = []
    if args_line:
        lines.append(args_line)
    lines.append(f"network: {r.network}; settled: {'yes' if r.settled else 'NO (timed out)'}; "
                 f"{r.seconds:.1f} s")
    lines.append(f"messages: {r.messages}; node x message pairs expected: {r.pairs}; delivered: {r.delivered}")
    lines.append(f"delivered on first flood (shown within {GRACE_S:g} s, not late): {r.first_flood} "
                 f"({100.0 * r.first_flood_delivery:.2f}%)")
    lines.append(f"delivered in the end (late included): {r.delivered} ({100.0 * r.delivery:.2f}%); "
                 f"shown late: {r.late}")
    lines.append(f"delivery: {100.0 * r.delivery:.2f}%")
    lines.append(f"duplicates shown: {r.duplicates} (shown again after a restart: {r.reshown})")
    lines.append(f"kills: {r.kills}; restarts: {r.restarts}")
    worst = sorted(r.per_node.items(), key=lambda kv: (kv[1][0] / kv[1][1]) if kv[1][1] else 1.0)[:3]
    lines.append("worst nodes: " + ", ".join(f"{j}: {g}/{w}" for j, (g, w) in worst))
    if r.net:
        lines.append("network counters: " + ", ".join(f"{k} {v}" for k, v in r.net.items()
                                                       if not isinstance(v, dict)))
    mem = []
    for i, kib in sorted(r.rss_kib.items()):
        mem.append(f"{i}: {kib / 1024:.1f} MiB" if kib is not None else f"{i}: n/a")
    lines.append("memory per node (VmRSS): " + ", ".join(mem))
    if r.flagged:
        lines.append("links flagged by /peers: " + ", ".join(
            f"node {i} on node {j}: {flags} (HELLO loss {loss:.0%})" for i, j, flags, loss in r.flagged))
    else:
        lines.append("links flagged by /peers: none")
    bad = {i: s for i, s in r.exits.items() if s != 0}
    lines.append("exit statuses: " + ("all 0" if not bad else ", ".join(f"{i}: {s}" for i, s in bad.items())))
    return "\n".join(lines)


def install_stop_signals() -> None:
    """SIGINT raises KeyboardInterrupt (even where a shell ignored it for a background job), and
    SIGTERM and SIGHUP raise SystemExit, so ``finally`` blocks clean up (namespaces too)."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, stop)
