#!/usr/bin/env python3
"""Benchmark meshchat on 127.0.0.1: relay cost, latency, scale, memory, flood efficiency, membership.

Membership's figures: datagrams per direct message (routed, and flooded when no
route is known), idle HELLO traffic and CPU of a settled mesh, time until a
killed node's neighbours say peer_down, time until a new node is discovered.

    python scripts/bench.py                 # the full run: about three minutes, a table on stdout
    python scripts/bench.py --nodes 50 200  # the mesh sections at 50 and at 200 nodes (about six minutes)
    python scripts/bench.py --quick         # a small version of each section, for CI
    python scripts/bench.py --json          # one JSON object instead of the tables
    python scripts/bench.py --html run.html # also the tables and charts as one HTML file

Every figure comes from real processes talking UDP on 127.0.0.1, except the
seen-dict bytes per entry, measured in this process with tracemalloc. CPU time
and resident memory are read from the OS (/proc on Linux); where that is
missing the figure is "n/a". See docs/performance.md for what each figure
means and the results of a full run.
"""

import argparse
import functools
import gc
import json
import math
import os
import platform
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
RCVBUF_BYTES = 4 << 20  # for the benchmark's own sinks; the kernel caps it at net.core.rmem_max
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
MAX_NODES = 200

# Sizes of each section: the full run, and --quick (which only checks that everything runs).
FULL = dict(
    relay_rounds=4, relay_messages=5000, relay_rate=5000.0, relay_burst=50, relay_max_s=2.0,
    latency_messages=300, latency_gap_s=0.005, pipe_probes=300,
    idle_s=10.0, broadcasts=50, seen_max=100_000, seen_adds=300_000, node_ids=1_000_000,
    direct_rounds=10, direct_settle_s=0.3, settle_s=60.0, idle_hello_s=30.0, idle_slice_s=3.0,
    liveness_victims=3, liveness_settle_s=15.0, liveness_timeout_s=40.0, discovery_trials=5, discovery_wait_s=4.0,
    repair_nodes=12, repair_loss=(0.0, 0.2), repair_broadcasts=40, repair_directs=20, repair_gap_s=0.1,
    repair_settle_s=5.0, repair_deadline_s=30.0, repair_tail_s=40.0, repair_idle_s=30.0,
    security_messages=20_000,
    lazy_nodes=50, lazy_messages=100, lazy_loss=(0.0, 0.2), lazy_seeds=(1, 2, 3),
)
QUICK = dict(
    relay_rounds=1, relay_messages=1000, relay_rate=5000.0, relay_burst=50, relay_max_s=0.3,
    latency_messages=20, latency_gap_s=0.005, pipe_probes=30,
    idle_s=1.0, broadcasts=5, seen_max=10_000, seen_adds=30_000, node_ids=20_000,
    direct_rounds=3, direct_settle_s=0.2, settle_s=3.0, idle_hello_s=10.0, idle_slice_s=2.0,
    liveness_victims=1, liveness_settle_s=1.0, liveness_timeout_s=10.0, discovery_trials=1, discovery_wait_s=0.5,
    repair_nodes=6, repair_loss=(0.0, 0.2), repair_broadcasts=8, repair_directs=4, repair_gap_s=0.05,
    repair_settle_s=1.5, repair_deadline_s=5.0, repair_tail_s=0.3, repair_idle_s=0.0,
    security_messages=300,
    lazy_nodes=20, lazy_messages=20, lazy_loss=(0.0, 0.2), lazy_seeds=(1,),
)
QUICK_NODES = 10
SECTIONS = ("relay", "display", "history", "seal", "latency", "scale", "memory", "direct", "idle", "liveness",
            "discovery", "repair", "security", "lazy", "files")
MESH_SECTIONS = {"scale", "direct", "idle", "liveness"}  # these share one mesh per --nodes size
LATENCY_HOPS = (1, 4, 8)
DEGREE = 4


# -- what the OS says about a process -------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") and "SC_CLK_TCK" in os.sysconf_names else 100


def thread_cpu_seconds(pid: int) -> Dict[str, float]:
    """Run time of each thread of ``pid`` so far (thread id -> seconds); empty where /proc is missing."""
    out: Dict[str, float] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[tid] = int(f.read().split()[0]) / 1e9
            except (FileNotFoundError, ValueError, IndexError):
                continue
    except OSError:
        pass
    return out


def busiest_thread_delta(before: Dict[str, float], after: Dict[str, float]) -> Optional[float]:
    """CPU of the thread that used the most between two readings: in a relaying node, the socket thread."""
    deltas = [after[t] - before.get(t, 0.0) for t in after]
    return max(deltas) if deltas else None


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system time of process ``pid`` so far, from the kernel; None where /proc is missing.

    The sum of its threads' run time from /proc/PID/task/*/schedstat (nanoseconds); where
    that is missing, utime + stime from /proc/PID/stat (the same total, in 10 ms ticks).
    """
    try:
        total = 0
        tids = os.listdir(f"/proc/{pid}/task")
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:
                continue  # a thread that just ended
        if tids:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def cpu_source() -> str:
    if os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"):
        return "/proc/PID/task/*/schedstat (ns)"
    if os.path.exists(f"/proc/{os.getpid()}/stat"):
        return "/proc/PID/stat utime+stime (ticks)"
    return "n/a"


def proc_status(pid: int, field: str) -> Optional[int]:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pss_bytes(pid: int) -> Optional[int]:
    """Proportional set size: resident memory with shared pages split between their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def udp_rcvbuf_errors() -> Optional[int]:
    """Datagrams the kernel dropped because a receive buffer was full (all of this host)."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return None


def delta(after: Optional[float], before: Optional[float]) -> Optional[float]:
    return None if after is None or before is None else after - before


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM if the benchmark dies, so no node outlives it (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# -- child processes, their stdout read as JSON lines through one selector -------------------------

class Child:
    def __init__(self, popen: subprocess.Popen, tag: object) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.tag = tag
        self.partial = b""
        self.label: Optional[str] = None  # from the ready event
        self.ready_at: Optional[float] = None
        self.open = True

    @property
    def port(self) -> int:
        assert self.label is not None
        return int(self.label.rsplit(":", 1)[1])

    def write(self, line: str) -> None:
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()


class Fleet:
    """Child processes whose stdout lines are JSON events; every one is stopped by ``close``."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.children: List[Child] = []
        self.stderr = tempfile.TemporaryFile()
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p), PYTHONUNBUFFERED="1")
        self.env.pop("NO_COLOR", None)

    def spawn(self, argv: Sequence[str], tag: object = None, stdin: bool = True) -> Child:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.stderr, cwd=REPO, env=self.env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        child = Child(popen, tag)
        os.set_blocking(popen.stdout.fileno(), False)
        self.sel.register(popen.stdout, selectors.EVENT_READ, child)
        self.children.append(child)
        return child

    def poll(self, timeout: float) -> List[Tuple[Child, dict, float]]:
        """The events that arrive within ``timeout`` (at least one read if any is ready)."""
        out = []
        for key, _ in self.sel.select(max(timeout, 0.0)):
            child: Child = key.data
            now = time.perf_counter()
            try:
                data = os.read(key.fd, 1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                self.sel.unregister(key.fileobj)
                child.open = False
                continue
            lines = (child.partial + data).split(b"\n")
            child.partial = lines.pop()
            for line in lines:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("event") == "ready":
                    child.label, child.ready_at = obj.get("node"), now
                out.append((child, obj, now))
        return out

    def wait_ready(self, children: Sequence[Child], timeout: float = READY_TIMEOUT_S) -> float:
        """Wait until each of ``children`` has said ready; the time the last one did."""
        deadline = time.perf_counter() + timeout
        waiting = [c for c in children if c.ready_at is None]
        while waiting:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{len(waiting)} of {len(children)} processes not ready within {timeout:g} s"
                                   f"{self.stderr_tail()}")
            for c in waiting:
                if c.popen.poll() is not None:
                    raise RuntimeError(f"process {c.popen.args} exited with {c.popen.returncode}"
                                       f"{self.stderr_tail()}")
            self.poll(0.05)
            waiting = [c for c in waiting if c.ready_at is None]
        return max(c.ready_at for c in children)

    def drain(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.poll(end - time.perf_counter())

    def stderr_tail(self) -> str:
        self.stderr.seek(0, os.SEEK_END)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - 2000))
        text = self.stderr.read().decode("utf-8", "replace").strip()
        return f"; stderr ends: {text}" if text else ""

    def stop(self, children: Sequence[Child]) -> None:
        """SIGTERM, then SIGKILL whatever is still running after STOP_TIMEOUT_S."""
        for c in children:
            if c.popen.poll() is None:
                c.popen.terminate()
        deadline = time.perf_counter() + STOP_TIMEOUT_S
        for c in children:
            try:
                c.popen.wait(max(deadline - time.perf_counter(), 0.01))
            except subprocess.TimeoutExpired:
                c.popen.kill()
                c.popen.wait(STOP_TIMEOUT_S)
            for stream in (c.popen.stdin, c.popen.stdout):
                if stream is not None:
                    if stream is c.popen.stdout and c.open:
                        self.sel.unregister(stream)
                        c.open = False
                    try:
                        stream.close()
                    except OSError:
                        pass
        gone = set(id(c) for c in children)
        self.children = [c for c in self.children if id(c) not in gone]

    def close(self) -> None:
        self.stop(list(self.children))
        self.sel.close()
        self.stderr.close()


# Where the benchmark's nodes keep their history: a temporary folder of this run (set by main),
# never the user's data folder; None: nodes keep none (--no-history).
DATA_ROOT: Optional[str] = None


def history_args(history: bool = True) -> List[str]:
    """History as a user has it (on, in a folder of its own for each node), or --no-history.

    A folder per node, never reused: a node that found an earlier node's history (a port used
    again) would behave as one restarted, and ask its neighbours to catch it up."""
    if not history or DATA_ROOT is None:
        return ["--no-history"]
    return ["--data-dir", tempfile.mkdtemp(prefix="node-", dir=DATA_ROOT)]


def meshchat_argv(*args: str, discover: bool = False, history: bool = True) -> List[str]:
    """A meshchat command; no discovery unless asked: the benchmark's topologies are what it configures."""
    return [sys.executable, "-m", "meshchat", "--discover" if discover else "--no-discover",
            *history_args(history), *args]


# -- UDP helpers -------------------------------------------------------------------------------------

def flow_window() -> int:
    """Datagrams a benchmark may have on the way to one relay: well within its receive buffer.

    A meshchat node asks for a 1 MiB buffer, which Linux caps at net.core.rmem_max and doubles;
    a small datagram takes up to 2 KiB of it, bookkeeping included.
    """
    rmem = machine_rmem_max() or 212992
    return max(32, min(512, 2 * min(1 << 20, rmem) // 2048 // 2))


def machine_rmem_max() -> Optional[int]:
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def udp_socket(rcvbuf: int = 0, blocking: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        except OSError:
            pass
    s.bind((HOST, 0))
    s.setblocking(blocking)
    return s


def label_of(s: socket.socket) -> str:
    return f"{HOST}:{s.getsockname()[1]}"


def reserve_ports(count: int) -> List[int]:
    """``count`` distinct ports free now: all bound at once, then released for the nodes."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Datagrams:
    """Unique CHAT datagrams in meshchat's compact wire form, with a fresh ``ts``."""

    def __init__(self, src_label: str, ttl: int = 8, body: str = "benchmark message, about as long as a chat line") -> None:
        self.prefix = os.urandom(4).hex()
        self.src = src_label
        self.ttl = ttl
        self.body = body
        self.ts = time.time()

    def make(self, i: int, body: Optional[str] = None) -> bytes:
        if i & 1023 == 0:
            self.ts = time.time()
        return (b'{"mid":"%s%024x","ts":%r,"ttl":%d,"kind":"CHAT","src":"%s","dst":"","body":"%s"}' % (
            self.prefix.encode(), i, self.ts, self.ttl, self.src.encode(), (body or self.body).encode()))


def _drain(sinks: Sequence[socket.socket], counts: List[int], buf: bytearray) -> int:
    got = 0
    for i, s in enumerate(sinks):
        while True:
            try:
                n = s.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            if b'"kind":"HELLO"' in buf[:n]:
                continue  # the node greeting its peers (membership), not a copy of ours
            counts[i] += 1
            got += 1
    return got


def _finish(sinks, counts, buf, expected: int, quiet_s: float, hard_s: float,
            every: Optional[Callable[[], None]] = None) -> float:
    """Wait for the copies still on the way: until each sink has ``expected``, or none came for ``quiet_s``."""
    now = time.perf_counter()
    quiet_until, hard = now + quiet_s, now + hard_s
    last = now
    while min(counts) < expected and time.perf_counter() < min(quiet_until, hard):
        selectors_select(sinks, 0.02)
        if every is not None:
            every()
        if _drain(sinks, counts, buf):
            last = time.perf_counter()
            quiet_until = last + quiet_s
    return last


def selectors_select(socks, timeout: float) -> None:
    import select

    select.select(socks, [], [], max(timeout, 0.0))


def drive_paced(src: socket.socket, dest: Tuple[str, int], sinks: Sequence[socket.socket],
                datagrams: Sequence[bytes], rate: float, burst: int = 1,
                every: Optional[Callable[[], None]] = None) -> dict:
    """Send ``datagrams`` at ``rate`` a second, ``burst`` at a time, counting what each sink receives.

    ``every`` is called on each turn of the loop (e.g. to read what the relay displays)."""
    counts = [0] * len(sinks)
    buf = bytearray(1 << 16)
    n = len(datagrams)
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + 2.0 * n / rate + 5.0
    while sent < n:
        now = time.perf_counter()
        if now > deadline:
            break
        due = min(n, (int((now - t0) * rate / burst) + 1) * burst)
        while sent < due:
            src.sendto(datagrams[sent], dest)
            sent += 1
        _drain(sinks, counts, buf)
        if every is not None:
            every()
        wait = t0 + sent / rate - time.perf_counter()
        if wait > 0:
            selectors_select(sinks, min(wait, 0.01))
    t_sent = time.perf_counter()
    _drain(sinks, counts, buf)
    _finish(sinks, counts, buf, sent, quiet_s=0.5, hard_s=10.0, every=every)
    return {"sent": sent, "received": counts, "seconds": t_sent - t0}


def drive_window(src: socket.socket, dest: Tuple[str, int], sinks: Sequence[socket.socket],
                 make: Callable[[int], bytes], count: int, seconds: float, window: int,
                 every: Optional[Callable[[], None]] = None) -> dict:
    """As fast as the relay goes with at most ``window`` messages on the way, so no buffer overflows."""
    counts = [0] * len(sinks)
    buf = bytearray(1 << 16)
    sent = lost = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    last_progress = last_hook = t0
    while sent < count:
        now = time.perf_counter()
        if now > end:
            break
        done = min(counts) + lost
        room = min(window - (sent - done), count - sent)
        for _ in range(room):
            src.sendto(make(sent), dest)
            sent += 1
        selectors_select(sinks, 0.05)
        now = time.perf_counter()
        if _drain(sinks, counts, buf):
            last_progress = now
        elif sent > min(counts) + lost and now - last_progress > 0.25:
            lost = sent - min(counts)  # nothing for a while: what is on the way is lost
            last_progress = now
        if every is not None and now - last_hook > 0.5:
            every()
            last_hook = now
    last = _finish(sinks, counts, buf, sent, quiet_s=0.3, hard_s=5.0)
    return {"sent": sent, "received": counts, "seconds": max(last - t0, 1e-9)}


# -- the reference relays, run as child processes by --serve ------------------------------------------

def serve_bare(sock: socket.socket, peers: List[Tuple[str, int]]) -> None:
    """The floor: recvfrom, then sendto every peer but the sender; no parsing."""
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(65535)
        for p in peers:
            if p != addr:
                sendto(data, p)


def serve_straightforward(sock: socket.socket, peers: List[Tuple[str, int]], show: bool = False) -> None:
    """A correct relay written the obvious way: json.loads, a dict of seen ids, ttl - 1, json.dumps.

    ``show``: it also shows every message, a JSON line on stdout, flushed, from the socket thread
    (what a displaying node is measured against, issue 14)."""
    seen: Dict[str, float] = {}
    out_stream = sys.stdout
    while True:
        data, addr = sock.recvfrom(65535)
        try:
            msg = json.loads(data)
            mid = msg["mid"]
            ttl = int(msg["ttl"]) - 1
        except (ValueError, KeyError, TypeError):
            continue
        if mid in seen:
            continue
        seen[mid] = time.monotonic()
        if show:
            out_stream.write(json.dumps(dict(msg, event="chat")) + "\n")
            out_stream.flush()
        if ttl <= 0:
            continue
        msg["ttl"] = ttl
        out = json.dumps(msg).encode()
        for p in peers:
            if p != addr:
                sock.sendto(out, p)


SERVERS = {"bare": serve_bare, "straightforward": serve_straightforward,
           "straightforward_printing": functools.partial(serve_straightforward, show=True)}


def serve(kind: str, peer_texts: List[str]) -> int:
    peers = []
    for text in peer_texts:
        host, port = text.rsplit(":", 1)
        peers.append((host, int(port)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # as a meshchat node asks for
    sock.bind((HOST, 0))

    def stop_at_eof() -> None:  # the benchmark has gone: so do we
        try:
            while os.read(0, 1024):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=stop_at_eof, daemon=True).start()
    sys.stdout.write(json.dumps({"event": "ready", "node": label_of(sock)}) + "\n")
    sys.stdout.flush()
    try:
        SERVERS[kind](sock, peers)
    except KeyboardInterrupt:
        pass
    return 0


# -- 1. relay cost ---------------------------------------------------------------------------------

RELAYS = ("bare", "straightforward", "meshchat", "meshchat_no_trace")  # the last: --no-trace (issue 13)


def bench_relay(cfg: dict, fleet: Fleet) -> dict:
    src = udp_socket()
    sinks = [udp_socket(RCVBUF_BYTES, blocking=False) for _ in range(2)]
    peer_labels = [label_of(s) for s in (src, *sinks)]
    script = os.path.abspath(__file__)
    argvs = {
        "bare": [sys.executable, script, "--serve", "bare", "--serve-peers", *peer_labels],
        "straightforward": [sys.executable, script, "--serve", "straightforward", "--serve-peers", *peer_labels],
        "meshchat": meshchat_argv("--port", "0", "--peers", *peer_labels, "--headless", "--quiet", "--json",
                                  # Limits stay on: a bucket far above the paced rate.
                                  "--rate-limit", "1000000"),
    }
    argvs["meshchat_no_trace"] = argvs["meshchat"] + ["--no-trace"]
    procs = {name: fleet.spawn(argv, tag=name, stdin=not name.startswith("meshchat")) for name, argv in argvs.items()}
    try:
        fleet.wait_ready(list(procs.values()))
        fleet.drain(0.3)
        gen = Datagrams(label_of(src))
        rows: Dict[str, dict] = {name: {"rounds_cpu_us": [], "rounds_cpu_us_burst": [], "sent": 0, "received": 0}
                                 for name in RELAYS}
        drops_before = udp_rcvbuf_errors()
        # Rounds take turns, so that a change in the machine's load hits every relay alike.
        index = 0
        for _ in range(cfg["relay_rounds"]):
            for burst, key in ((1, "rounds_cpu_us"), (cfg["relay_burst"], "rounds_cpu_us_burst")):
                for name in RELAYS:
                    p = procs[name]
                    batch = [gen.make(index + i) for i in range(cfg["relay_messages"])]
                    index += len(batch)
                    before = cpu_seconds(p.pid)
                    got = drive_paced(src, (HOST, p.port), sinks, batch, cfg["relay_rate"], burst)
                    used = delta(cpu_seconds(p.pid), before)
                    row = rows[name]
                    row["sent"] += got["sent"]
                    row["received"] += sum(got["received"])
                    if used is not None:
                        row[key].append(used / got["sent"] * 1e6)
        paced_drops = delta(udp_rcvbuf_errors(), drops_before)
        for name in RELAYS:
            p, row = procs[name], rows[name]
            row["delivered_fraction"] = row["received"] / (2 * row["sent"]) if row["sent"] else None
            row["cpu_us_per_msg"] = median(row["rounds_cpu_us"])
            row["cpu_us_per_msg_burst"] = median(row["rounds_cpu_us_burst"])
            base = index
            before, t_before = cpu_seconds(p.pid), time.perf_counter()
            got = drive_window(src, (HOST, p.port), sinks, lambda i: gen.make(base + i), count=10 ** 9,
                               seconds=cfg["relay_max_s"], window=flow_window())
            index += got["sent"] + 1
            used = delta(cpu_seconds(p.pid), before)
            relayed = got["received"][0]
            row["max_rate_per_s"] = relayed / got["seconds"]
            row["max_rate_lost"] = got["sent"] - min(got["received"])
            row["max_rate_cpu_us_per_msg"] = used / relayed * 1e6 if used is not None and relayed else None
            row["max_rate_busy"] = used / (time.perf_counter() - t_before) if used is not None else None
        out = {
            "paced_rate_per_s": cfg["relay_rate"],
            "burst": cfg["relay_burst"],
            "messages_per_relay": 2 * cfg["relay_messages"] * cfg["relay_rounds"],
            "rounds": cfg["relay_rounds"],
            "peers": 3,
            "max_rate_window": flow_window(),
            "kernel_rcvbuf_drops_paced": paced_drops,
            "relays": rows,
        }
        for suffix in ("", "_burst"):
            node, bare, simple = (rows[n]["cpu_us_per_msg" + suffix] for n in ("meshchat", "bare", "straightforward"))
            out["ratio_node_bare" + suffix] = node / bare if node and bare else None
            out["ratio_node_straightforward" + suffix] = node / simple if node and simple else None
            off = rows["meshchat_no_trace"]["cpu_us_per_msg" + suffix]
            out["ratio_trace_on_off" + suffix] = node / off if node and off else None
        out["in_process"] = bench_relay_in_process(cfg)
        return out
    finally:
        fleet.stop(list(procs.values()))
        for s in (src, *sinks):
            s.close()


# -- 1e. relay cost in this process, warm: the rules against the architecture ----------------------

def bench_relay_in_process(cfg: dict) -> dict:
    """What section 1's one-at-a-time figure is made of, measured where caches stay warm and no
    other process runs in between: the decision alone (Relay.datagram_received, the relay built as
    the CLI builds it: membership, delivery, signatures when the secure extra is there, tracing)
    against the straightforward relay's (json.loads, ttl - 1, json.dumps); then the whole socket
    thread's path for one datagram on loopback (select, timers, drain, decision, two sendto), and
    the same with a relay that decides nothing, against the straightforward and bare loops (a
    blocking recvfrom, then the sendto). Best of 5 slices, µs per relayed message."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)  # this checkout's meshchat, as the child processes run it
    from meshchat import crypto
    from meshchat.membership import MembershipConfig
    from meshchat.node import History, Node, Security
    from meshchat.relay import RelayConfig, Send

    count = 2000 if cfg is QUICK else 20000
    socks = [udp_socket(RCVBUF_BYTES, blocking=False) for _ in range(3)]
    src, sinks = socks[0], socks[1:]
    peers = [s.getsockname() for s in socks]
    node = Node(RelayConfig(label="", display=False, rate_limit=1_000_000.0), HOST, 0, peers,
                membership=MembershipConfig(label=""), history=History(enabled=False),
                security=Security() if crypto.available() else None)
    plain = udp_socket()
    gen = Datagrams(label_of(src))
    buf = bytearray(1 << 16)
    index = [0]

    def fresh(n: int) -> List[bytes]:
        out = [gen.make(index[0] + i) for i in range(n)]
        index[0] += n
        return out

    def best(run: Callable[[List[bytes]], None]) -> float:
        run(fresh(count // 10))  # warm up
        times = []
        for _ in range(5):
            batch = fresh(count // 5)
            t0 = time.perf_counter()
            run(batch)
            times.append((time.perf_counter() - t0) / len(batch) * 1e6)
            _drain(sinks + [src], [0, 0, 0], buf)
        return min(times)

    relay, src_addr = node.relay, peers[0]
    seen: Dict[str, float] = {}

    def decide(batch: List[bytes]) -> None:
        now, wall = time.monotonic(), time.time()
        for data in batch:
            relay.datagram_received(data, src_addr, now, wall)

    def decide_straightforward(batch: List[bytes]) -> None:
        for data in batch:
            msg = json.loads(data)
            mid, ttl = msg["mid"], int(msg["ttl"]) - 1
            if mid in seen:
                continue
            seen[mid] = time.monotonic()
            msg["ttl"] = ttl
            json.dumps(msg).encode()

    select, dest = node._selector.select, node.addr

    def node_loop(batch: List[bytes]) -> None:
        for i, data in enumerate(batch):
            src.sendto(data, dest)
            for key, _ in select(node._tick()):
                key.data()
            if i & 63 == 63:
                _drain(sinks + [src], [0, 0, 0], buf)

    def loop(forward: Callable[[bytes, Tuple[str, int]], None]) -> Callable[[List[bytes]], None]:
        to = plain.getsockname()

        def run(batch: List[bytes]) -> None:
            for i, data in enumerate(batch):
                src.sendto(data, to)
                forward(*plain.recvfrom(65535))
                if i & 63 == 63:
                    _drain(sinks + [src], [0, 0, 0], buf)
        return run

    def straightforward(data: bytes, addr: Tuple[str, int]) -> None:
        msg = json.loads(data)
        mid, ttl = msg["mid"], int(msg["ttl"]) - 1
        if mid in seen:
            return
        seen[mid] = time.monotonic()
        msg["ttl"] = ttl
        out = json.dumps(msg).encode()
        for p in peers:
            if p != addr:
                plain.sendto(out, p)

    def bare(data: bytes, addr: Tuple[str, int]) -> None:
        for p in peers:
            if p != addr:
                plain.sendto(data, p)

    try:
        out = {"decision_us": best(decide), "straightforward_decision_us": best(decide_straightforward),
               "node_loop_us": best(node_loop), "straightforward_loop_us": best(loop(straightforward)),
               "bare_loop_us": best(loop(bare))}
        targets = tuple(peers[1:])
        relay.datagram_received = lambda data, addr, now, wall: [Send(data, targets)]
        out["node_loop_deciding_nothing_us"] = best(node_loop)
        out["relayed"] = relay.counters.relayed
        return out
    finally:
        node._close()
        for s in (*socks, plain):
            s.close()


def take_turns(cfg: dict, names: Sequence[str], procs: Dict[str, Child], src: socket.socket,
               sinks: Sequence[socket.socket], gen: "Datagrams", every: Optional[Callable[[], None]] = None,
               settle: Optional[Callable[[str, int], None]] = None) -> Dict[str, dict]:
    """Section 1's pacing for each relay in ``names``, taking turns, so that a change in the machine's
    load hits every relay alike: per relay the CPU µs per message one at a time and in bursts, of the
    whole process and of its busiest thread (its socket thread). ``settle(name, sent_so_far)`` waits
    for what a relay does after the last copy has gone (showing, saving)."""
    rows = {name: {"rounds_cpu_us": [], "rounds_cpu_us_burst": [], "rounds_net_us": [], "rounds_net_us_burst": [],
                   "sent": 0, "received": 0} for name in names}
    index = 0
    for _ in range(cfg["relay_rounds"]):
        for burst, key in ((1, "rounds_cpu_us"), (cfg["relay_burst"], "rounds_cpu_us_burst")):
            for name in names:
                p, row = procs[name], rows[name]
                batch = [gen.make(index + i) for i in range(cfg["relay_messages"])]
                index += len(batch)
                before = cpu_seconds(p.pid)
                threads_before = thread_cpu_seconds(p.pid)
                got = drive_paced(src, (HOST, p.port), sinks, batch, cfg["relay_rate"], burst, every=every)
                if settle is not None:
                    settle(name, row["sent"] + got["sent"])
                used = delta(cpu_seconds(p.pid), before)
                net = busiest_thread_delta(threads_before, thread_cpu_seconds(p.pid))
                row["sent"] += got["sent"]
                row["received"] += sum(got["received"])
                if used is not None:
                    row[key].append(used / got["sent"] * 1e6)
                if net is not None:
                    row[key.replace("cpu", "net")].append(net / got["sent"] * 1e6)
    for row in rows.values():
        row["delivered_fraction"] = row["received"] / (2 * row["sent"]) if row["sent"] else None
        for suffix in ("", "_burst"):
            row["cpu_us_per_msg" + suffix] = median(row["rounds_cpu_us" + suffix])
            net = row["rounds_net_us" + suffix]
            row["net_us_per_msg" + suffix] = median(net) if net else None
    return rows


# -- 1d. display cost: a node showing every message against a straightforward relay printing it ------

DISPLAY_RELAYS = ("straightforward_printing", "meshchat_json", "meshchat_terminal")


def bench_display(cfg: dict, fleet: Fleet) -> dict:
    """CPU per message of relays that show every message they relay, as section 1 paces them: the
    straightforward relay printing a flushed JSON line per message in its socket thread, and
    meshchat --json and the terminal console (--no-history: section 1b has history's cost). What
    they print is read as it comes, so no pipe fills."""
    src = udp_socket()
    sinks = [udp_socket(RCVBUF_BYTES, blocking=False) for _ in range(2)]
    peer_labels = [label_of(s) for s in (src, *sinks)]
    script = os.path.abspath(__file__)
    node = ["--peers", *peer_labels, "--headless", "--rate-limit", "1000000"]
    terminal_port = reserve_ports(1)[0]  # the terminal console says no JSON ready line with its port
    argvs = {
        "straightforward_printing": [sys.executable, script, "--serve", "straightforward_printing",
                                     "--serve-peers", *peer_labels],
        "meshchat_json": meshchat_argv("--port", "0", *node, "--json", history=False),
        "meshchat_terminal": meshchat_argv("--port", str(terminal_port), *node, history=False),
    }
    procs = {name: fleet.spawn(argv, tag=("display", name), stdin=not name.startswith("meshchat"))
             for name, argv in argvs.items()}
    procs["meshchat_terminal"].label = f"{HOST}:{terminal_port}"
    lines = {name: 0 for name in DISPLAY_RELAYS}

    def read() -> None:
        for child, _, _ in fleet.poll(0):
            if isinstance(child.tag, tuple) and child.tag[0] == "display":
                lines[child.tag[1]] += 1

    try:
        fleet.wait_ready([procs["straightforward_printing"], procs["meshchat_json"]])
        fleet.drain(1.0)  # the terminal node prints no ready event: give it the time the others took
        # The last lines are written after the last copy went.
        rows = take_turns(cfg, DISPLAY_RELAYS, procs, src, sinks, Datagrams(label_of(src)), every=read,
                          settle=lambda name, sent: fleet.drain(0.2))
        out = {"paced_rate_per_s": cfg["relay_rate"], "burst": cfg["relay_burst"], "rounds": cfg["relay_rounds"],
               "messages_per_relay": 2 * cfg["relay_messages"] * cfg["relay_rounds"], "relays": rows}
        for suffix in ("", "_burst"):
            ref = rows["straightforward_printing"]["cpu_us_per_msg" + suffix]
            for name in ("meshchat_json", "meshchat_terminal"):
                mine = rows[name]["cpu_us_per_msg" + suffix]
                out[f"ratio_{name}" + suffix] = mine / ref if mine and ref else None
        return out
    finally:
        fleet.stop(list(procs.values()))
        for s in (src, *sinks):
            s.close()


# -- 1b. relay cost with history on and off ---------------------------------------------------------

HISTORY_RELAYS = ("off", "on")


def bench_history(cfg: dict, fleet: Fleet) -> dict:
    """Relay cost of a node that displays what it relays, keeping history on disk or not.

    Both nodes run ``--json`` (not ``--quiet``, so every message is displayed and, with
    history on, written to SQLite in a temporary --data-dir by the store's writer thread),
    with the same peers and pacing as section 1, taking turns. CPU is the whole process's,
    the writer thread included; what they display is read as it comes, so no pipe fills."""
    src = udp_socket()
    sinks = [udp_socket(RCVBUF_BYTES, blocking=False) for _ in range(2)]
    peer_labels = [label_of(s) for s in (src, *sinks)]
    argvs = {name: meshchat_argv("--port", "0", "--peers", *peer_labels, "--json", "--rate-limit", "1000000",
                                 history=name == "on") for name in HISTORY_RELAYS}
    data_dir = argvs["on"][argvs["on"].index("--data-dir") + 1] if "--data-dir" in argvs["on"] else None
    procs = {name: fleet.spawn(argv, tag=("history", name)) for name, argv in argvs.items()}
    shown = {name: 0 for name in HISTORY_RELAYS}

    def read() -> None:
        for child, obj, _ in fleet.poll(0):
            if obj.get("event") == "chat" and isinstance(child.tag, tuple) and child.tag[0] == "history":
                shown[child.tag[1]] += 1

    try:
        fleet.wait_ready(list(procs.values()))
        fleet.drain(0.3)
        def settle(name: str, sent: int) -> None:
            # The display and the history writer finish after the last copy has gone.
            end = time.perf_counter() + 2.0
            while shown[name] < sent and time.perf_counter() < end:
                read()
                time.sleep(0.005)

        # net_us_per_msg is the relaying path alone: the socket thread (the busiest), without the
        # store's writer and the console, which history adds work to but which never hold up a relay.
        rows = take_turns(cfg, HISTORY_RELAYS, procs, src, sinks, Datagrams(label_of(src)), every=read,
                          settle=settle)
        fleet.drain(0.5)
        stats = collect_stats(fleet, [procs[name] for name in HISTORY_RELAYS])
        for k, name in enumerate(HISTORY_RELAYS):
            row, st = rows[name], stats.get(k, {})
            row["shown"] = shown[name]
            row["displayed"] = st.get("displayed")
            row["history_commits"] = st.get("history_commits")
            row["history_rows"] = history_rows(data_dir) if name == "on" else None
        out = {"paced_rate_per_s": cfg["relay_rate"], "burst": cfg["relay_burst"], "rounds": cfg["relay_rounds"],
               "messages_per_relay": 2 * cfg["relay_messages"] * cfg["relay_rounds"], "relays": rows}
        for suffix in ("", "_burst"):
            on, off = (rows[n]["cpu_us_per_msg" + suffix] for n in ("on", "off"))
            out["ratio_on_off" + suffix] = on / off if on and off else None
            on, off = (rows[n]["net_us_per_msg" + suffix] for n in ("on", "off"))
            out["net_ratio_on_off" + suffix] = on / off if on and off else None
        return out
    finally:
        fleet.stop(list(procs.values()))
        for s in (src, *sinks):
            s.close()


# -- 1c. relay cost with a network key on and off (closed meshes) -------------------------------

SEAL_RELAYS = ("off", "on")


def bench_seal(cfg: dict, fleet: Fleet) -> dict:
    """Relay cost of a node with --network-key (every datagram opened, and every copy sealed) against
    one without, as in section 1 (--quiet, same peers and pacing, taking turns). The benchmark seals
    what it sends to the keyed node beforehand, so its own sealing is not in the figures; and the
    primitives alone, in this process: seal and open of one chat datagram."""
    sys.path.insert(0, REPO)
    from meshchat import crypto

    if not crypto.available():
        raise RuntimeError("needs the secure extra: pip install 'meshchat[secure]'")
    key_dir = tempfile.mkdtemp(prefix="meshchat-bench-key-")
    key_file = os.path.join(key_dir, "mesh.key")
    crypto.write_network_key(key_file)
    key = crypto.load_network_key(key_file)
    src = udp_socket()
    sinks = [udp_socket(RCVBUF_BYTES, blocking=False) for _ in range(2)]
    peer_labels = [label_of(s) for s in (src, *sinks)]
    common = ("--port", "0", "--peers", *peer_labels, "--headless", "--quiet", "--json", "--rate-limit", "1000000")
    argvs = {"off": meshchat_argv(*common), "on": meshchat_argv(*common, "--network-key", key_file)}
    procs = {name: fleet.spawn(argv, tag=("seal", name), stdin=False) for name, argv in argvs.items()}
    try:
        fleet.wait_ready(list(procs.values()))
        fleet.drain(0.3)
        gen = Datagrams(label_of(src))
        rows = {name: {"rounds_cpu_us": [], "rounds_cpu_us_burst": [], "sent": 0, "received": 0}
                for name in SEAL_RELAYS}
        index = 0
        for _ in range(cfg["relay_rounds"]):
            for burst, k in ((1, "rounds_cpu_us"), (cfg["relay_burst"], "rounds_cpu_us_burst")):
                for name in SEAL_RELAYS:
                    p = procs[name]
                    batch = [gen.make(index + i) for i in range(cfg["relay_messages"])]
                    index += len(batch)
                    if name == "on":
                        batch = [crypto.seal(key, d) for d in batch]
                    before = cpu_seconds(p.pid)
                    got = drive_paced(src, (HOST, p.port), sinks, batch, cfg["relay_rate"], burst)
                    used = delta(cpu_seconds(p.pid), before)
                    row = rows[name]
                    row["sent"] += got["sent"]
                    row["received"] += sum(got["received"])
                    if used is not None:
                        row[k].append(used / got["sent"] * 1e6)
        for name in SEAL_RELAYS:
            row = rows[name]
            row["delivered_fraction"] = row["received"] / (2 * row["sent"]) if row["sent"] else None
            row["cpu_us_per_msg"] = median(row["rounds_cpu_us"])
            row["cpu_us_per_msg_burst"] = median(row["rounds_cpu_us_burst"])
        one = gen.make(index)
        n = 20_000 if cfg is FULL else 2000
        t0 = time.perf_counter()
        sealed = [crypto.seal(key, one) for _ in range(n)]
        t1 = time.perf_counter()
        for d in sealed:
            crypto.unseal(key, d)
        t2 = time.perf_counter()
        out = {"paced_rate_per_s": cfg["relay_rate"], "burst": cfg["relay_burst"], "rounds": cfg["relay_rounds"],
               "messages_per_relay": 2 * cfg["relay_messages"] * cfg["relay_rounds"], "relays": rows,
               "datagram_bytes": len(one), "overhead_bytes": crypto.SEAL_OVERHEAD_BYTES,
               "seal_us": (t1 - t0) / n * 1e6, "unseal_us": (t2 - t1) / n * 1e6}
        for suffix in ("", "_burst"):
            on, off = (rows[name]["cpu_us_per_msg" + suffix] for name in SEAL_RELAYS[::-1])
            out["ratio_on_off" + suffix] = on / off if on and off else None
        return out
    finally:
        fleet.stop(list(procs.values()))
        for s in (src, *sinks):
            s.close()
        shutil.rmtree(key_dir, ignore_errors=True)


def history_rows(data_dir: Optional[str]) -> Optional[int]:
    """Messages in the history databases under ``data_dir``, read from SQLite (/stats has no true count)."""
    import glob
    import sqlite3

    if data_dir is None:
        return None
    total = 0
    for path in glob.glob(os.path.join(data_dir, "*", "history.db")):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            total += con.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            con.close()
    return total


def median(values: Sequence[float]) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Nearest rank."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# -- 2. latency --------------------------------------------------------------------------------------

PIPE_PROBE = r"""
import os, sys, time
n, gap = int(sys.argv[1]), float(sys.argv[2])
os.write(1, b'{"event":"ready","node":"probe"}\n')
sys.stdin.readline()
for i in range(n):
    os.write(1, b'{"event":"probe","t":%r}\n' % time.perf_counter())
    time.sleep(gap)
"""


def bench_pipe(cfg: dict, fleet: Fleet) -> Optional[dict]:
    """How late a line written by a child is read here: the pipe and this reader's share of latency."""
    probe = fleet.spawn([sys.executable, "-c", PIPE_PROBE, str(cfg["pipe_probes"]), str(cfg["latency_gap_s"])])
    try:
        fleet.wait_ready([probe])
        probe.write("go")
        delays = []
        deadline = time.perf_counter() + cfg["pipe_probes"] * cfg["latency_gap_s"] * 3 + 5
        while len(delays) < cfg["pipe_probes"] and time.perf_counter() < deadline:
            for child, obj, at in fleet.poll(0.1):
                if child is probe and obj.get("event") == "probe":
                    delays.append((at - obj["t"]) * 1000.0)
        if not delays or min(delays) < 0 or max(delays) > 1000:
            return None  # perf_counter is not one clock across processes here
        return stats_ms(delays)
    finally:
        fleet.stop([probe])


def stats_ms(values: Sequence[float]) -> dict:
    return {"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99), "max_ms": max(values),
            "count": len(values)}


def bench_latency(cfg: dict, fleet: Fleet) -> dict:
    out: dict = {"pipe_overhead": bench_pipe(cfg, fleet), "lines": []}
    sock = udp_socket()
    # Each line is built from its far end, so every node can be given its next hop's label
    # from that node's ready event (--port 0: no port is guessed). The first node's upstream
    # is this benchmark's socket, so a line of h hops is h meshchat processes.
    lines: Dict[int, List[Child]] = {h: [] for h in LATENCY_HOPS}
    try:
        for depth in range(max(LATENCY_HOPS)):
            layer = []
            for h in LATENCY_HOPS:
                if depth < h:
                    nxt = lines[h][0] if lines[h] else None
                    peers = ["--peers", nxt.label] if nxt else []
                    layer.append(fleet.spawn(meshchat_argv("--port", "0", "--json", *peers), tag=("line", h)))
            fleet.wait_ready(layer)
            for child in layer:
                lines[child.tag[1]].insert(0, child)
        fleet.drain(0.3)
        for h in LATENCY_HOPS:
            first, last = lines[h][0], lines[h][-1]
            gen = Datagrams(label_of(sock), ttl=h)
            delays: List[float] = []
            gc.disable()
            try:
                for k in range(cfg["latency_messages"]):
                    body = f"latency {h} {k}"
                    data = gen.make(k, body)
                    t_send = time.perf_counter()
                    sock.sendto(data, (HOST, first.port))
                    deadline = t_send + 1.0
                    got = None
                    while got is None and time.perf_counter() < deadline:
                        for child, obj, at in fleet.poll(deadline - time.perf_counter()):
                            if child is last and obj.get("event") == "chat" and obj.get("body") == body:
                                got = at
                    if got is not None:
                        delays.append((got - t_send) * 1000.0)
                    pause = t_send + cfg["latency_gap_s"] - time.perf_counter()
                    if pause > 0:
                        fleet.drain(pause)
            finally:
                gc.enable()
            row = {"hops": h, "sent": cfg["latency_messages"], "received": len(delays)}
            if delays:
                row.update(stats_ms(delays))
                row["p50_per_hop_ms"] = row["p50_ms"] / h
            out["lines"].append(row)
        by_hops = {r["hops"]: r for r in out["lines"] if "p50_ms" in r}
        lo, hi = min(LATENCY_HOPS), max(LATENCY_HOPS)
        if lo in by_hops and hi in by_hops:
            out["marginal_p50_per_hop_ms"] = (by_hops[hi]["p50_ms"] - by_hops[lo]["p50_ms"]) / (hi - lo)
        return out
    finally:
        fleet.stop([c for h in LATENCY_HOPS for c in lines[h]])
        sock.close()


# -- 3. scale, 5. flood efficiency, 6. direct messages, 7. idle traffic, 8. dead neighbours -------------

def topology(n: int, degree: int, seed: int) -> List[Set[int]]:
    """The random topology of spawn_local_mesh.py: a ring, then random links up to ``degree``."""
    from spawn_local_mesh import neighbours  # beside this script

    return neighbours(n, "random", degree, seed)


def distances(links: List[Set[int]], start: int) -> Dict[int, int]:
    dist = {start: 0}
    todo = [start]
    for a in todo:
        for b in links[a]:
            if b not in dist:
                dist[b] = dist[a] + 1
                todo.append(b)
    return dist


def eccentricity(links: List[Set[int]], start: int) -> int:
    dist = distances(links, start)
    return max(dist.values()) if len(dist) == len(links) else -1


def collect_stats(fleet: Fleet, nodes: Sequence[Child], timeout: float = 20.0) -> Dict[int, dict]:
    for c in nodes:
        c.write("/stats")
    want = {id(c): i for i, c in enumerate(nodes)}
    got: Dict[int, dict] = {}
    deadline = time.perf_counter() + timeout
    while len(got) < len(nodes) and time.perf_counter() < deadline:
        for child, obj, _ in fleet.poll(0.1):
            if obj.get("event") == "stats" and id(child) in want:
                got[want[id(child)]] = obj
    return got


def membership_constants() -> dict:
    sys.path.insert(0, REPO)
    from meshchat import membership

    return {name: getattr(membership, name) for name in (
        "HELLO_MAX_S", "DOWN_AFTER_INTERVALS", "DOWN_AFTER_S", "DOWN_MARGIN_S", "PEER_IVL_CAP_S", "PRESENCE_MIN_S",
        "PRESENCE_PER_MEMBER_S", "PRESENCE_MAX_S")}


def down_bound_s(hello_max_s: float) -> float:
    """The longest silence before a neighbour is down: 3 of the intervals its HELLOs announce, at most DOWN_AFTER_S."""
    c = membership_constants()
    ivl = min(hello_max_s + c["DOWN_MARGIN_S"], c["PEER_IVL_CAP_S"])
    return min(c["DOWN_AFTER_INTERVALS"] * ivl, c["DOWN_AFTER_S"])


class Mesh:
    """A random degree-4 mesh of meshchat processes (``--ttl`` forced, so hops can be read off the ttl).

    With ``sink``, one node also lists a socket of this benchmark as a peer: a seed-design
    neighbour that never says HELLO and never sends, so no node ever learns a route to it
    and every direct message to it floods (section 6). It gets CHAT copies only."""

    def __init__(self, fleet: Fleet, n: int, seed: int, sink: bool = False,
                 argv: Callable[..., List[str]] = meshchat_argv) -> None:
        self.fleet, self.n = fleet, n
        self.links = topology(n, DEGREE, seed)
        self.diameter = max(eccentricity(self.links, a) for a in range(n))
        # The default ttl, or the diameter and two hops of slack if that is more, as a user
        # should set it: on a busy machine half the first copies come by a longer path.
        self.ttl = min(16, max(8, self.diameter + 2))
        self.edges = sum(len(x) for x in self.links) // 2
        self.nodes: List[Child] = []
        self.killed: Set[int] = set()
        self.last_broadcast_at: Optional[float] = None  # when the benchmark last had a node write a line
        self.sink = udp_socket(RCVBUF_BYTES, blocking=False) if sink else None
        self.sink_at = random.Random(seed + 3).randrange(n) if sink else None
        self.started = time.perf_counter()
        try:
            ports = reserve_ports(n)
            for i in range(n):
                peers = [f"{HOST}:{ports[j]}" for j in sorted(self.links[i])]
                if i == self.sink_at:
                    peers.append(self.sink_label)
                self.nodes.append(fleet.spawn(argv("--port", str(ports[i]), "--peers", *peers, "--json",
                                                   "--ttl", str(self.ttl)), tag=("mesh", i)))
            self.ready_at = fleet.wait_ready(self.nodes, timeout=READY_TIMEOUT_S + 0.5 * n)
        except BaseException:
            self.close()
            raise
        self.ready_s = self.ready_at - self.started
        self.index = {id(c): i for i, c in enumerate(self.nodes)}

    @property
    def sink_label(self) -> str:
        assert self.sink is not None
        return label_of(self.sink)

    def alive(self) -> List[int]:
        return [i for i in range(self.n) if i not in self.killed]

    def counts(self) -> Dict[int, dict]:
        """Every live node's /stats, by node index."""
        alive = self.alive()
        got = collect_stats(self.fleet, [self.nodes[i] for i in alive])
        return {alive[k]: v for k, v in got.items()}

    def sink_datagrams(self) -> List[bytes]:
        """What the sink received since last asked, but the node's HELLO probes."""
        out = []
        while self.sink is not None:
            try:
                data = self.sink.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            if b'"kind":"HELLO"' not in data:
                out.append(data)
        return out

    def close(self) -> None:
        self.fleet.stop(self.nodes)
        if self.sink is not None:
            self.sink.close()


def window(before: Dict[int, dict], after: Dict[int, dict]) -> dict:
    """Mesh-wide counter changes between two /stats snapshots (nodes in both).

    ``flood_sent`` is every datagram but HELLOs: "sent" counts both, "link_sent" the HELLOs."""
    both = [i for i in after if i in before]
    out = {key: sum(int(after[i].get(key, 0)) - int(before[i].get(key, 0)) for i in both)
           for key in ("sent", "link_sent", "link_received", "relayed", "relayed_late", "hello_sent", "haves_sent",
                       "wants_sent", "served", "acks_sent", "retries")}
    out["flood_sent"] = out["sent"] - out["link_sent"]
    out["nodes"] = len(both)
    return out


def floods_in(relayed: int, n: int) -> int:
    """How many mesh-wide floods ``relayed`` relays make: each one is relayed once by about every node."""
    return int(relayed / max(1, n - 1) + 0.5)


def bench_scale(mesh: Mesh, cfg: dict, seed: int) -> Tuple[dict, dict]:
    fleet, n, nodes, links, ttl = mesh.fleet, mesh.n, mesh.nodes, mesh.links, mesh.ttl
    fleet.drain(1.0)  # let the last ones finish starting
    rss = [proc_status(c.pid, "VmRSS") for c in nodes]
    pss = [pss_bytes(c.pid) for c in nodes]
    before = [cpu_seconds(c.pid) for c in nodes]
    t_idle = time.perf_counter()
    fleet.drain(cfg["idle_s"])
    idle_wall = time.perf_counter() - t_idle
    after = [cpu_seconds(c.pid) for c in nodes]
    idle_cpu = None if None in before or None in after else sum(a - b for a, b in zip(after, before))

    stats0 = mesh.counts()
    mesh.sink_datagrams()
    drops_before = udp_rcvbuf_errors()
    burst_cpu0 = [cpu_seconds(c.pid) for c in nodes]
    t_burst = time.perf_counter()
    rng = random.Random(seed + 1)
    origins = [rng.randrange(n) for _ in range(cfg["broadcasts"])]
    delivered: Set[Tuple[int, int]] = set()
    hops: List[int] = []  # hops each message took to each node, from the ttl it arrived with
    stretch: List[int] = []  # those hops minus the shortest path
    dist = {i: distances(links, i) for i in set(origins)}
    expected = cfg["broadcasts"] * (n - 1)
    for k, i in enumerate(origins):
        nodes[i].write(f"burst {k}")
    mesh.last_broadcast_at = time.perf_counter()
    deadline = time.perf_counter() + 10.0 + 0.05 * n
    quiet_until = time.perf_counter() + 3.0
    while len(delivered) < expected and time.perf_counter() < min(deadline, quiet_until):
        for child, obj, _ in fleet.poll(0.1):
            if obj.get("event") == "chat" and str(obj.get("body", "")).startswith("burst "):
                k = int(obj["body"].split()[1])
                j = mesh.index.get(id(child))
                if j is not None and j != origins[k] and (j, k) not in delivered:
                    delivered.add((j, k))
                    if isinstance(obj.get("ttl"), int):
                        hops.append(ttl - obj["ttl"] + 1)
                        stretch.append(hops[-1] - dist[origins[k]][j])
                    quiet_until = time.perf_counter() + 3.0
    fleet.drain(0.5)  # copies still in flight are counted in "sent" too
    burst_cpu1 = [cpu_seconds(c.pid) for c in nodes]
    burst_wall = time.perf_counter() - t_burst
    stats1 = mesh.counts()
    sink_copies = len(mesh.sink_datagrams())  # not part of the benchmark's mesh: left out
    drops = delta(udp_rcvbuf_errors(), drops_before)
    sums: Dict[str, int] = {}
    for i in range(n):
        if i in stats0 and i in stats1:
            for key, value in stats1[i].items():
                if isinstance(value, int) and key not in ("seen_size", "rcvbuf_bytes"):
                    sums[key] = sums.get(key, 0) + value - int(stats0[i].get(key, 0))
    mb = 1 / (1 << 20)
    scale = {
        "nodes": n, "degree": DEGREE, "edges": mesh.edges, "diameter": mesh.diameter, "ttl": ttl,
        "ready_s": mesh.ready_s,
        "rss_mb_mean": sum(rss) / n * mb if None not in rss else None,
        "rss_mb_max": max(rss) * mb if None not in rss else None,
        "pss_mb_mean": sum(pss) / n * mb if None not in pss else None,
        "idle_s": idle_wall,
        "idle_cpu_s": idle_cpu,
        "idle_cpu_pct_of_core": idle_cpu / idle_wall * 100 if idle_cpu is not None else None,
        "broadcasts": cfg["broadcasts"],
        "delivered_pairs": len(delivered),
        "expected_pairs": expected,
        "delivery_fraction": len(delivered) / expected if expected else None,
        "first_arrival_hops_max": max(hops) if hops else None,
        "first_arrival_longer_than_shortest": sum(1 for x in stretch if x > 0) / len(stretch) if stretch else None,
        "arrivals_with_ttl_spent": sum(1 for x in hops if x >= ttl),
        "stats_from": len(stats1),
        "kernel_rcvbuf_drops": drops,
        "node_drops": {k: v for k, v in sums.items() if k.startswith("dropped_") and k != "dropped_duplicate"},
        "duplicates_dropped": sums.get("dropped_duplicate"),
    }
    complete = len(stats1) == n and len(stats0) == n
    # HELLOs are link-local ("link_sent"), not part of any flood.
    sent = sums["sent"] - sums.get("link_sent", 0) - sink_copies if complete and "sent" in sums else None
    b = cfg["broadcasts"]
    # Presence announcements flood too, on their own timers, and some fall in the burst. Each
    # node relays the first copy of each flood once, so relays beyond one per delivered copy
    # count the other floods (they cost what a broadcast costs: same neighbours, same reach).
    others = max(0, floods_in(sums.get("relayed", 0) - len(delivered), n)) if complete else 0
    flood = {
        "nodes": n, "edges": mesh.edges, "broadcasts": b,
        "datagrams_sent": sent,
        "other_floods": others,
        "per_message_raw": sent / b if sent is not None else None,
        "per_message": sent / (b + others) if sent is not None else None,
        "per_delivered": sent / len(delivered) if sent is not None and delivered else None,
        # Naive flooding is the seed design's rule: every neighbour but the sender.
        "naive_per_message": 2 * mesh.edges - (n - 1),
        "every_neighbour_per_message": 2 * mesh.edges,
        "ideal_per_message": n - 1,
        "delivery_fraction": scale["delivery_fraction"],
    }
    if sent is not None:
        flood["fewer_than_naive_pct"] = (1 - flood["per_message"] / flood["naive_per_message"]) * 100
    if None not in burst_cpu0 and None not in burst_cpu1:
        # All the mesh's CPU from the first line written to the last copy: displays and HELLOs included.
        burst = sum(b - a for a, b in zip(burst_cpu0, burst_cpu1))
        flood["burst_s"] = burst_wall
        flood["cpu_ms_per_flood_in_burst"] = burst / (b + others) * 1000
    return scale, flood


DIRECT_KINDS = ("broadcast", "routed", "flooded")


def bench_direct(mesh: Mesh, cfg: dict, seed: int) -> dict:
    """Datagrams, mesh-wide, for one broadcast, one routed direct message and one flooded one.

    Each message is sent alone and counted between two /stats snapshots of every node
    (datagrams but HELLOs). Per round: a node D broadcasts (so every node learns the way
    back to D from that broadcast's first copies); a node A sends D a direct message,
    which goes hop by hop; A sends the sink one, and the sink's way is known to nobody,
    so it floods as every direct message did before routing. A presence announcement
    that floods during a window would be counted with it: such windows are detected by
    their relays (a flood is relayed by about every node, a routed message by the few on
    its way) and left out, and more rounds are run."""
    fleet, n, nodes, ttl = mesh.fleet, mesh.n, mesh.nodes, mesh.ttl
    rng = random.Random(seed + 2)
    kept: Dict[str, List[int]] = {k: [] for k in DIRECT_KINDS}
    reached: Dict[str, List[float]] = {k: [] for k in DIRECT_KINDS}  # delivery of each kept window
    discarded: Dict[str, int] = {k: 0 for k in DIRECT_KINDS}
    hops: List[int] = []
    shortest: List[int] = []
    settle = cfg["direct_settle_s"]
    snapshot = [mesh.counts()]
    mesh.sink_datagrams()

    def measure(kind: str, sender: int, line: str, body: str, dst: Optional[int],
                ours: int) -> Tuple[Optional[int], float, Optional[dict]]:
        """Send ``line`` from ``sender``; wait until it arrived; its datagrams, or None if a flood came too."""
        nodes[sender].write(line)
        mesh.last_broadcast_at = time.perf_counter()
        want = n - 1 if kind == "broadcast" else 1
        got: Dict[int, dict] = {}
        sink_copies = 0
        deadline = time.perf_counter() + 5.0 + 0.02 * n
        while len(got) < want and time.perf_counter() < deadline:
            for child, obj, _ in fleet.poll(0.02):
                j = mesh.index.get(id(child))
                if obj.get("event") == "chat" and obj.get("body") == body and j is not None and j != sender:
                    if dst is None or j == dst:
                        got[j] = obj
            for data in mesh.sink_datagrams():
                sink_copies += 1
                if kind == "flooded" and body.encode() in data:
                    got[-1] = {}
        fleet.drain(settle)  # copies still on the way
        sink_copies += len(mesh.sink_datagrams())
        after = mesh.counts()
        w = window(snapshot[0], after)
        snapshot[0] = after
        datagrams = w["flood_sent"] - (sink_copies if kind == "broadcast" else 0)
        arrival = next(iter(got.values()), None) if kind == "routed" else None
        if floods_in(w["relayed"], n) != ours:
            discarded[kind] += 1
            return None, len(got) / want, arrival
        return datagrams, len(got) / want, arrival

    rounds = 0
    while min(len(v) for v in kept.values()) < cfg["direct_rounds"] and rounds < 3 * cfg["direct_rounds"]:
        rounds += 1
        d, a = rng.sample(range(n), 2)
        for kind, sender, line, body, dst, ours in (
                ("broadcast", d, f"route {rounds}", f"route {rounds}", None, 1),
                # In clear (--plain): this counts routing's datagrams; a sealed message is as many, each
                # bigger (section 11), and one to the sink, a seed-design socket with no key, would be held.
                ("routed", a, f"/msg --plain {nodes[d].label} direct {rounds}", f"direct {rounds}", d, 0),
                ("flooded", a, f"/msg --plain {mesh.sink_label} flood {rounds}", f"flood {rounds}", -1, 1)):
            datagrams, fraction, arrival = measure(kind, sender, line, body, dst, ours)
            if datagrams is None:
                continue
            kept[kind].append(datagrams)
            reached[kind].append(fraction)
            if arrival is not None and isinstance(arrival.get("ttl"), int):
                hops.append(ttl - arrival["ttl"] + 1)
                shortest.append(distances(mesh.links, a)[d])
    out: dict = {"nodes": n, "edges": mesh.edges, "ttl": ttl, "rounds": rounds, "settle_s": settle}
    for kind in DIRECT_KINDS:
        xs = kept[kind]
        out[kind] = {
            "messages": len(xs), "discarded": discarded[kind],
            "per_message": sum(xs) / len(xs) if xs else None,
            "min": min(xs) if xs else None, "max": max(xs) if xs else None,
            "delivery_fraction": sum(reached[kind]) / len(reached[kind]) if reached[kind] else None,
        }
    out["routed"]["hops_mean"] = sum(hops) / len(hops) if hops else None
    out["routed"]["shortest_mean"] = sum(shortest) / len(shortest) if shortest else None
    per = {k: out[k]["per_message"] for k in DIRECT_KINDS}
    out["routed_vs_broadcast"] = per["routed"] / per["broadcast"] if per["routed"] and per["broadcast"] else None
    out["flooded_vs_routed"] = per["flooded"] / per["routed"] if per["routed"] and per["flooded"] else None
    return out


def bench_idle(mesh: Mesh, cfg: dict, burst_ms_per_flood: Optional[float] = None) -> dict:
    """HELLO traffic and CPU of the whole mesh, left alone once it has settled (HELLOs backed off).

    Presence announcements flood on their own timers (by design about one every 2 s in a
    mesh of any size), so the window is cut into slices: the slices with no flood in them
    give the cost of the HELLOs alone, the others the CPU one presence flood costs. Where
    no presence flood came, a flood's CPU in the scale section's burst stands in for it
    (``burst_ms_per_flood``: cheaper per flood than one alone, so the estimate is low)."""
    fleet, n = mesh.fleet, mesh.n
    fleet.drain(max(mesh.ready_at + cfg["settle_s"], time.perf_counter() + 1.0) - time.perf_counter())
    mesh.sink_datagrams()
    alive = mesh.alive()
    nodes = [mesh.nodes[i] for i in alive]
    slices: List[dict] = []
    stats = [mesh.counts()]
    t_start = time.perf_counter()
    for _ in range(max(1, round(cfg["idle_hello_s"] / cfg["idle_slice_s"]))):
        # CPU is read inside the span the counters cover: the /stats answers are not idle work.
        cpu0 = [cpu_seconds(c.pid) for c in nodes]
        t0 = time.perf_counter()
        fleet.drain(cfg["idle_slice_s"])
        cpu1 = [cpu_seconds(c.pid) for c in nodes]
        t1 = time.perf_counter()
        stats.append(mesh.counts())
        w = window(stats[-2], stats[-1])
        slices.append({"seconds": t1 - t0, "cpu_s": None if None in cpu0 or None in cpu1 else
                       sum(b - a for a, b in zip(cpu0, cpu1)), "floods": floods_in(w["relayed"], n), **w})
    mesh.sink_datagrams()
    wall = sum(x["seconds"] for x in slices)
    span = time.perf_counter() - t_start  # the counters also ran while /stats was asked
    total = window(stats[0], stats[-1])
    have_cpu = all(x["cpu_s"] is not None for x in slices)
    cpu = sum(x["cpu_s"] for x in slices) if have_cpu else None
    quiet = [x for x in slices if x["floods"] == 0]
    busy = [x for x in slices if x["floods"] > 0]
    hello_cpu = per_flood = steady = None
    if have_cpu and quiet:
        hello_cpu = sum(x["cpu_s"] for x in quiet) / sum(x["seconds"] for x in quiet)
        if busy:
            per_flood = max(0.0, sum(x["cpu_s"] - hello_cpu * x["seconds"] for x in busy)
                            / sum(x["floods"] for x in busy))
    c = membership_constants()
    # By design each node announces every PRESENCE_PER_MEMBER_S x members (30 to 600 s), jittered
    # down by up to a fifth (0.9 on average).
    interval = min(c["PRESENCE_MAX_S"], max(c["PRESENCE_MIN_S"], c["PRESENCE_PER_MEMBER_S"] * (n - 1)))
    presence_per_s = n / (0.9 * interval)
    flood_cpu, flood_from = per_flood, "presence floods in the window"
    if flood_cpu is None and burst_ms_per_flood is not None:
        flood_cpu, flood_from = burst_ms_per_flood / 1000, "broadcast burst (low)"
    if hello_cpu is not None and flood_cpu is not None:
        steady = (hello_cpu + presence_per_s * flood_cpu) * 100
    return {
        "nodes": n, "edges": mesh.edges, "settled_s": t_start - mesh.ready_at, "seconds": wall,
        "stats_from": total["nodes"], "slices": len(slices), "quiet_slices": len(quiet),
        "hello_sent_per_s": total["link_sent"] / span,
        "hello_sent_per_node_per_s": total["link_sent"] / span / max(1, total["nodes"]),
        "hello_received_per_s": total["link_received"] / span,
        # Delivery's summaries and repair: an idle mesh should send none (rule 8 of delivery.py).
        "have_sent_per_node_per_s": total["haves_sent"] / span / max(1, total["nodes"]),
        "want_sent_per_node_per_s": total["wants_sent"] / span / max(1, total["nodes"]),
        "served_per_node_per_s": total["served"] / span / max(1, total["nodes"]),
        "repair_datagrams": {k: total[k] for k in ("haves_sent", "wants_sent", "served", "acks_sent", "retries")},
        "have_sent_by_slice": [x["haves_sent"] for x in slices],
        "last_broadcast_s": (t_start - mesh.last_broadcast_at) if mesh.last_broadcast_at is not None else None,
        "other_datagrams_per_s": total["flood_sent"] / span,
        "other_floods": floods_in(total["relayed"], n),
        "cpu_s": cpu,
        "cpu_pct_of_core": cpu / wall * 100 if cpu is not None else None,
        "cpu_pct_per_node": cpu / wall * 100 / len(nodes) if cpu is not None else None,
        "hello_only_cpu_pct_of_core": hello_cpu * 100 if hello_cpu is not None else None,
        "cpu_ms_per_presence_flood": per_flood * 1000 if per_flood is not None else None,
        "presence_floods_per_s_by_design": presence_per_s,
        "steady_cpu_pct_of_core_estimate": steady,
        "steady_flood_cpu_from": flood_from if steady is not None else None,
    }


def bench_liveness(mesh: Mesh, cfg: dict, seed: int, hello_max_s: float) -> dict:
    """SIGKILL a few nodes at once (no two adjacent): how long until each neighbour reports them down."""
    fleet, links, nodes = mesh.fleet, mesh.links, mesh.nodes
    rng = random.Random(seed + 4)
    victims: List[int] = []
    for i in rng.sample(mesh.alive(), len(mesh.alive())):
        if len(victims) < cfg["liveness_victims"] and not (links[i] & set(victims)) \
                and not (links[i] & mesh.killed):
            victims.append(i)
    expect = {(j, nodes[v].label): v for v in victims for j in links[v]}
    # HELLOs back off over 1 + 2 + 4 s to their longest interval, which sets how soon the dead are noticed.
    fleet.drain(max(0.1, mesh.ready_at + cfg["liveness_settle_s"] - time.perf_counter()))
    killed_at: Dict[int, float] = {}
    for v in victims:
        nodes[v].popen.kill()
        killed_at[v] = time.perf_counter()
        mesh.killed.add(v)
    for v in victims:
        nodes[v].popen.wait(STOP_TIMEOUT_S)
    delays: Dict[Tuple[int, str], float] = {}
    wrong = 0  # a live neighbour reported down
    deadline = time.perf_counter() + cfg["liveness_timeout_s"]
    while len(delays) < len(expect) and time.perf_counter() < deadline:
        for child, obj, at in fleet.poll(0.2):
            if obj.get("event") != "peer_down":
                continue
            key = (mesh.index.get(id(child)), obj.get("peer"))
            if key in expect:
                delays.setdefault(key, at - killed_at[expect[key]])
            else:
                wrong += 1
    xs = sorted(delays.values())
    return {
        "nodes": mesh.n, "hello_max_s": hello_max_s, "bound_s": down_bound_s(hello_max_s),
        "killed": len(victims), "neighbours": len(expect), "reported": len(xs), "wrong_downs": wrong,
        "min_s": xs[0] if xs else None, "median_s": median(xs), "max_s": xs[-1] if xs else None,
    }


# --quick only: a node whose HELLOs are at most this far apart, so that a dead neighbour is down
# in about 3 s, not 21. The command line has no such option: the benchmark sets the default.
FAST_NODE = r"""
import functools, sys
import meshchat.cli as cli
cli.MembershipConfig = functools.partial(cli.MembershipConfig, hello_max_s=float(sys.argv[1]))
sys.exit(cli.main(sys.argv[2:]))
"""
QUICK_HELLO_MAX_S = 0.4
QUICK_LIVENESS_NODES = 6


def bench_liveness_fast(cfg: dict, fleet: Fleet, seed: int) -> dict:
    def argv(*args: str) -> List[str]:
        return [sys.executable, "-c", FAST_NODE, str(QUICK_HELLO_MAX_S), "--no-discover", *history_args(),
                *args]

    mesh = Mesh(fleet, QUICK_LIVENESS_NODES, seed, argv=argv)
    try:
        return bench_liveness(mesh, cfg, seed, QUICK_HELLO_MAX_S)
    finally:
        mesh.close()


# -- 10. what delivery costs: acks, retries, summaries and repair, without loss and with ------------------

REPAIR_COUNTERS = ("sent", "link_sent", "hello_sent", "acks_sent", "retries", "haves_sent", "wants_sent", "served",
                   "repaired", "late", "delivered", "undelivered", "relayed", "displayed", "gaps_given_up")


def lossy_hub_class():
    """tests/lossy.py's LossyHub: a UDP proxy for every link, dropping with a seeded generator."""
    tests = os.path.join(REPO, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from lossy import LinkSpec, LossyHub

    return LossyHub, LinkSpec


class LossyMesh:
    """A random degree-4 mesh whose every link goes through a LossyHub (lossless until ``set_loss``).

    A node's peers are the hub's ports for its links, so every datagram it sends to a
    neighbour crosses the hub: the hub counts what enters (HELLO, HAVE, WANT, SINCE, IHAVE, GRAFT, PRUNE apart)
    and what it drops."""

    def __init__(self, fleet: Fleet, n: int, seed: int, loss: float) -> None:
        LossyHub, self._spec = lossy_hub_class()
        self.fleet, self.n, self.loss = fleet, n, loss
        self.links = topology(n, DEGREE, seed)
        self.hub = LossyHub(seed=seed + 7, max_life_s=900.0)
        self.nodes: List[Child] = []
        try:
            peer_ports: Dict[int, List[int]] = {i: [] for i in range(n)}
            for _ in range(n):
                self.hub.add_node()
            for a in range(n):
                for b in sorted(self.links[a]):
                    if a < b:
                        pa, pb = self.hub.link(a, b)
                        peer_ports[a].append(pa)
                        peer_ports[b].append(pb)
            ports = reserve_ports(n)
            for i in range(n):
                self.hub.set_up(i, ports[i])
            self.hub.start()
            for i in range(n):
                self.nodes.append(fleet.spawn(meshchat_argv(
                    "--port", str(ports[i]), "--peers", *[f"{HOST}:{p}" for p in peer_ports[i]], "--json"),
                    tag=("lossy", loss, i)))
        except BaseException:
            self.close()
            raise
        self.index = {id(c): i for i, c in enumerate(self.nodes)}

    def set_loss(self) -> None:
        self.hub.set_spec(self._spec(loss=self.loss))

    def counts(self) -> Dict[int, dict]:
        got = collect_stats(self.fleet, self.nodes)
        return got

    def close(self) -> None:
        self.fleet.stop(self.nodes)
        self.hub.stop()


def bench_repair(cfg: dict, fleet: Fleet, seed: int) -> List[dict]:
    """Datagrams spent on acks, retries, summaries (HAVE) and repair (WANT, served copies) per message.

    One mesh per loss rate, all run at once (the figures are counts, not times): every
    link lossless until every node has its neighbours up, then losing ``loss`` of the
    datagrams each way (HELLOs and summaries too). Broadcasts from random nodes and
    direct messages between random pairs, paced, then the mesh is left until every
    message is shown everywhere (or a deadline) and ``repair_tail_s`` more, so that
    the summaries a burst causes afterwards are counted with it; then ``repair_idle_s``
    with nothing sent: the repair traffic of a settled mesh."""
    n = cfg["repair_nodes"]
    meshes = [LossyMesh(fleet, n, seed, loss) for loss in cfg["repair_loss"]]
    try:
        fleet.wait_ready([c for m in meshes for c in m.nodes])
        by_child = {id(c): (m, i) for m in meshes for i, c in enumerate(m.nodes)}
        fleet.drain(cfg["repair_settle_s"])  # the links' handshakes, then presence and capabilities go round
        for m in meshes:
            m.set_loss()
        before = [m.counts() for m in meshes]
        hub_before = [m.hub.snapshot() for m in meshes]
        rng = random.Random(seed + 5)
        plan = [("b", rng.randrange(n), None) for _ in range(cfg["repair_broadcasts"])]
        plan += [("d", *rng.sample(range(n), 2)) for _ in range(cfg["repair_directs"])]
        rng.shuffle(plan)
        shown: List[Dict[Tuple[int, int], int]] = [{} for _ in meshes]  # (message, node) -> times shown
        late = [0] * len(meshes)
        delivered = [set() for _ in meshes]  # directs acknowledged
        undelivered = [0] * len(meshes)
        mids: List[Dict[str, int]] = [{} for _ in meshes]

        def read(timeout: float) -> None:
            for child, obj, _ in fleet.poll(timeout):
                if id(child) not in by_child:
                    continue
                m, i = by_child[id(child)]
                k = meshes.index(m)
                event = obj.get("event")
                body = str(obj.get("body", ""))
                if event == "chat" and body.startswith("rep "):
                    key = (int(body.split()[1]), i)
                    shown[k][key] = shown[k].get(key, 0) + 1
                    late[k] += bool(obj.get("late"))
                elif event == "sent" and body.startswith("rep ") and obj.get("dst"):
                    mids[k][obj.get("mid")] = int(body.split()[1])
                elif event == "delivered" and obj.get("mid") in mids[k]:
                    delivered[k].add(mids[k][obj["mid"]])
                elif event == "undelivered" and obj.get("mid") in mids[k]:
                    undelivered[k] += 1

        t0 = time.perf_counter()
        for j, (kind, a, b) in enumerate(plan):
            for m in meshes:
                m.nodes[a].write(f"rep {j}" if kind == "b" else f"@{m.nodes[b].label} rep {j}")
            due = t0 + (j + 1) * cfg["repair_gap_s"]
            while time.perf_counter() < due:
                read(due - time.perf_counter())
        expected = {(j, i) for j, (kind, a, b) in enumerate(plan)
                    for i in (range(n) if kind == "b" else (b,)) if i != a}
        directs = {j for j, (kind, _, _) in enumerate(plan) if kind == "d"}
        t_sent = time.perf_counter()
        deadline = t_sent + cfg["repair_deadline_s"]
        done_at: List[Optional[float]] = [None] * len(meshes)
        while time.perf_counter() < deadline and None in done_at:
            read(0.1)
            for k in range(len(meshes)):
                if done_at[k] is None and expected <= set(shown[k]) and directs <= delivered[k]:
                    done_at[k] = time.perf_counter()
        fleet_read_until = time.perf_counter() + cfg["repair_tail_s"]
        while time.perf_counter() < fleet_read_until:
            read(fleet_read_until - time.perf_counter())
        for m in meshes:  # counted traffic settled (acks, retries, served copies), so both counts agree
            m.hub.wait_quiet(0.3, 5.0)
        after = [m.counts() for m in meshes]
        hub_after = [m.hub.snapshot() for m in meshes]
        t_end = time.perf_counter()
        idle_after = None
        if cfg["repair_idle_s"] > 0:
            fleet_read_until = time.perf_counter() + cfg["repair_idle_s"]
            while time.perf_counter() < fleet_read_until:
                read(fleet_read_until - time.perf_counter())
            idle_after = [m.counts() for m in meshes]
        t_idle = time.perf_counter()
        out = []
        messages = len(plan)
        for k, m in enumerate(meshes):
            sums = {key: sum(int(after[k].get(i, {}).get(key, 0)) - int(before[k].get(i, {}).get(key, 0))
                             for i in range(n)) for key in REPAIR_COUNTERS}
            hub = {key: hub_after[k][key] - hub_before[k][key] for key in ("received", "forwarded", "dropped_loss")}
            pairs = set(shown[k]) & expected
            row = {
                "loss": m.loss, "nodes": n, "edges": sum(len(x) for x in m.links) // 2,
                "broadcasts": messages - len(directs), "directs": len(directs), "messages": messages,
                "stats_from": min(len(before[k]), len(after[k])),
                "sending_s": t_sent - t0, "window_s": t_end - t0,
                "complete_after_s": done_at[k] - t_sent if done_at[k] is not None else None,
                "delivered_pairs": len(pairs), "expected_pairs": len(expected),
                "delivery_fraction": len(pairs) / len(expected) if expected else None,
                "shown_twice": sum(1 for v in shown[k].values() if v > 1),
                "shown_late": late[k],
                "directs_acknowledged": len(delivered[k]), "undelivered_events": undelivered[k],
                "counters": sums, "hub": hub,
            }
            flood = sums["sent"] - sums["link_sent"]  # CHATs (and served copies), ACKs, presence floods
            row["per_message"] = {
                "all_datagrams": sums["sent"] / messages,
                "hello": sums["hello_sent"] / messages,
                "have": sums["haves_sent"] / messages,
                "want": sums["wants_sent"] / messages,
                "served": sums["served"] / messages,
                "ack": sums["acks_sent"] / messages,
                "retry": sums["retries"] / messages,
                "flood": flood / messages,
            }
            row["ack_per_direct"] = sums["acks_sent"] / len(directs) if directs else None
            row["retry_per_direct"] = sums["retries"] / len(directs) if directs else None
            row["repair_per_repaired"] = ((sums["wants_sent"] + sums["served"]) / sums["repaired"]
                                          if sums["repaired"] else None)
            row["hub_dropped_fraction"] = hub["dropped_loss"] / hub["received"] if hub["received"] else None
            if idle_after is not None:
                idle = {key: sum(int(idle_after[k].get(i, {}).get(key, 0)) - int(after[k].get(i, {}).get(key, 0))
                                 for i in range(n)) for key in ("haves_sent", "wants_sent", "served", "hello_sent")}
                span = t_idle - t_end
                row["idle"] = {"seconds": span,
                               "have_per_node_per_s": idle["haves_sent"] / n / span,
                               "want_per_node_per_s": idle["wants_sent"] / n / span,
                               "served_per_node_per_s": idle["served"] / n / span,
                               "hello_per_node_per_s": idle["hello_sent"] / n / span}
            out.append(row)
        return out
    finally:
        for m in meshes:
            m.close()


# -- 12. lazy push ---------------------------------------------------------------------------------

ANNOUNCE_KINDS = ("IHAVE", "GRAFT", "PRUNE")


def bench_lazy(cfg: dict) -> dict:
    """Flooding against lazy push (lazypush.py) in the random degree-4 mesh, simulated.

    scripts/simulate.py runs the real Relay, Membership, Delivery and LazyPush in virtual time
    (10 ms links, +-50%, 2 ms jitter), on the same topology, origins and loss for both; tests/
    test_simulate.py holds it to a live loopback mesh. Per broadcast: payload datagrams (every
    CHAT sent, served and grafted copies too), announcement datagrams and bytes (IHAVE, GRAFT,
    PRUNE) apart; delivery after repair; p50 latency of first copies. Each figure is the mean
    over ``lazy_seeds`` (a topology and origins each)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import simulate

    rows = []
    for loss in cfg["lazy_loss"]:
        row: dict = {"loss": loss, "nodes": cfg["lazy_nodes"], "messages": cfg["lazy_messages"],
                     "seeds": list(cfg["lazy_seeds"])}
        for model in ("flood", "lazy"):
            runs = [simulate.run(simulate.Params(nodes=cfg["lazy_nodes"], degree=DEGREE, messages=cfg["lazy_messages"],
                                                 loss=loss, model=model, seed=seed))
                    for seed in cfg["lazy_seeds"]]
            k = len(runs)
            msgs = [max(1, x["messages"]) for x in runs]
            row[model] = {
                "payload_per_msg": sum(x["chat_datagrams_per_message"] for x in runs) / k,
                "announce_per_msg": sum(sum(x["sent_by_kind"].get(a, 0) for a in ANNOUNCE_KINDS) / m
                                        for x, m in zip(runs, msgs)) / k,
                "announce_bytes_per_msg": sum(sum(x["sent_bytes_by_kind"].get(a, 0) for a in ANNOUNCE_KINDS) / m
                                              for x, m in zip(runs, msgs)) / k,
                "payload_bytes_per_msg": sum(x["chat_bytes_per_message"] for x in runs) / k,
                "delivery_first_copy": min(x["delivery_first_copy"] for x in runs),
                "delivery_after_repair": min(x["delivery_after_repair"] for x in runs),
                "p50_ms": sum(x["latency_first_p50_ms"] for x in runs) / k,
                "p99_ms": sum(x["latency_first_p99_ms"] for x in runs) / k,
                "all_p99_ms": sum(x["latency_all_p99_ms"] for x in runs) / k,
                "by_kind": {kind: sum(x["sent_by_kind"].get(kind, 0) for x in runs) / sum(msgs)
                            for kind in sorted({kk for x in runs for kk in x["sent_by_kind"]})},
            }
        f, z = row["flood"], row["lazy"]
        row["fewer_payload_pct"] = 100.0 * (1.0 - z["payload_per_msg"] / f["payload_per_msg"])
        row["p50_ratio"] = z["p50_ms"] / f["p50_ms"] if f["p50_ms"] else None
        rows.append(row)
    return {"rows": rows}


# -- 9. discovery ----------------------------------------------------------------------------------

def bench_discovery(cfg: dict, fleet: Fleet) -> dict:
    """A node started with --discover next to one that has been running: until both are up, and a chat.

    The group, port and mesh name are this run's own, so no other node on the LAN (or
    other benchmark) is found."""
    rng = random.Random(time.monotonic_ns() ^ os.getpid())
    group = f"239.255.{rng.randrange(256)}.{rng.randrange(1, 255)}:{reserve_ports(1)[0]}"
    name = f"bench-{os.getpid()}-{rng.randrange(1 << 30):x}"
    argv = meshchat_argv("--port", "0", "--json", "--discover-group", group, "--mesh", name, discover=True)
    first = fleet.spawn(argv, tag="discovery")
    trials: List[dict] = []
    try:
        fleet.wait_ready([first])
        fleet.drain(cfg["discovery_wait_s"])  # past its first quick beacons, as a node that has been running
        for t in range(cfg["discovery_trials"]):
            t0 = time.perf_counter()
            new = fleet.spawn(argv, tag=("discovery", t))
            marks: Dict[str, float] = {}
            first_ups: Dict[str, float] = {}  # the first node's peer_up may come before we read the new one's label
            body = f"found {t}"
            try:
                deadline = t0 + READY_TIMEOUT_S
                while len(marks) < 4 and time.perf_counter() < deadline:
                    for child, obj, at in fleet.poll(0.1):
                        event = obj.get("event")
                        if child is new and event == "ready":
                            marks["ready"] = at
                        elif child is new and event == "peer_up" and obj.get("peer") == first.label:
                            if "new_up" not in marks:
                                marks["new_up"] = at
                                new.write(body)  # as soon as it has a neighbour: what a user types first
                        elif child is first and event == "peer_up":
                            first_ups.setdefault(str(obj.get("peer")), at)
                        elif child is first and event == "chat" and obj.get("body") == body:
                            marks.setdefault("chat", at)
                    if new.label and new.label in first_ups:
                        marks.setdefault("first_up", first_ups[new.label])
                if len(marks) < 4:
                    raise RuntimeError(f"trial {t}: only {sorted(marks)} within {READY_TIMEOUT_S:g} s"
                                       f"{fleet.stderr_tail()}")
            finally:
                fleet.stop([new])
            trials.append({
                "start_s": marks["ready"] - t0,
                "found_s": max(marks["new_up"], marks["first_up"]) - marks["ready"],
                "chat_s": marks["chat"] - marks["ready"],
            })
    finally:
        fleet.stop([first])

    def summary(key: str) -> dict:
        xs = [t[key] for t in trials]
        return {"median": median(xs), "max": max(xs)}

    return {"trials": len(trials), "group": group, "mesh": name,
            "start_s": summary("start_s"), "found_s": summary("found_s"), "chat_s": summary("chat_s")}


# -- 4. memory -------------------------------------------------------------------------------------

def bench_seen_bytes(cfg: dict) -> dict:
    """Bytes per entry of meshchat's seen cache, full and after evictions, with tracemalloc."""
    sys.path.insert(0, REPO)
    import uuid

    from meshchat.seen import SeenCache

    cap, adds = cfg["seen_max"], cfg["seen_adds"]
    gc.collect()
    tracemalloc.start()
    try:
        cache = SeenCache(120.0, cap)
        base = tracemalloc.get_traced_memory()[0]
        now = 1000.0
        worst = 0.0
        filled = None
        for i in range(adds):
            cache.add(uuid.uuid4().hex, now, now)  # the id as a node keeps it: a 32-character str
            now += 1e-4  # 10,000 ids a second
            if i + 1 == cap:
                filled = (tracemalloc.get_traced_memory()[0] - base) / len(cache)
            if i + 1 >= cap and (i + 1) % (cap // 20 or 1) == 0:
                worst = max(worst, (tracemalloc.get_traced_memory()[0] - base) / len(cache))
        return {"entries": len(cache), "seen_max": cap, "adds": adds, "filled_bytes_per_entry": filled,
                "worst_bytes_per_entry": max(worst, filled or 0.0)}
    finally:
        tracemalloc.stop()


def bench_node_memory(cfg: dict, fleet: Fleet) -> dict:
    """A real node (default --seen-max) fed ``node_ids`` unique ids, its resident memory sampled."""
    src = udp_socket()
    sink = udp_socket(RCVBUF_BYTES, blocking=False)
    node = fleet.spawn(meshchat_argv("--port", "0", "--peers", label_of(sink), "--headless", "--quiet", "--json",
                                     "--rate-limit", "1000000"), tag="memory", stdin=False)
    try:
        fleet.wait_ready([node])
        fleet.drain(0.2)
        rss_start = proc_status(node.pid, "VmRSS")
        peak = [rss_start or 0]

        def sample() -> None:
            value = proc_status(node.pid, "VmRSS")
            if value is not None:
                peak[0] = max(peak[0], value)

        gen = Datagrams(label_of(src))
        got = drive_window(src, (HOST, node.port), [sink], gen.make, count=cfg["node_ids"],
                           seconds=max(60.0, cfg["node_ids"] / 2000.0), window=flow_window(), every=sample)
        sample()
        rss_end, hwm = proc_status(node.pid, "VmRSS"), proc_status(node.pid, "VmHWM")
        mb = 1 / (1 << 20)
        return {
            "ids_sent": got["sent"], "ids_relayed": got["received"][0], "seconds": got["seconds"],
            "seen_max": 100_000,
            "rss_mb_start": rss_start * mb if rss_start else None,
            "rss_mb_after": rss_end * mb if rss_end else None,
            "peak_rss_mb": max(hwm or 0, peak[0]) * mb if (hwm or peak[0]) else None,
        }
    finally:
        fleet.stop([node])
        src.close()
        sink.close()


# -- the machine, the targets, the tables --------------------------------------------------------------------

def machine() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rmem = machine_rmem_max()
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "rmem_max": rmem,
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_time_source": cpu_source(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def targets(r: dict) -> List[dict]:
    """Each target of issue 4, its figure from this run, and whether it is met (None: not measured)."""
    out: List[dict] = []

    def add(name: str, value: Optional[float], op: str, limit: float, unit: str, note: str = "") -> None:
        met = None if value is None else bool({"<=": value <= limit, "<": value < limit, ">=": value >= limit,
                                               ">": value > limit}[op])
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met,
                    "note": note})

    relay = r.get("relay") or {}
    for suffix, how in (("", "one at a time"), ("_burst", f"in bursts of {relay.get('burst')}")):
        add(f"relay CPU/msg, node / straightforward ({how})", relay.get("ratio_node_straightforward" + suffix),
            "<=", 1.0, "x")
        add(f"relay CPU/msg, node / bare forwarder ({how})", relay.get("ratio_node_bare" + suffix), "<=", 1.6, "x")
        add(f"relay CPU/msg, tracing on / off ({how})", relay.get("ratio_trace_on_off" + suffix), "<=", 1.1, "x")
    disp = r.get("display") or {}
    for suffix, how in (("", "one at a time"), ("_burst", f"in bursts of {disp.get('burst')}")):
        add(f"display CPU/msg, meshchat --json / straightforward printing ({how})",
            disp.get("ratio_meshchat_json" + suffix), "<=", 1.0, "x")
        add(f"display CPU/msg, meshchat terminal / straightforward printing ({how})",
            disp.get("ratio_meshchat_terminal" + suffix), "<=", 1.0, "x")
    hist = r.get("history") or {}
    for suffix, how in (("", "one at a time"), ("_burst", f"in bursts of {hist.get('burst')}")):
        add(f"relay CPU/msg, history on / off ({how})", hist.get("ratio_on_off" + suffix), "<=", 1.3, "x")
        add(f"relaying path (socket thread) CPU/msg, history on / off ({how})", hist.get("net_ratio_on_off" + suffix),
            "<=", 1.3, "x")
    lines = (r.get("latency") or {}).get("lines", [])
    per_hop = [x["p50_per_hop_ms"] for x in lines if "p50_per_hop_ms" in x]
    add("latency p50 per hop (worst line)", max(per_hop) if per_hop else None, "<", 1.0, "ms")
    eight = [x for x in lines if x["hops"] == 8 and "p99_ms" in x]
    add("latency p99, 8-hop line", eight[0]["p99_ms"] if eight else None, "<", 20.0, "ms")
    scales = [s for s in r.get("scale") or [] if "nodes" in s]
    if scales:
        big = max(scales, key=lambda s: s["nodes"])
        note = "" if big["nodes"] == 200 else f"target is for 200 nodes; run with {big['nodes']}"
        add(f"{big['nodes']} nodes all ready", big.get("ready_s"), "<", 30.0, "s", note)
        add(f"resident memory per node ({big['nodes']} nodes, max)", big.get("rss_mb_max"), "<", 25.0, "MB", note)
        add(f"idle CPU of the whole mesh, first {fmt(big.get('idle_s'), 0)} s ({big['nodes']} nodes)",
            big.get("idle_cpu_pct_of_core"), "<", 2.0, "% of a core", note)
        for s in scales:
            lossless = s.get("kernel_rcvbuf_drops") in (0, None) and not any((s.get("node_drops") or {}).values())
            add(f"broadcasts delivered ({s['nodes']} nodes)", s.get("delivery_fraction"), ">=", 1.0, "",
                "" if lossless else "datagrams were dropped during the burst")
    idles = [x for x in r.get("idle") or [] if "nodes" in x]
    if idles:
        big = max(idles, key=lambda x: x["nodes"])
        note = "" if big["nodes"] == 200 else f"target is for 200 nodes; run with {big['nodes']}"
        add(f"idle CPU of the whole mesh, settled, HELLOs only ({big['nodes']} nodes)",
            big.get("hello_only_cpu_pct_of_core"), "<", 2.0, "% of a core", note)
        add(f"idle CPU of the whole mesh, settled, with presence at its designed rate, estimate ({big['nodes']} "
            f"nodes)", big.get("steady_cpu_pct_of_core_estimate"), "<", 2.0, "% of a core", note)
    if idles:
        big = max(idles, key=lambda x: x["nodes"])
        add(f"idle repair traffic, HAVE + WANT per node ({big['nodes']} nodes)",
            big.get("have_sent_per_node_per_s", 0) + big.get("want_sent_per_node_per_s", 0), "<", 0.01, "/s",
            "the issue's '~0'")
    for x in r.get("repair") or []:
        if "loss" in x:
            add(f"broadcasts and directs shown at {pct(x['loss'])} loss, after repair", x["delivery_fraction"],
                ">=", 1.0, "")
            add(f"nothing shown twice at {pct(x['loss'])} loss", x["shown_twice"], "<=", 0, "")
    direct = r.get("direct") or {}
    if "routed" in direct:
        note = "" if direct["nodes"] == 50 else f"target is for 50 nodes; run with {direct['nodes']}"
        add(f"direct message routed / broadcast, datagrams ({direct['nodes']} nodes)",
            direct.get("routed_vs_broadcast"), "<", 0.1, "x", note)
        add("routed direct messages delivered", direct["routed"]["delivery_fraction"], ">=", 1.0, "", note)
    for x in r.get("liveness") or []:
        if "nodes" in x:
            fast = x["hello_max_s"] < membership_constants()["HELLO_MAX_S"]
            add(f"dead neighbour reported down, max ({x['nodes']} nodes)",
                x["max_s"] if x["reported"] == x["neighbours"] else None, "<=", 30.0, "s",
                f"HELLOs at most {x['hello_max_s']:g} s apart (--quick)" if fast else "")
    disc = r.get("discovery") or {}
    if "found_s" in disc:
        add("new node discovered, both peer_up (max)", disc["found_s"]["max"], "<", 5.0, "s",
            "the issue's 'within seconds'")
    mem = r.get("memory") or {}
    add("seen dict bytes per entry (worst)", (mem.get("seen") or {}).get("worst_bytes_per_entry"), "<=", 200.0, "B")
    node = mem.get("node") or {}
    add(f"peak RSS after {node.get('ids_sent', 0):,} unique ids", node.get("peak_rss_mb"), "<=", 150.0, "MB")
    for x in (r.get("lazy") or {}).get("rows", []):
        note = "" if x["nodes"] == 50 else f"target is for 50 nodes; run with {x['nodes']}"
        if x["loss"] == 0.0:
            add(f"lazy push: fewer payload datagrams than flooding ({x['nodes']} nodes, simulated)",
                x["fewer_payload_pct"], ">=", 40.0, "%", note)
            add("lazy push: p50 latency / flooding's, 0% loss (simulated)", x["p50_ratio"], "<=", 1.5, "x", note)
        add(f"lazy push: delivered after repair at {pct(x['loss'])} loss (simulated)",
            x["lazy"]["delivery_after_repair"], ">=", 1.0, "", note)
    floods = [f for f in r.get("flood") or [] if f.get("fewer_than_naive_pct") is not None]
    if floods:
        f = min(floods, key=lambda f: abs(f["nodes"] - 50))
        note = "" if f["nodes"] == 50 else f"target is for 50 nodes; run with {f['nodes']}"
        add(f"flood: fewer datagrams than naive ({f['nodes']} nodes)", f["fewer_than_naive_pct"], ">=", 30.0, "%",
            note)
    if r.get("files") and "config" in r["files"]:
        out.extend(files_section().targets(r["files"]))
    return out


def files_section():
    """scripts/bench_files.py: the files section, kept in a file of its own."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_files

    return bench_files


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio2(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a and b else None


def ratio_of(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 1) if a and b else None


def ratio(relays: dict, ref: str) -> Optional[float]:
    a, b = relays["meshchat"]["max_rate_cpu_us_per_msg"], relays[ref]["max_rate_cpu_us_per_msg"]
    return a / b if a and b else None


def pct(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{fraction * 100:.0f}%"


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def bench_security(cfg: dict) -> dict:
    """In-process, one relay and no sockets: what signatures and end-to-end boxes add per message.

    Relay cost: first copies of chat-sized broadcasts through a relay with one neighbour, signed
    and verified against unsigned with no trust layer. Display cost: direct messages to a node
    that shows them, sealed and opened against in clear. Also the sender's side: signing, sealing."""
    from meshchat import crypto
    from meshchat.private import Private
    from meshchat.relay import Display, Relay, RelayConfig
    from meshchat.trust import Trust, signer
    from meshchat.wire import Message, encode

    if not crypto.available():
        return {"error": "needs the secure extra: pip install 'meshchat[secure]'"}
    n = cfg["security_messages"]
    me, them = "127.0.0.1:9000", "127.0.0.1:9001"
    peer = ("127.0.0.1", 9001)
    wall = 1_700_000_000.0
    mine, theirs = crypto.Identity.generate(), crypto.Identity.generate()
    sign = signer(theirs.key_text, theirs.sign)
    body = "a chat line of a usual length, some sixty characters or so."

    def per_message_us(make: Callable[[], Relay], datagrams: List[bytes], want_shown: bool) -> float:
        """CPU time (this thread's process, so other processes' load counts less), the best of 2 runs."""
        best = math.inf
        for _ in range(2):
            relay = make()
            gc.collect()
            start = time.process_time()
            shown = 0
            for i, data in enumerate(datagrams):
                for action in relay.datagram_received(data, peer, 1.0 + i * 1e-4, wall):
                    shown += type(action) is Display
            best = min(best, time.process_time() - start)
            if want_shown and shown != len(datagrams):
                raise RuntimeError(f"{shown} of {len(datagrams)} messages shown")
        return round(best / len(datagrams) * 1e6, 1)

    def trust() -> Trust:
        return Trust(crypto.verify, crypto.unb64, crypto.fingerprint)

    def msg(i: int, dst: str = "") -> Message:
        return Message(f"m{i}", wall, 5, "CHAT", them, dst, body, {"ttl0": 5})

    cfg_relay = RelayConfig(me, rate_limit=0.0)
    t0 = time.perf_counter()
    signed = [encode(sign(msg(i))) for i in range(n)]
    sign_us = (time.perf_counter() - t0) / n * 1e6
    plain = [encode(msg(i)) for i in range(n)]
    out: dict = {"messages": n, "sign_us": round(sign_us, 1)}
    peers = [peer, ("127.0.0.1", 9002)]
    out["relay_off_us"] = per_message_us(lambda: Relay(cfg_relay, peers=peers), plain, True)
    out["relay_on_us"] = per_message_us(lambda: Relay(cfg_relay, peers=peers, trust=trust()), signed, True)
    sealer = Private(theirs.box.key_text, crypto.seal_to, theirs.box.open, crypto.unb64)
    sealer.keys[me] = mine.box.public
    t0 = time.perf_counter()
    sealed = [encode(sign(sealer.seal(msg(i, me)))) for i in range(n)]
    out["seal_and_sign_us"] = round((time.perf_counter() - t0) / n * 1e6, 1)
    clear = [encode(sign(msg(i, me))) for i in range(n)]
    opener = Private(mine.box.key_text, crypto.seal_to, mine.box.open, crypto.unb64)
    out["display_clear_us"] = per_message_us(lambda: Relay(cfg_relay, peers=[peer], trust=trust()), clear, True)
    out["display_sealed_us"] = per_message_us(lambda: Relay(cfg_relay, peers=[peer], trust=trust(), private=opener),
                                              sealed, True)
    out["duplicate_us"] = per_message_us(lambda: Relay(cfg_relay, peers=[peer], trust=trust()), signed[:1] * n, False)
    out["datagram_bytes"] = {"unsigned": len(plain[0]), "signed": len(signed[0]), "sealed_signed": len(sealed[0])}
    return out


def report(r: dict) -> str:
    m = r["machine"]
    parts = [f"meshchat benchmark{' (--quick)' if r['quick'] else ''}: {m['cpu']}, {m['cores']} cores, "
             f"{m['os']}, {m['python']}, load {fmt(m['loadavg_start'])} at start, {m['date']}; "
             f"{fmt(r['elapsed_s'], 0)} s"]
    relay = r.get("relay")
    if relay and "relays" in relay:
        rows = []
        for name in RELAYS:
            x = relay["relays"][name]
            at_max = x["max_rate_cpu_us_per_msg"]
            rows.append([name, x["cpu_us_per_msg"], x["cpu_us_per_msg_burst"], x["delivered_fraction"],
                         round(x["max_rate_per_s"]), pct(x["max_rate_busy"]), at_max,
                         round(1e6 / at_max) if at_max else None])
        rows.append(["node / bare", relay["ratio_node_bare"], relay["ratio_node_bare_burst"], "", "", "",
                     ratio(relay["relays"], "bare"), ""])
        rows.append(["node / straightforward", relay["ratio_node_straightforward"],
                     relay["ratio_node_straightforward_burst"], "", "", "", ratio(relay["relays"], "straightforward"),
                     ""])
        rows.append(["tracing on / off", relay["ratio_trace_on_off"], relay["ratio_trace_on_off_burst"], "", "", "",
                     ratio(relay["relays"], "meshchat_no_trace"), ""])
        parts.append(f"1. Relay cost: a relay with 3 peers (the source and 2 sinks); per relay "
                     f"{relay['messages_per_relay']:,} messages at {relay['paced_rate_per_s']:,.0f}/s, half one at "
                     f"a time, half in bursts of {relay['burst']}, in {relay['rounds']} "
                     f"round{'s' if relay['rounds'] != 1 else ''} taking turns "
                     f"(median); kernel receive-buffer drops meanwhile: {fmt(relay['kernel_rcvbuf_drops_paced'])}. "
                     f"Max rate: at most {relay['max_rate_window']} messages on the way.\n" + table(
                         ["relay", "CPU µs/msg, one at a time", f"CPU µs/msg, bursts of {relay['burst']}", "delivered",
                          "max rate msg/s", "its CPU busy", "CPU µs/msg at max", "msg/s at 100% CPU"], rows))
    inp = (relay or {}).get("in_process")
    if inp:
        rows = [["the decision (Relay.datagram_received; straightforward: loads, ttl - 1, dumps)",
                 inp["decision_us"], inp["straightforward_decision_us"],
                 _ratio2(inp["decision_us"], inp["straightforward_decision_us"])],
                ["the socket thread's whole path, one datagram at a time", inp["node_loop_us"],
                 inp["straightforward_loop_us"], _ratio2(inp["node_loop_us"], inp["straightforward_loop_us"])],
                ["the same path deciding nothing (straightforward: the bare loop)", inp["node_loop_deciding_nothing_us"],
                 inp["bare_loop_us"], _ratio2(inp["node_loop_deciding_nothing_us"], inp["bare_loop_us"])]]
        parts.append("1e. Relay cost in this process, warm (best of 5 slices; loops on loopback, the sender's "
                     "sendto included)\n" + table(["what", "meshchat µs/msg", "straightforward µs/msg", "ratio"], rows))
    disp = r.get("display")
    if disp and "relays" in disp:
        rows = [[name.replace("_", " "), x["cpu_us_per_msg"], x["cpu_us_per_msg_burst"], x["delivered_fraction"]]
                for name, x in disp["relays"].items()]
        for name in ("meshchat_json", "meshchat_terminal"):
            rows.append([f"{name.replace('_', ' ')} / printing", disp[f"ratio_{name}"], disp[f"ratio_{name}_burst"], ""])
        parts.append(f"1d. Display cost: relays that show every message they relay (no history), "
                     f"{disp['messages_per_relay']:,} messages each as in section 1, taking turns\n" + table(
                         ["relay", "CPU µs/msg, one at a time", f"CPU µs/msg, bursts of {disp['burst']}",
                          "delivered"], rows))
    hist = r.get("history")
    if hist and "relays" in hist:
        rows = [[f"history {name}", x["cpu_us_per_msg"], x["cpu_us_per_msg_burst"], x.get("net_us_per_msg"),
                 x.get("net_us_per_msg_burst"), x["delivered_fraction"],
                 f"{fmt(x['shown'])} / {fmt(x['sent'])}", fmt(x["history_rows"])]
                for name, x in hist["relays"].items()]
        rows.append(["on / off", hist["ratio_on_off"], hist["ratio_on_off_burst"], hist.get("net_ratio_on_off"),
                     hist.get("net_ratio_on_off_burst"), "", "", ""])
        parts.append(f"1b. Relay cost with history on and off: a node that displays what it relays (--json), "
                     f"{hist['messages_per_relay']:,} messages each as in section 1, taking turns; the whole "
                     f"process, and its socket thread alone (the relaying path)\n" + table(
                         ["relay", "CPU µs/msg, one at a time", f"CPU µs/msg, bursts of {hist['burst']}",
                          "socket thread µs/msg, one at a time", f"socket thread µs/msg, bursts of {hist['burst']}",
                          "delivered", "shown / sent", "rows in history"], rows))
    seal = r.get("seal")
    if seal and "relays" in seal:
        rows = [[f"network key {name}", x["cpu_us_per_msg"], x["cpu_us_per_msg_burst"], x["delivered_fraction"]]
                for name, x in seal["relays"].items()]
        rows.append(["on / off", seal["ratio_on_off"], seal["ratio_on_off_burst"], ""])
        parts.append(f"1c. Relay cost with a network key on and off (--quiet), {seal['messages_per_relay']:,} "
                     f"messages each as in section 1, taking turns; seal {seal['seal_us']:.1f} µs, open "
                     f"{seal['unseal_us']:.1f} µs a {seal['datagram_bytes']}-byte datagram in this process "
                     f"(+{seal['overhead_bytes']} bytes)\n" + table(
                         ["relay", "CPU µs/msg, one at a time", f"CPU µs/msg, bursts of {seal['burst']}",
                          "delivered"], rows))
    lat = r.get("latency")
    if lat and "lines" in lat:
        rows = [[f"{x['hops']} hops", x.get("p50_ms"), x.get("p99_ms"), x.get("max_ms"), x.get("p50_per_hop_ms"),
                 f"{x['received']}/{x['sent']}"] for x in lat["lines"]]
        pipe = lat.get("pipe_overhead") or {}
        rows.append(["pipe only", pipe.get("p50_ms"), pipe.get("p99_ms"), pipe.get("max_ms"), None,
                     fmt(pipe.get("count"))])
        parts.append("2. Latency, send to display (ms), a line of meshchat processes; \"pipe only\" is a "
                     "child's stdout line reaching this reader\n" + table(
                         ["line", "p50", "p99", "max", "p50 per hop", "received"], rows)
                     + f"\nmarginal p50 per hop (8-hop minus 1-hop, / 7): {fmt(lat.get('marginal_p50_per_hop_ms'), 3)} ms")
    scales = [s for s in r.get("scale") or [] if "nodes" in s]
    if scales:
        rows = [[s["nodes"], s["edges"], s["ready_s"], s["rss_mb_mean"], s["rss_mb_max"],
                 s["pss_mb_mean"], s["idle_cpu_pct_of_core"], s["delivery_fraction"],
                 f"{s['delivered_pairs']:,}/{s['expected_pairs']:,}", s["kernel_rcvbuf_drops"],
                 f"{fmt(s['first_arrival_hops_max'])}/{s['diameter']}/{s['ttl']}",
                 pct(s["first_arrival_longer_than_shortest"])] for s in scales]
        parts.append(f"3. Scale: random degree-{DEGREE} meshes, idle {fmt(scales[0]['idle_s'], 1)} s, "
                     f"{scales[0]['broadcasts']} broadcasts from random nodes\n" + table(
                         ["nodes", "links", "all ready s", "RSS MB mean", "RSS MB max", "PSS MB mean",
                          "idle CPU % of a core", "delivered", "node×message", "kernel drops",
                          "hops max/diameter/ttl", "first copy by a longer path"], rows))
    mem = r.get("memory")
    if mem and "seen" in mem:
        s, n = mem["seen"], mem.get("node") or {}
        parts.append("4. Memory\n" + table(["figure", "value"], [
            [f"seen dict bytes/entry, filled to {s['seen_max']:,}", s["filled_bytes_per_entry"]],
            [f"seen dict bytes/entry, worst over {s['adds']:,} adds", s["worst_bytes_per_entry"]],
            ["node RSS MB at start", n.get("rss_mb_start")],
            [f"node RSS MB after {n.get('ids_sent', 0):,} unique ids ({n.get('ids_relayed', 0):,} relayed)",
             n.get("rss_mb_after")],
            ["node peak RSS MB (VmHWM)", n.get("peak_rss_mb")],
        ]))
    floods = r.get("flood")
    if floods:
        rows = [[f["nodes"], f["per_message"], f["per_message_raw"], f["other_floods"], f["naive_per_message"],
                 f["every_neighbour_per_message"], f["ideal_per_message"], f.get("fewer_than_naive_pct"),
                 f["delivery_fraction"], f.get("cpu_ms_per_flood_in_burst")] for f in floods]
        parts.append("5. Flood efficiency, datagrams per broadcast (HELLOs left out; presence floods during the "
                     "burst counted as floods)\n" + table(
                         ["nodes", "meshchat", "raw / broadcasts", "presence floods", "naive (all but the sender)",
                          "to every neighbour", "ideal (tree)", "% fewer than naive", "delivered",
                          "CPU ms per flood, whole mesh"], rows))
    direct = r.get("direct")
    if direct and "routed" in direct:
        names = {"broadcast": "broadcast", "routed": "direct, route known (routed)",
                 "flooded": "direct, no route known (flooded)"}
        rows = [[names[k], direct[k]["per_message"], f"{fmt(direct[k]['min'])} / {fmt(direct[k]['max'])}",
                 pct(direct[k]["delivery_fraction"]), f"{direct[k]['messages']} / {direct[k]['discarded']}"]
                for k in DIRECT_KINDS]
        routed = direct["routed"]
        parts.append(f"6. Direct messages, datagrams mesh-wide per message (HELLOs left out), {direct['nodes']} "
                     f"nodes, one message at a time; windows with a presence flood in them are left out\n" + table(
                         ["message", "datagrams", "min / max", "delivered", "kept / left out"], rows)
                     + f"\nrouted: {fmt(routed['hops_mean'])} hops on average (shortest path "
                       f"{fmt(routed['shortest_mean'])}); routed / broadcast = {fmt(direct['routed_vs_broadcast'], 3)}")
    idles = [x for x in r.get("idle") or [] if "nodes" in x]
    if idles:
        rows = [[x["nodes"], x["settled_s"], x["seconds"], x["hello_sent_per_node_per_s"], x["hello_sent_per_s"],
                 x["other_datagrams_per_s"], x["other_floods"], x["cpu_pct_of_core"],
                 f"{fmt(x['hello_only_cpu_pct_of_core'])} ({x['quiet_slices']}/{x['slices']})",
                 x["cpu_ms_per_presence_flood"], x["presence_floods_per_s_by_design"],
                 x["steady_cpu_pct_of_core_estimate"], x["steady_flood_cpu_from"] or ""] for x in idles]
        parts.append("7. Idle traffic once settled (HELLOs backed off), the whole mesh; CPU in % of one core. "
                     "HELLOs only: the slices of the window with no presence flood\n" + table(
                         ["nodes", "settled s", "window s", "HELLOs/s per node", "HELLOs/s in all",
                          "other datagrams/s", "presence floods", "CPU, window", "CPU, HELLOs only (slices)",
                          "CPU ms per presence flood", "presence floods/s by design", "CPU, steady state (est.)",
                          "a flood's CPU from"],
                         rows))
    if idles:
        rows = [[x["nodes"], x["have_sent_per_node_per_s"], x["want_sent_per_node_per_s"], x["served_per_node_per_s"],
                 " ".join(str(v) for v in x["have_sent_by_slice"]), x["last_broadcast_s"]] for x in idles]
        parts.append("7b. Idle repair traffic, same window: HAVE and WANT datagrams and served copies per node\n"
                     + table(["nodes", "HAVE/s per node", "WANT/s per node", "served/s per node",
                              "HAVEs, whole mesh, by slice", "s since the last broadcast"], rows))
    lives = [x for x in r.get("liveness") or [] if "nodes" in x]
    if lives:
        rows = [[x["nodes"], x["hello_max_s"], x["killed"], f"{x['reported']}/{x['neighbours']}", x["min_s"],
                 x["median_s"], x["max_s"], x["bound_s"], x["wrong_downs"]] for x in lives]
        parts.append("8. Dead neighbours: nodes killed (SIGKILL) until each neighbour says peer_down\n" + table(
            ["nodes", "HELLO interval max s", "killed", "reported", "min s", "median s", "max s", "bound s",
             "live ones reported down"], rows))
    disc = r.get("discovery")
    if disc and "trials" in disc:
        parts.append(f"9. Discovery: a node with --discover started next to a running one, {disc['trials']} "
                     f"trial(s), seconds\n" + table(["from", "median", "max"], [
                         ["start to ready (the process)", disc["start_s"]["median"], disc["start_s"]["max"]],
                         ["ready to both peer_up", disc["found_s"]["median"], disc["found_s"]["max"]],
                         ["ready to its first chat shown by the other", disc["chat_s"]["median"],
                          disc["chat_s"]["max"]]]))
    reps = [x for x in r.get("repair") or [] if "loss" in x]
    if reps:
        rows = []
        for x in reps:
            p, c = x["per_message"], x["counters"]
            rows.append([pct(x["loss"]), f"{x['broadcasts']} + {x['directs']}", p["all_datagrams"], p["flood"],
                         p["ack"], p["retry"], p["have"], p["want"], p["served"], p["hello"],
                         x["ack_per_direct"], x["retry_per_direct"], c["repaired"], x["repair_per_repaired"],
                         pct(x["delivery_fraction"]), x["shown_twice"], x["complete_after_s"],
                         f"{fmt(x['hub']['dropped_loss'])} / {fmt(x['hub']['received'])}"])
        parts.append(f"10. Delivery's datagrams per message (broadcasts + direct messages), {reps[0]['nodes']} "
                     f"nodes, every link through a lossy proxy, counted from every node's /stats over "
                     f"{fmt(reps[0]['window_s'], 0)} s\n" + table(
                         ["loss", "messages", "all datagrams", "floods (CHAT, ACK, served)", "ACK", "retry", "HAVE",
                          "WANT", "served", "HELLO", "ACKs per direct", "retries per direct", "repaired",
                          "WANT+served per repaired", "delivered", "shown twice", "all shown after s",
                          "proxy dropped / got"], rows))
        idle_rows = [[pct(x["loss"]), x["idle"]["seconds"], x["idle"]["have_per_node_per_s"],
                      x["idle"]["want_per_node_per_s"], x["idle"]["served_per_node_per_s"],
                      x["idle"]["hello_per_node_per_s"]] for x in reps if "idle" in x]
        if idle_rows:
            parts.append("10b. The same meshes idle afterwards, per node\n" + table(
                ["loss", "window s", "HAVE/s", "WANT/s", "served/s", "HELLO/s"], idle_rows))
    ops = {"<=": "≤", "<": "<", ">=": "≥", ">": ">"}
    rows = [[t["target"], t["value"], f"{ops[t['op']]} {fmt(t['limit'])} {t['unit']}".rstrip(),
             {True: "met", False: "NOT MET", None: "n/a"}[t["met"]] + (f" ({t['note']})" if t["note"] else "")]
            for t in r["targets"]]
    sec = r.get("security")
    if sec and "relay_on_us" in sec:
        b = sec["datagram_bytes"]
        parts.append(f"11. Security, in-process, {sec['messages']:,} chat-sized messages through one relay (CPU µs "
                     f"per message)\n" + table(
                         ["what", "off", "on", "on / off"],
                         [["relay, first copies (on: verified)", sec["relay_off_us"], sec["relay_on_us"],
                           ratio_of(sec["relay_on_us"], sec["relay_off_us"])],
                          ["display, direct messages (on: sealed, opened)", sec["display_clear_us"],
                           sec["display_sealed_us"], ratio_of(sec["display_sealed_us"], sec["display_clear_us"])],
                          ["sender: sign / seal and sign", "", f"{sec['sign_us']} / {sec['seal_and_sign_us']}", ""],
                          ["duplicates (never verified)", "", sec["duplicate_us"], ""],
                          ["datagram bytes: unsigned, signed, sealed", b["unsigned"], f"{b['signed']}, "
                           f"{b['sealed_signed']}", ""]]))
    lz = (r.get("lazy") or {}).get("rows")
    if lz:
        lrows = []
        for x in lz:
            for model in ("flood", "lazy"):
                y = x[model]
                lrows.append([pct(x["loss"]), model, y["payload_per_msg"], y["payload_bytes_per_msg"],
                              y["announce_per_msg"], y["announce_bytes_per_msg"], pct(y["delivery_first_copy"]),
                              pct(y["delivery_after_repair"]), y["p50_ms"], y["p99_ms"], y["all_p99_ms"]])
        parts.append(f"12. Lazy push against flooding, {lz[0]['nodes']} nodes, random degree-{DEGREE}, "
                     f"{lz[0]['messages']} broadcasts from random origins, simulated (scripts/simulate.py: the real "
                     f"relay, membership, delivery and lazy push in virtual time; 10 ms links), mean of seeds "
                     f"{lz[0]['seeds']}; per broadcast\n" + table(
                         ["loss", "relaying", "payload datagrams", "payload bytes", "announcements (IHAVE, GRAFT, "
                          "PRUNE)", "announcement bytes", "first copy", "after repair", "p50 ms", "p99 ms",
                          "p99 incl. repair ms"], lrows))
    if r.get("files"):
        parts.append("\n".join(files_section().report(r["files"], fmt, table)).strip())
    parts.append("Targets\n" + table(["target", "this run", "target", "status"], rows))
    errors = [f"{k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    errors += [f"{k}: {x['error']}" for k in ("scale", "idle", "liveness", "repair") for x in r.get(k) or []
               if "error" in x]
    if errors:
        parts.append("Errors\n" + "\n".join(errors))
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small version of each section (CI: checks it runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--html", metavar="FILE", help="also write the tables and charts as one HTML file")
    p.add_argument("--nodes", type=int, nargs="+", metavar="N",
                   help=f"mesh sizes for the scale section (default 50; {QUICK_NODES} with --quick; "
                        f"at most {MAX_NODES})")
    p.add_argument("--seed", type=int, default=1, help="seed of the random topology and origins (default 1)")
    p.add_argument("--only", nargs="+", choices=SECTIONS,
                   help="run only these sections (flood comes with scale; direct uses the first --nodes size)")
    p.add_argument("--serve", choices=tuple(SERVERS), help=argparse.SUPPRESS)
    p.add_argument("--serve-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.serve_peers)
    if sys.platform == "win32":
        parser.exit(2, "bench.py: reads its children's output through a selector, which Windows pipes do not "
                       "support; run it on Linux or macOS\n")
    sizes = args.nodes or [QUICK_NODES if args.quick else 50]
    for n in sizes:
        if not 3 <= n <= MAX_NODES:
            parser.error(f"argument --nodes: {n} is not from 3 to {MAX_NODES}")
    cfg = QUICK if args.quick else FULL
    sections = set(args.only or SECTIONS)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    global DATA_ROOT
    DATA_ROOT = tempfile.mkdtemp(prefix="meshchat-bench-")
    started = time.perf_counter()
    r: dict = {"quick": args.quick, "machine": machine(), "config": dict(cfg, nodes=sizes, seed=args.seed)}
    fleet = Fleet()
    failed = False

    def run(name: str, body: Callable[[], object]) -> object:
        nonlocal failed
        say(f"{name} ...")
        started = time.perf_counter()
        try:
            return body()
        except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            failed = True
            say(f"{name} failed: {e}")
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            r.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)

    try:
        if "relay" in sections:
            r["relay"] = run("relay cost", lambda: bench_relay(cfg, fleet))
        if "display" in sections:
            r["display"] = run("display cost", lambda: bench_display(cfg, fleet))
        if "history" in sections:
            r["history"] = run("relay cost, history on and off", lambda: bench_history(cfg, fleet))
        if "seal" in sections:
            r["seal"] = run("relay cost, network key on and off", lambda: bench_seal(cfg, fleet))
        if "latency" in sections:
            r["latency"] = run("latency", lambda: bench_latency(cfg, fleet))
        if "memory" in sections:
            r["memory"] = {"seen": run("seen dict", lambda: bench_seen_bytes(cfg)),
                           "node": run("node memory", lambda: bench_node_memory(cfg, fleet))}
            for part in ("seen", "node"):
                if "error" in r["memory"][part]:
                    r["memory"]["error"] = r["memory"][part]["error"]
        if sections & MESH_SECTIONS:
            for key, section in (("scale", "scale"), ("flood", "scale"), ("idle", "idle"), ("liveness", "liveness")):
                if section in sections:
                    r[key] = []
            for k, n in enumerate(sizes):
                # Direct messages in the first mesh only (50 nodes by default), which gets the sink.
                direct = "direct" in sections and k == 0
                mesh = run(f"mesh of {n} nodes", lambda: Mesh(fleet, n, args.seed, sink=direct))
                if not isinstance(mesh, Mesh):
                    for key in ("scale", "idle", "liveness"):
                        if key in r:
                            r[key].append(dict(mesh, nodes_wanted=n))
                    if direct:
                        r["direct"] = mesh
                    continue
                try:
                    burst_ms = None
                    if "scale" in sections:
                        got = run(f"scale, {n} nodes", lambda: bench_scale(mesh, cfg, args.seed))
                        if isinstance(got, tuple):
                            burst_ms = got[1].get("cpu_ms_per_flood_in_burst")
                            r["scale"].append(got[0])
                            r["flood"].append(got[1])
                        else:
                            r["scale"].append(got)
                    if direct:
                        r["direct"] = run(f"direct messages, {n} nodes", lambda: bench_direct(mesh, cfg, args.seed))
                    if "idle" in sections:
                        r["idle"].append(run(f"idle traffic, {n} nodes", lambda: bench_idle(mesh, cfg, burst_ms)))
                    if "liveness" in sections and not args.quick:
                        hello_max = membership_constants()["HELLO_MAX_S"]
                        r["liveness"].append(run(f"dead neighbours, {n} nodes",
                                                 lambda: bench_liveness(mesh, cfg, args.seed, hello_max)))
                finally:
                    mesh.close()
            if "liveness" in sections and args.quick:
                r["liveness"].append(run(f"dead neighbours, {QUICK_LIVENESS_NODES} nodes, fast HELLOs",
                                         lambda: bench_liveness_fast(cfg, fleet, args.seed)))
        if "discovery" in sections:
            r["discovery"] = run("discovery", lambda: bench_discovery(cfg, fleet))
        if "repair" in sections:
            got = run("delivery's datagrams, lossless and lossy", lambda: bench_repair(cfg, fleet, args.seed))
            r["repair"] = got if isinstance(got, list) else [got]
        if "security" in sections:
            r["security"] = run("security: signatures and private messages", lambda: bench_security(cfg))
        if "lazy" in sections:
            r["lazy"] = run("lazy push against flooding, simulated", lambda: bench_lazy(cfg))
        if "files" in sections:
            r["files"] = run("files: a line, a mesh, a lossy line", lambda: files_section().bench_files(
                sys.modules[__name__], args.quick, fleet, args.seed))
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        fleet.close()
        shutil.rmtree(DATA_ROOT, ignore_errors=True)
    r["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    r["elapsed_s"] = time.perf_counter() - started
    r["targets"] = targets(r)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(report(r))
    if args.html:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import reports

        error = reports.write(args.html, reports.bench_html(r, report(r)))
        say(error or f"report written to {args.html}")
        failed = failed or error is not None
    return 1 if failed else 0


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
