"""A running node: its UDP socket, its threads, and the lock around the relay.

Threads:
- ``meshchat-net`` blocks in ``select()`` on the socket and a waker socket,
  drains every datagram that is ready, asks the relay what to do with each,
  and sends the copies. ``stop()`` wakes it through the waker; it never polls.
  Whatever one datagram makes raise is contained to it: the datagram is
  counted as ``dropped_internal``, logged once per cause, and the thread
  goes on (the last line of defence: validation should have caught it).
- ``meshchat-reaper`` expires old ids every ``REAP_INTERVAL_S``.
- The caller's thread (the CLI's main thread, or a test) calls ``say``,
  ``ping``, ``stats``, ``peer_table`` and ``stop``.

The relay's state (seen ids, peer table, counters) is shared by all three and
guarded by ``self._lock``. Events for the user (``Display``, ``Pong``,
``Notice``, ``Failure``) go to ``on_event``, called from ``meshchat-net``.
"""

import hashlib
import logging
import operator
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import Any, Callable, Iterable, List, NamedTuple, Optional, Set, Tuple

from .membership import Beacon, Membership, MembershipConfig, Originate
from .relay import COUNTERS, Relay, RelayConfig, Send
from .wire import Addr, Message

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 5.0
RECV_BUFFER_BYTES = 65535  # read every datagram whole, whatever its size
RCVBUF_WANTED_BYTES = 1 << 20
DRAIN_BATCH = 256  # datagrams per wake-up before the waker gets a look in
JOIN_TIMEOUT_S = 1.0
MIN_TIMER_S = 0.005  # a timer already due still lets the selector look at the sockets


MAX_LOGGED_CAUSES = 64  # distinct internal errors logged; any beyond are only counted
LOGGED_HEAD_BYTES = 64  # of a datagram that raised, enough to recognise it, never all of it

# What handling a datagram may count before it fails: put back if it does. The
# drops are left alone (one is only ever counted as a datagram's last step), and
# so is ``received``.
_UNDONE = tuple(n for n in COUNTERS if n != "received" and not n.startswith("dropped_"))
_counts = operator.attrgetter(*_UNDONE)


class Discovery(NamedTuple):
    """Where beacons go: a multicast group, and the addresses of the interfaces to beacon on."""

    group: Addr
    interfaces: tuple


class Failure(NamedTuple):
    """A worker thread died; the node is no longer relaying."""

    thread: str
    error: str


def _quiet_windows_resets(sock: socket.socket) -> None:
    """Stop Windows from failing recvfrom() after an ICMP error from a peer that is down."""
    if sys.platform != "win32":
        return
    try:
        import ctypes
        from ctypes import wintypes

        ws2 = ctypes.WinDLL("ws2_32")
        ws2.WSAIoctl.argtypes = [
            ctypes.c_size_t, wintypes.DWORD, ctypes.c_void_p, wintypes.DWORD,
            ctypes.c_void_p, wintypes.DWORD, ctypes.POINTER(wintypes.DWORD),
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        for code in (0x9800000C, 0x9800000F):  # SIO_UDP_CONNRESET, SIO_UDP_NETRESET
            off = wintypes.BOOL(False)
            returned = wintypes.DWORD()
            ws2.WSAIoctl(sock.fileno(), code, ctypes.byref(off), ctypes.sizeof(off),
                         None, 0, ctypes.byref(returned), None, None)
    except (OSError, AttributeError, ValueError) as e:
        log.debug("could not switch off UDP reset reports: %s", e)


def start_without_signals(thread: threading.Thread) -> None:
    """Start ``thread`` with SIGINT and SIGTERM blocked in it (POSIX), so the kernel hands
    them to the main thread: Python runs handlers only there, and a signal that lands
    on a worker thread would leave a main thread blocked on a lock waiting forever."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: signals are the main thread's anyway
        thread.start()
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        thread.start()  # a new thread inherits the mask it was started with
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Node:
    def __init__(
        self,
        config: RelayConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        peers: Iterable[Addr] = (),
        on_event: Callable[[object], None] = lambda event: None,
        advertise: Optional[str] = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        relay_factory: Callable[..., Relay] = Relay,
        wrap_socket: Callable[[socket.socket], Any] = lambda sock: sock,
        membership: Optional[MembershipConfig] = None,
        discovery: Optional[Discovery] = None,
    ) -> None:
        """Bind the socket (OSError if the port is taken); ``start()`` starts the threads.

        The label in ``config`` is replaced by ``ADVERTISE_OR_HOST:PORT`` once bound.
        ``relay_factory`` and ``wrap_socket`` let tests trace the relay and inject
        socket faults; the selector always watches the real socket.
        """
        self._clock = clock
        self._wall = wall
        self._on_event = on_event
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: List[threading.Thread] = []
        self.failure: Optional[Failure] = None
        self.last_roll_call: Optional[float] = None  # when we last sent a broadcast PING

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # No SO_REUSEADDR: two nodes must never share a port.
            self._sock.bind((host, port))
            self._sock.setblocking(False)
            self.rcvbuf_bytes = self._grow_rcvbuf()
            _quiet_windows_resets(self._sock)
        except BaseException:
            self._sock.close()
            raise
        self.addr: Addr = (host, self._sock.getsockname()[1])
        self.label = f"{advertise or host}:{self.addr[1]}"
        self.membership: Optional[Membership] = None
        if membership is not None or discovery is not None:
            mcfg = replace(membership or MembershipConfig(label=""), label=self.label,
                           peers_only=config.peers_only, max_ttl=config.max_ttl, discover=discovery is not None)
            self.membership = Membership(mcfg, secret=os.urandom(32))
        self.relay = relay_factory(replace(config, label=self.label), peers, membership=self.membership)
        self._discovery = discovery
        self._group_sock: Optional[socket.socket] = None
        if discovery is not None:
            try:
                self._group_sock = _open_group(discovery, self._sock)
            except OSError:
                self._sock.close()
                raise

        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, self._datagrams_ready)
        self._io = wrap_socket(self._sock)
        self._selector.register(self._waker_r, selectors.EVENT_READ, self._woken)
        if self._group_sock is not None:
            self._selector.register(self._group_sock, selectors.EVENT_READ, self._beacons_ready)
        self._closed = False
        self._causes_logged: Set[Tuple[str, str, int]] = set()

    def _grow_rcvbuf(self) -> int:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_WANTED_BYTES)
        except OSError as e:
            log.debug("SO_RCVBUF not raised: %s", e)
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> "Node":
        for name, body in (("meshchat-net", self._net_loop), ("meshchat-reaper", self._reap_loop)):
            t = threading.Thread(target=self._guarded, args=(name, body), name=name, daemon=True)
            self._threads.append(t)
            start_without_signals(t)
        return self

    def stop(self) -> bool:
        """Stop the threads and close the socket; safe to call twice. False if a thread hung."""
        self._stopping.set()
        self._wake()
        ok = True
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(JOIN_TIMEOUT_S)
                if t.is_alive():
                    log.warning("thread %s did not stop within %.1f s", t.name, JOIN_TIMEOUT_S)
                    ok = False
        self._close()
        return ok

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._selector.close()
        for s in (self._sock, self._waker_r, self._waker_w, self._group_sock):
            if s is not None:
                s.close()

    def _wake(self) -> None:
        try:
            self._waker_w.send(b"\0")
        except OSError:
            pass  # already closed, or the waker is full: either way it will wake

    def _guarded(self, name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as e:  # a dead worker must not leave the node half-alive
            if self._stopping.is_set():
                return
            log.error("thread %s died: %r", name, e, exc_info=True)
            self.failure = Failure(name, f"{type(e).__name__}: {e}")
            self._stopping.set()
            self._wake()
            self._on_event(self.failure)

    # -- the threads ------------------------------------------------------------

    def _net_loop(self) -> None:
        select = self._selector.select
        m = self.membership
        if m is not None:
            self._tick()  # greet the peers now, before anything the user sends
        while not self._stopping.is_set():
            timeout = None
            if m is not None:
                # Membership's timers (HELLOs, liveness, presence, beacons) are the select() timeout.
                with self._lock:
                    deadline = m.next_deadline()
                if deadline is not None:
                    timeout = max(deadline - self._clock(), MIN_TIMER_S)
            for key, _ in select(timeout):
                key.data()
            if m is not None:
                self._tick()

    def _tick(self) -> None:
        with self._lock:
            now = self._clock()
            deadline = self.membership.next_deadline()
            if deadline is None or deadline > now:
                return
            actions = self.relay.timers_due(now, self._wall())
        self._act(actions)

    def _act(self, actions: list) -> None:
        """Carry out what the relay and membership asked for, outside the lock."""
        for action in actions:
            kind = type(action)
            if kind is Send:
                self._send(action)
            elif kind is Beacon:
                self._beacon(action.data)
            elif kind is Originate:
                self._originate(action.kind, action.body, "", action.extra, action.ttl)
            else:
                self._on_event(action)

    def _beacon(self, data: bytes) -> None:
        assert self._discovery is not None
        for iface in self._discovery.interfaces:
            try:
                self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
                self._io.sendto(data, self._discovery.group)
            except OSError as e:
                log.debug("beacon on %s failed: %s", iface, e)
                with self._lock:
                    self.relay.counters.send_errors += 1
            else:
                with self._lock:
                    self.relay.counters.sent += 1
                    self.relay.counters.link_sent += 1

    def _beacons_ready(self) -> None:
        self._datagrams_ready(self._group_sock)

    def _woken(self) -> None:
        try:
            while self._waker_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _datagrams_ready(self, sock: Any = None) -> None:
        recvfrom = (sock or self._io).recvfrom
        relay = self.relay
        lock = self._lock
        clock, wall = self._clock, self._wall
        for _ in range(DRAIN_BATCH):
            try:
                data, addr = recvfrom(RECV_BUFFER_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Windows reports an ICMP error from an earlier send here.
                log.debug("recvfrom failed: %s", e)
                with lock:
                    relay.counters.recv_errors += 1
                continue
            failed = None
            with lock:
                before = _counts(relay.counters)
                try:
                    actions = relay.datagram_received(data, addr, clock(), wall())
                except Exception as e:  # one datagram must never stop the socket thread
                    self._count_internal_drop(before)
                    failed = e
            if failed is not None:
                self._log_internal(data, failed, "dropped")
                continue
            for action in actions:
                try:
                    self._act((action,))
                except Exception as e:  # counted as handled: the relay did decide; the rest still go
                    self._log_internal(data, e, "handled, but handing on one of its actions failed")

    def _count_internal_drop(self, before: tuple) -> None:
        """Under the lock: undo what the failed datagram counted, and count it dropped."""
        c = self.relay.counters
        for name, value in zip(_UNDONE, before):
            setattr(c, name, value)
        outcomes = c.handled + sum(getattr(c, n) for n in COUNTERS if n.startswith("dropped_"))
        if outcomes < c.received:
            c.dropped_internal += 1

    def _log_internal(self, data: bytes, error: Exception, what: str) -> None:
        """Log an internal error once per cause (type and place), with enough to reproduce it."""
        tb = traceback.extract_tb(error.__traceback__)
        name = type(error).__name__
        cause = (name, tb[-1].filename, tb[-1].lineno or 0) if tb else (name, "", 0)
        if cause in self._causes_logged or len(self._causes_logged) >= MAX_LOGGED_CAUSES:
            return
        self._causes_logged.add(cause)
        log.error(
            "internal error on a datagram (%s); later ones with the same cause are counted, not logged: "
            "%d bytes, sha256 %s, first bytes %r",
            what, len(data), hashlib.sha256(data).hexdigest()[:12], data[:LOGGED_HEAD_BYTES],
            exc_info=(type(error), error, error.__traceback__),
        )

    def _reap_loop(self) -> None:
        while not self._stopping.wait(REAP_INTERVAL_S):
            with self._lock:
                notices = self.relay.expire(self._clock())
            for notice in notices:
                self._on_event(notice)

    def _send(self, send: Send) -> None:
        sendto = self._io.sendto
        for addr in send.addrs:
            try:
                sendto(send.data, addr)
            except OSError as e:
                # One unreachable or slow peer must not stop the others.
                log.debug("send to %s:%s failed: %s", addr[0], addr[1], e)
                with self._lock:
                    self.relay.counters.send_errors += 1

    # -- the caller's side -------------------------------------------------------

    def say(self, body: str, dst: str = "") -> List[Message]:
        """Send a CHAT; returns the messages it became (more than one if it was long)."""
        return self._originate("CHAT", body, dst)

    def ping(self, dst: str = "") -> List[Message]:
        if not dst:
            self.last_roll_call = self._clock()
        return self._originate("PING", "", dst)

    def _originate(self, kind: str, body: str, dst: str, extra: Optional[dict] = None, ttl: int = 0) -> List[Message]:
        with self._lock:
            messages, sends = self.relay.originate(kind, body, dst, self._clock(), self._wall(), extra, ttl)
        for send in sends:
            self._send(send)
        return messages

    def add_peer(self, addr: Addr) -> None:
        with self._lock:
            self.relay.add_peer(addr, self._clock())
        self._wake()  # a new peer is greeted now, not at the next timer

    def set_nick(self, nick: str) -> None:
        if self.membership is None:
            return
        with self._lock:
            self.membership.set_nick(nick, self._clock())
        self._wake()

    def resolve(self, name: str):
        """A typed name to a label: (label, "") or (None, why not)."""
        if self.membership is None:
            return name, ""
        with self._lock:
            return self.membership.resolve(name)

    def nick_of(self, label: str) -> str:
        """The nick the mesh knows ``label`` by, or ""."""
        if self.membership is None:
            return ""
        with self._lock:
            return self.membership.nick_of(label)

    def who(self) -> list:
        if self.membership is None:
            return []
        with self._lock:
            return self.membership.who(self._clock())

    def neighbour_rows(self) -> list:
        if self.membership is None:
            return []
        with self._lock:
            return self.membership.peer_rows(self._clock())

    def stats(self) -> dict:
        with self._lock:
            out = self.relay.stats()
        out["rcvbuf_bytes"] = self.rcvbuf_bytes
        return out

    def peer_table(self) -> list:
        with self._lock:
            return self.relay.peer_table(self._clock())


def _open_group(discovery: Discovery, unicast: socket.socket) -> socket.socket:
    """The socket that hears the discovery group; beacons go out from the unicast socket, so that
    their source is the address the node is reached at."""
    host, port = discovery.group
    for opt, value in ((socket.IP_MULTICAST_TTL, 1), (socket.IP_MULTICAST_LOOP, 1)):
        unicast.setsockopt(socket.IPPROTO_IP, opt, value)  # one hop: the LAN only; loop: this machine too
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # Several nodes on one machine share the group's port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            except OSError:
                pass
        try:
            sock.bind((host, port))  # POSIX: only this group's datagrams
        except OSError:
            sock.bind(("", port))  # Windows cannot bind a group address
        joined = 0
        for iface in discovery.interfaces:
            try:
                mreq = socket.inet_aton(host) + socket.inet_aton(iface)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                joined += 1
            except OSError as e:
                log.warning("cannot join discovery group %s on %s: %s", host, iface, e)
        if not joined:
            raise OSError(f"cannot join discovery group {host}:{port} on any interface")
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise
