"""A running node: its UDP socket, its threads, and the lock around the relay.

Threads:
- ``meshchat-net`` blocks in ``select()`` on the socket and a waker socket,
  drains every datagram that is ready, asks the relay what to do with each,
  and sends the copies. ``stop()`` wakes it through the waker; it never polls.
  Whatever one datagram makes raise is contained to it: the datagram is
  counted as ``dropped_internal``, logged once per cause, and the thread
  goes on (the last line of defence: validation should have caught it).
  With file sharing, pieces come to a second socket (the bulk socket), read
  in slices with the main socket drained first (``serve_bulk``).
- ``meshchat-reaper`` expires old ids every ``REAP_INTERVAL_S``.
- ``meshchat-metrics`` (only with ``metrics``): serves GET /metrics, reading
  snapshots taken under the lock like the caller's thread does (metrics.py).
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
import re
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from . import crypto
from .crypto import NetworkKey
from .delivery import CAPS as DELIVERY_CAPS
from .lazypush import CAP as LAZY_CAP
from .delivery import Delivery, DeliveryConfig, HeldDrop, HeldItem, HeldPut, OutboxDrop, OutboxItem, OutboxPut
from .delivery import direct_key
from .repair import ServeSince, stream_of
from .delivery import Store as StoreAction
from .membership import Beacon, Membership, MembershipConfig, Originate, PeerDown
from .metrics import MetricsServer, exposition, json_page
from . import __version__
from .private import BOX_FIELD, Private
from .private import CAP as PRIVATE_CAP
from .relay import COUNTERS, Display, Relay, RelayConfig, Send
from .store import HeldAdd, HeldRemove, OutboxAdd, OutboxRemove, SaveMessage, SetMeta, Store, StoreError, data_dir_for
from .trust import PinKey, Trust, signer
from . import files as filesmod
from .filedisk import FileDisk
from .node_files import FileSharingIO
from .wire import Addr, Message, encode

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 5.0
RECV_BUFFER_BYTES = 65535  # read every datagram whole, whatever its size
RCVBUF_WANTED_BYTES = 1 << 20
DRAIN_BATCH = 256  # datagrams per wake-up before the waker gets a look in
BULK_SLICE = 16  # bulk datagrams handled between two looks at the main socket: chat waits behind at most these
BULK_PROOF_S = 5.0  # pieces asked of a neighbour, none on our bulk socket for this long: that path is given up
JOIN_TIMEOUT_S = 1.0
MIN_TIMER_S = 0.005
# What there is to show goes to the main thread at most this often while messages stream in (each
# hand-over wakes it: about 100 us of CPU on a small virtual machine); a lone message goes at once.
HAND_OVER_GAP_S = 0.002
DELIVERY_STATS = ("acks_sent", "acks_received", "retries", "delivered", "undelivered", "held", "outbox",
                  "relay_holding", "relay_handed_over", "repaired", "late", "served", "wants_sent", "haves_sent",
                  "gaps_given_up")  # a timer already due still lets the selector look at the sockets


MAX_LOGGED_CAUSES = 64  # distinct internal errors logged; any beyond are only counted
LOGGED_HEAD_BYTES = 64  # of a datagram that raised, enough to recognise it, never all of it

# What handling a datagram may count before it fails: put back if it does. The
# drops are left alone (one is only ever counted as a datagram's last step), and
# so is ``received``.
_UNDONE = tuple(n for n in COUNTERS if n != "received" and not n.startswith("dropped_"))
_counts = operator.attrgetter(*_UNDONE)
_FILE_JOBS = (filesmod.ReadPiece, filesmod.WritePiece, filesmod.SaveMeta, filesmod.Finish, filesmod.Discard)


class History(NamedTuple):
    """The delivery layer and what it keeps: ``enabled`` False keeps nothing on disk (acks and
    repair still work, for this run)."""

    enabled: bool = True
    data_dir: Optional[str] = None  # None: the platform's per-user data folder
    max_messages: int = 100_000
    hold_s: float = 24 * 3600.0
    catch_up_s: float = 24 * 3600.0


class Discovery(NamedTuple):
    """Where beacons go: a multicast group, and the addresses of the interfaces to beacon on."""

    group: Addr
    interfaces: tuple


class Security(NamedTuple):
    """Signatures (needs the secure extra): our identity, and the keys pinned for others."""

    identity_file: Optional[str] = None  # None: in the data dir; in memory for the run without history


class FileSharing(NamedTuple):
    """File sharing (files.py): where downloads land, what is fetched without asking, and the quota."""

    downloads: Optional[str] = None  # None: "downloads" in the node's data folder
    accept_bytes: int = 16 << 20  # offers up to this from verified senders are fetched at once; 0: always ask
    quota_bytes: int = 1 << 30
    bulk: bool = True  # file pieces come to a second socket of their own (False: all on one, as older nodes)


class _Batch(NamedTuple):
    """What one drain of the socket gives: events to show, and the messages among them to save first."""
    events: List[object]
    saves: list


def serve_bulk(main_waiting: Callable[[], bool], drain_main: Callable[[], None], drain_bulk: Callable[[int], int],
               slice_n: int = BULK_SLICE, budget: int = DRAIN_BATCH) -> int:
    """The bulk socket's turn, the main socket first: before each slice of at most ``slice_n`` bulk
    datagrams, whatever waits on the main socket is drained, so a chat line waits behind one slice at
    most, never behind a window of chunks. Stops when the bulk socket is empty (``drain_bulk`` got fewer
    than it was allowed) or after ``budget`` (the timers and the waker get their look). How many it took."""
    taken = 0
    while taken < budget:
        if main_waiting():
            drain_main()
        n = drain_bulk(min(slice_n, budget - taken))
        taken += n
        if n < slice_n:
            break
    return taken


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


class Node(FileSharingIO):
    def __init__(
        self,
        config: RelayConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        peers: Iterable[Addr] = (),
        on_event: Callable[[object], None] = lambda event: None,
        advertise: Optional[str] = None,
        on_events: Optional[Callable[[List[object]], None]] = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        relay_factory: Callable[..., Relay] = Relay,
        wrap_socket: Callable[[socket.socket], Any] = lambda sock: sock,
        membership: Optional[MembershipConfig] = None,
        discovery: Optional[Discovery] = None,
        history: Optional[History] = None,
        security: Optional[Security] = None,
        network_key: Optional[NetworkKey] = None,
        network_key_optional: bool = False,
        metrics: Optional[Addr] = None,
        files: Optional[FileSharing] = None,
    ) -> None:
        """Bind the socket (OSError if the port is taken); ``start()`` starts the threads.

        The label in ``config`` is replaced by ``ADVERTISE_OR_HOST:PORT`` once bound.
        ``relay_factory`` and ``wrap_socket`` let tests trace the relay and inject
        socket faults; the selector always watches the real socket.
        ``on_events``: if given, what one drain of the socket gives to show goes to it as one
        list (one hand-over per wake-up, not per message), after the history has it.
        """
        self._clock = clock
        self._wall = wall
        self._on_event = on_event
        self._on_events = on_events
        self._held: "Optional[_Batch]" = None  # events kept for one hand-over (_hand_over), until _held_due
        self._held_due = 0.0
        self._handed_at = float("-inf")
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
        self.delivery: Optional[Delivery] = None
        self.store: Optional[Store] = None
        try:
            if history is not None and history.enabled:
                self.store = Store.open(data_dir_for(self.label, history.data_dir), history_max=history.max_messages,
                                        hold_s=history.hold_s)
        except BaseException:
            self._sock.close()
            raise
        # A closed mesh: every datagram is sealed once per Send on its way out (_send, _beacon),
        # and opened by the relay first thing on its way in.
        self._seal: Optional[Callable[[bytes], bytes]] = None
        sealing = {}
        if network_key is not None:
            self._seal = partial(crypto.seal, network_key)
            sealing["unseal"] = crypto.opener(network_key, network_key_optional)
        self.identity: Any = None  # crypto.Identity, with security
        self.identity_where = ""  # the file, or "" for one in memory
        self.identity_warning = ""  # one line if others can read the key file
        trust, sign = None, None
        if security is not None:
            try:
                trust, sign = self._security(security)
            except BaseException:
                self._sock.close()
                if self.store is not None:
                    self.store.close()
                raise
        if membership is not None or discovery is not None:
            mcfg = replace(membership or MembershipConfig(label=""), label=self.label,
                           peers_only=config.peers_only, max_ttl=config.max_ttl, discover=discovery is not None)
            if history is not None:
                # Lazy push rides on delivery (stream mids, its buffer answers GRAFTs): only with --lazy.
                mcfg = replace(mcfg, caps=mcfg.caps + DELIVERY_CAPS + (() if config.flood else (LAZY_CAP,)))
            if self.identity is not None:
                mcfg = replace(mcfg, key=self.identity.key_text)  # in our full HELLOs
            if files is not None:
                mcfg = replace(mcfg, caps=mcfg.caps + (filesmod.CAP,))
            if self.identity is not None and history is not None:
                # End-to-end boxes need the outbox (a message waits there for its key): our box key
                # goes in our signed PRESENCE, and E2E in our caps.
                mcfg = replace(mcfg, caps=mcfg.caps + (PRIVATE_CAP,),
                               announce=mcfg.announce + ((BOX_FIELD, self.identity.box.key_text),))
            self.membership = Membership(mcfg, secret=os.urandom(32))
            if history is not None:
                self.delivery = self._new_delivery(history)
        self.trust: Optional[Trust] = trust
        private = None
        if self.identity is not None and self.delivery is not None:
            private = Private(self.identity.box.key_text, crypto.seal_to, self.identity.box.open, crypto.unb64)
        self.private: Optional[Private] = private  # direct messages are sealed end to end
        self._key_came = threading.Event()  # a key a message of ours waited for came, and it went
        self.files: Optional[filesmod.Files] = None
        self.file_disk: Optional[FileDisk] = None
        if files is not None and self.membership is not None:
            try:
                self._files_setup(files, history)
            except BaseException:
                self._sock.close()
                if self.store is not None:
                    self.store.close()
                raise
        self.relay = relay_factory(replace(config, label=self.label), peers, membership=self.membership,
                                   delivery=self.delivery, **({"trust": trust, "sign": sign} if trust else {}),
                                   **sealing, **({"private": private} if private else {}),
                                   **({"files": self.files} if self.files is not None else {}))
        if self.store is not None:  # a replay dated before this start may have been shown then
            self.relay.replay_before_ts = self.store.last_ts()
        self._discovery = discovery
        self._group_sock: Optional[socket.socket] = None
        if discovery is not None:
            try:
                self._group_sock = _open_group(discovery, self._sock)
            except OSError:
                self._sock.close()
                if self.store is not None:  # and the history it opened (its dir lock): a retry must find it free
                    self.store.close()
                raise

        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, self._datagrams_ready)
        self._io = wrap_socket(self._sock)
        self._selector.register(self._waker_r, selectors.EVENT_READ, self._woken)
        self._more = selectors.DefaultSelector()  # the unicast socket alone (_drain)
        self._more.register(self._sock, selectors.EVENT_READ)
        if self._group_sock is not None:
            self._selector.register(self._group_sock, selectors.EVENT_READ, self._beacons_ready)
        self._bulk_setup(files)
        self._closed = False
        self._causes_logged: Set[Tuple[str, str, int]] = set()
        self.metrics: Optional[MetricsServer] = None
        if metrics is not None:
            try:  # MetricsError (one line) if its port is taken: not an OSError, so not taken for ours
                self.metrics = MetricsServer(metrics, {"/metrics": self.metrics_page, "/map.json": self.map_page},
                                             self._stopping)
            except BaseException:
                self._close()
                if self.store is not None:
                    self.store.close()
                raise

    def _security(self, security: Security) -> Tuple[Trust, Callable[[Message], Message]]:
        """Our identity (loaded, made on first start, or in memory) and the trust layer with its pins.

        Raises crypto.CryptoUnavailable or crypto.IdentityError (one line each)."""
        crypto.require("signatures")
        path = security.identity_file
        if path is None and self.store is not None:
            path = str(self.store.dir / crypto.IDENTITY_NAME)
        if path is None:
            self.identity = crypto.Identity.generate()
        else:
            self.identity = crypto.Identity.load_or_create(path)[0]
            self.identity_where = path
            self.identity_warning = crypto.exposed_warning(path)  # said once at start (cli)
        pins = self.store.pins() if self.store is not None else {}
        trust = Trust(crypto.verify, crypto.unb64, crypto.fingerprint, pins)
        return trust, signer(self.identity.key_text, self.identity.sign)

    def trust_key(self, label: str, fingerprint: str = "") -> str:
        """/trust: pin the key ``label`` offered (by fingerprint when several were); the text for the user."""
        if self.trust is None:
            return "this node does not check signatures"
        with self._lock:
            pin, text = self.trust.accept(label, fingerprint)
        if pin is not None:
            self._pin(pin)
        return text

    def _pin(self, pin: PinKey) -> None:
        if self.store is not None:
            self.store.put(SetMeta("pin:" + pin.label, pin.key))

    def _new_delivery(self, history: History) -> Delivery:
        """The delivery layer, started from what the store kept (or afresh, without history)."""
        st, m = self.store, self.membership
        assert m is not None
        if st is None:
            cfg = DeliveryConfig(self.label, os.urandom(8).hex(), history.hold_s, 0.0)
            return Delivery(cfg, neighbours=m.repair_neighbours)
        cfg = DeliveryConfig(self.label, st.node_id(), history.hold_s, history.catch_up_s)
        last = st.last_ts()
        return Delivery(
            cfg, next_seq=st.highest_seq("broadcast") + 1, next_dseq=st.highest_seq("direct") + 1,
            outbox=[OutboxItem(*row) for row in st.outbox()], held=[HeldItem(*row) for row in st.held()],
            streams=st.highest_seqs(), last_stored_ts=last if history.catch_up_s > 0 else None,
            has_message=st.has_message, neighbours=m.repair_neighbours)

    def _grow_rcvbuf(self) -> int:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_WANTED_BYTES)
        except OSError as e:
            log.debug("SO_RCVBUF not raised: %s", e)
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> "Node":
        if self.store is not None:
            self.store.start()
        bodies = [("meshchat-net", self._net_loop), ("meshchat-reaper", self._reap_loop)]
        if self.file_disk is not None:  # file sharing's disk work, off the socket thread (filedisk.py)
            bodies.append(("meshchat-files", self.file_disk.run))
        if self.metrics is not None:
            bodies.append(("meshchat-metrics", self.metrics.serve))
        for name, body in bodies:
            t = threading.Thread(target=self._guarded, args=(name, body), name=name, daemon=True)
            self._threads.append(t)
            start_without_signals(t)
        return self

    def stop(self) -> bool:
        """Stop the threads and close the socket; safe to call twice. False if a thread hung.

        Once the threads are quiet, neighbours are told (a HELLO saying goodbye), so they leave
        us out at once instead of after 20 s of silence."""
        first = not self._stopping.is_set()
        self._stopping.set()
        self._wake()
        if self.file_disk is not None:
            self.file_disk.stop()
        if self.metrics is not None:
            self.metrics.wake()
        ok = True
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(JOIN_TIMEOUT_S)
                if t.is_alive():
                    log.warning("thread %s did not stop within %.1f s", t.name, JOIN_TIMEOUT_S)
                    ok = False
        if first and ok and self.membership is not None and self._threads and not self._closed:
            with self._lock:
                byes = self.membership.goodbye(self._clock(), self._wall())
            for bye in byes:
                self._send(Send(bye.data, (bye.addr,)))
        self._close()
        if self.store is not None:
            with self._lock:
                closing = self.delivery.close() if self.delivery is not None else []
            self._store_actions(closing)
            self.store.close()
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
        self._more.close()
        for s in (self._sock, self._waker_r, self._waker_w, self._group_sock, self._bulk_sock):
            if s is not None:
                s.close()
        if self.metrics is not None:
            self.metrics.close()

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
        timers = self.membership is not None
        while not self._stopping.is_set():
            # The capabilities' timers (HELLOs, liveness, presence, beacons, retries, repair) are
            # the select() timeout: one look under the lock per wake-up fires what is due and
            # gives the next deadline (the first look greets the peers before anything is sent).
            timeout = self._tick() if timers else None
            if self._held is not None:  # a stream's events, waiting for their hand-over
                wait = self._held_due - self._clock()
                if wait <= 0:
                    self._release_held()
                else:
                    timeout = wait if timeout is None else min(timeout, wait)
            for key, _ in select(timeout):
                key.data()
        if self._held is not None:
            self._release_held()

    def _tick(self) -> Optional[float]:
        """Fire the timers that are due; the select() timeout until the next one (None: none)."""
        relay, clock = self.relay, self._clock
        with self._lock:
            now = clock()
            if self._bulk_sock is not None:
                self._bulk_check(now)
            deadline = relay.next_deadline()
            actions = None
            if deadline is not None and deadline <= now:
                actions = relay.timers_due(now, self._wall())
                deadline = relay.next_deadline()
        if actions:
            if self._held is not None:  # what came before a timer's events is shown before them
                self._release_held()
            self._act(actions)
        return None if deadline is None else max(deadline - clock(), MIN_TIMER_S)

    def _act(self, actions: list, batch: "Optional[_Batch]" = None) -> None:
        """Carry out what the relay and membership asked for, outside the lock.

        What there is to show (and to save) goes to ``batch`` if given, else on at once."""
        for action in actions:
            kind = type(action)
            if kind is PeerDown and not action.nick:
                # A goodbye HELLO carries no nick: name it by the one the mesh knew it by.
                action = action._replace(nick=self.nick_of(action.label))
            if kind is Send:
                self._send(action)
            elif kind is Beacon:
                self._beacon(action.data)
            elif kind is Originate:
                self._originate(action.kind, action.body, "", action.extra, action.ttl)
            elif kind is StoreAction:
                self._store_actions((action,))
            elif kind is ServeSince:
                self._serve_since(action)
            elif kind is PinKey:
                self._pin(action)
            elif kind in _FILE_JOBS:
                self._file_job(action)
            else:
                if kind is Display and self.store is not None:
                    self._save(action.message, action.late, batch.saves if batch is not None else None)
                if batch is not None:
                    batch.events.append(action)
                else:
                    self._on_event(action)

    # -- the store: history, outbox, held messages (its own writer thread does the disk) -------------

    def _save(self, msg: Message, late: bool = False, saves: Optional[list] = None) -> None:
        """History: a message shown or sent (a direct one under its original id, for dedup after a restart).

        ``saves``: collect it there (a drain's batch, queued in one go) instead of queueing it now."""
        assert self.store is not None
        key = direct_key(msg) if msg.dst else msg.mid
        stream = stream_of(msg.mid) if not msg.dst else None
        item = SaveMessage(key, msg.ts, msg.src, msg.dst, msg.kind, msg.body,
                           stream[0] if stream else None, stream[1] if stream else None, late,
                           encode(msg._replace(extra={k: v for k, v in msg.extra.items() if k != "re"})
                                  if "re" in msg.extra else msg))
        if saves is not None:
            saves.append(item)
        else:
            self.store.put(item)

    def _store_actions(self, actions: Iterable[Any]) -> None:
        st = self.store
        if st is None:
            return
        for a in actions:
            item = a.item
            kind = type(item)
            if kind is OutboxPut:
                st.put(OutboxAdd(item.mid, item.dst, item.raw, item.created, item.tries))
            elif kind is OutboxDrop:
                st.put(OutboxRemove(item.mid))
            elif kind is HeldPut:
                st.put(HeldAdd(item.mid, item.dst, item.raw, item.created))
            elif kind is HeldDrop:
                st.put(HeldRemove(item.mid))
            # MetaPut: sequence numbers are reserved by the store itself, before each is used (_reserve)

    def _reserve(self, messages: Iterable[Message]) -> None:
        """Make sure a crash never reuses one of these stream mids: the store reserves them on disk."""
        st = self.store
        if st is None:
            return
        for msg in messages:
            stream = stream_of(msg.mid)
            if stream is not None:
                st.set_highest_seq(stream[1], "broadcast")
            elif msg.dst and "-d" in msg.mid:
                try:
                    st.set_highest_seq(int(msg.mid.rsplit("-d", 1)[1].split("x", 1)[0]), "direct")
                except ValueError:
                    pass

    def _serve_since(self, action: ServeSince) -> None:
        """A neighbour that restarted asks what it missed: from history on disk (read on the store's
        thread, after what is queued is committed: never a disk read on the socket thread), else
        from memory."""
        store = self.store
        if store is None:
            self._serve_rows(action, [])
            return

        def read(_: list) -> None:
            try:
                rows = store.messages_since(action.ts, action.limit)
            except StoreError:  # closed: we are stopping
                rows = []
            self._serve_rows(action, rows)

        store.forward(read, [])

    def _serve_rows(self, action: ServeSince, rows: List[bytes]) -> None:
        with self._lock:
            if not rows:
                rows = self.delivery.recent_since(action.ts, action.limit) if self.delivery else []
            if self.membership is not None:
                # First the last PRESENCE of each node we know (as signed): the asker restarted, and
                # learns the mesh's names and keys now rather than at their next announcements.
                names = [encode(p._replace(ttl=1))
                         for p in self.membership.presences(max(0, action.limit // 2))]
                rows = names + rows[:max(0, action.limit - len(names))]
            if self.delivery is not None:
                self.delivery.serve(action.addr, rows, self._clock())
        self._wake()  # the serving is paced by the delivery layer's timer

    def _beacon(self, data: bytes) -> None:
        assert self._discovery is not None
        if self._seal is not None:
            data = self._seal(data)
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
        batch = _Batch([], []) if self._on_events is not None else None
        try:
            self._drain(sock, batch)
        finally:
            if batch is not None and batch.events:
                self._hand_over(batch)

    def _hand_over(self, batch: "_Batch") -> None:
        """A drain's events for the main thread: at once if none went in the last HAND_OVER_GAP_S,
        else kept with any others that come meanwhile and handed over together when that is up
        (_net_loop): a stream of messages one at a time costs the main thread a wake-up per few
        milliseconds, not one per message, and a lone message is not delayed."""
        held = self._held
        if held is not None:
            held.saves.extend(batch.saves)
            held.events.extend(batch.events)
            return
        now = self._clock()
        if now - self._handed_at < HAND_OVER_GAP_S:
            self._held, self._held_due = batch, self._handed_at + HAND_OVER_GAP_S
            return
        self._handed_at = now
        self._give(batch)

    def _release_held(self) -> None:
        batch, self._held = self._held, None
        self._handed_at = self._clock()
        if batch is not None:
            self._give(batch)

    def _give(self, batch: "_Batch") -> None:
        """Messages saved and events shown, each in one go: the store's writer wakes once, commits,
        and hands the events on (shown means in history, and nobody waits)."""
        assert self._on_events is not None
        if self.store is not None:
            self.store.put_many(batch.saves, self._on_events, batch.events)
        else:
            self._on_events(batch.events)

    def _drain(self, sock: Any, batch: "Optional[_Batch]") -> None:
        recvfrom = (sock or self._io).recvfrom
        relay = self.relay
        lock = self._lock
        clock, wall = self._clock, self._wall
        send = self._send
        # After the first datagram, whether another is waiting: asking a selector that watches only
        # this socket costs less than the recvfrom that fails (an exception), and one datagram per
        # wake-up is the usual case for chat. From the second on, read until the socket is empty.
        more = self._more.select if sock is None else None
        for i in range(DRAIN_BATCH):
            if i == 1 and more is not None and not more(0):
                return
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
                    if type(action) is Send:  # most actions: the copies, sent without _act's dispatch
                        send(action)
                    else:
                        self._act((action,), batch)
                except Exception as e:  # counted as handled: the relay did decide; the rest still go
                    self._log_internal(data, e, "handled, but handing on one of its actions failed")
            if self.private is not None and self.private.released:  # read without the lock: a flag
                self.private.released = False
                if self.files is not None:
                    self._file_offers_due()
                self._key_came.set()

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
                now = self._clock()
                notices = self.relay.expire(now)
                actions = self.relay.housekeep(now, self._wall())
            for notice in notices:
                self._on_event(notice)
            self._act(actions)

    def _send(self, send: Send) -> None:
        sendto = self._io.sendto
        data = send.data if self._seal is None else self._seal(send.data)  # one seal for all its copies
        bulk = self._bulk_to
        link = self._file_link.match(send.data) if bulk else None
        if link is not None and link.group(1) == b"GET":  # on the main socket; the pieces should come back
            self._bulk_asked_for(send)                      # to our bulk socket
            link = None
        for addr in send.addrs:
            try:
                if link is not None and addr in bulk:  # a piece, to a neighbour with a bulk socket
                    self._bulk_sock.sendto(data, bulk[addr])  # type: ignore[union-attr]
                    self.bulk_counts["bulk_sent"] += 1
                    continue
                sendto(data, addr)
            except OSError as e:
                # One unreachable or slow peer must not stop the others.
                log.debug("send to %s:%s failed: %s", addr[0], addr[1], e)
                with self._lock:
                    self.relay.counters.send_errors += 1

    # -- the bulk socket: file pieces in a kernel queue of their own, so chat never waits behind them --------

    def _bulk_setup(self, files: Optional[FileSharing]) -> None:
        """With file sharing: a second socket (same host, an ephemeral port) for the pieces (FDATA),
        announced in our full HELLOs (``fport``). FGET and FHAVE are few and small: they stay on the main
        socket, which also lets an asker notice pieces that never reach its bulk socket. If it cannot be
        opened, everything goes on the main socket, as with an older neighbour."""
        self._bulk_sock: Optional[socket.socket] = None
        self._bulk_to: Dict[Addr, Addr] = {}  # a neighbour's main address -> its bulk address
        self._bulk_from: Dict[Addr, Addr] = {}  # and back: whom a datagram on our bulk socket is from
        self._bulk_version = -1
        self._bulk_asked: Dict[Addr, float] = {}  # neighbour -> when we first asked its bulk socket for pieces
        self._bulk_proved: Set[Addr] = set()  # neighbours whose pieces came to our bulk socket
        self.bulk_proof_s = BULK_PROOF_S
        self.bulk_counts = {"bulk_sent": 0, "bulk_received": 0, "bulk_dropped_stranger": 0}
        # Our own FDATA and FGET, as files.py encodes them (one hop, from us, to nobody in particular).
        self._file_link = re.compile(rb'\{"mid":"[^"\\]{1,64}","ts":[-+.0-9eE]{1,40},"ttl":1,"kind":"F(GET|DATA)",'
                                     rb'"src":"%s","dst":""' % re.escape(self.label.encode("utf-8")))
        if files is None or not files.bulk or self.membership is None or self.files is None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.addr[0], 0))
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_WANTED_BYTES)
            _quiet_windows_resets(sock)
        except OSError as e:
            sock.close()
            log.warning("no bulk socket (%s): file transfers share the chat socket", e)
            return
        self._bulk_sock = sock
        self.bulk_addr: Addr = (self.addr[0], sock.getsockname()[1])
        self.membership.config = replace(self.membership.config, fport=self.bulk_addr[1])
        self._selector.register(sock, selectors.EVENT_READ, self._bulk_ready)

    def _bulk_asked_for(self, send: Send) -> None:
        """An FGET (for pieces, not for an offer) to neighbours with a bulk socket: their pieces should
        come to ours; if none does within ``bulk_proof_s``, _bulk_check gives their bulk socket up."""
        if b'"offer":true' in send.data:
            return
        for addr in send.addrs:
            if addr in self._bulk_to and addr not in self._bulk_proved:
                self._bulk_asked.setdefault(addr, self._clock())

    def _bulk_check(self, now: float) -> None:
        """Under the lock, on every wake-up: the maps follow membership, and a neighbour we asked for
        pieces that sent none to our bulk socket for ``bulk_proof_s`` is given up (both sides go back to
        the main sockets: membership.give_up_bulk)."""
        m = self.membership
        assert m is not None
        for addr, asked in list(self._bulk_asked.items()):
            if addr in self._bulk_proved or addr not in self._bulk_to:
                del self._bulk_asked[addr]
            elif now - asked >= self.bulk_proof_s:
                del self._bulk_asked[addr]
                if m.give_up_bulk(addr, now):
                    log.info("nothing from %s:%s's bulk socket: its files go on its main address", *addr)
        if m.version != self._bulk_version:
            self._bulk_maps()

    def _bulk_maps(self) -> None:
        """Under the lock, when membership changed: where our neighbours' bulk sockets are. A bulk address
        two neighbours claim, or that is some neighbour's main address, is nobody's (a neighbour must not
        pass its datagrams off as another's)."""
        m = self.membership
        assert m is not None
        claims: Dict[Addr, List[Addr]] = {}
        for addr, port in m.bulk_ports().items():
            claims.setdefault((addr[0], port), []).append(addr)
        to = {mains[0]: b for b, mains in claims.items() if len(mains) == 1 and b not in m.neighbours}
        self._bulk_to = to
        self._bulk_from = {b: a for a, b in to.items()}
        self._bulk_proved &= set(to)  # bounded by the neighbours
        self._bulk_version = m.version

    def _bulk_ready(self) -> None:
        serve_bulk(lambda: bool(self._more.select(0)), self._datagrams_ready, self._drain_bulk)

    def _drain_bulk(self, limit: int) -> int:
        """Up to ``limit`` datagrams off the bulk socket; how many (fewer: it is empty). Each is taken only
        from a neighbour's announced bulk address, and handed to the relay as from its main address."""
        assert self._bulk_sock is not None
        recvfrom = self._bulk_sock.recvfrom
        relay, lock, clock, wall = self.relay, self._lock, self._clock, self._wall
        counts = self.bulk_counts
        batch = _Batch([], []) if self._on_events is not None else None
        n = 0
        try:
            while n < limit:
                try:
                    data, src = recvfrom(RECV_BUFFER_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # Windows reports an ICMP error from an earlier send here
                    log.debug("bulk recvfrom failed: %s", e)
                    with lock:
                        relay.counters.recv_errors += 1
                    n += 1
                    continue
                n += 1
                addr = self._bulk_from.get(src)
                if addr is None:
                    counts["bulk_dropped_stranger"] += 1
                    continue
                counts["bulk_received"] += 1
                failed = None
                with lock:
                    before = _counts(relay.counters)
                    try:
                        actions = relay.bulk_received(data, addr, clock(), wall())
                        if relay.bulk_kind == "FDATA" and addr not in self._bulk_proved:
                            self._bulk_proved.add(addr)  # a piece came back: its bulk path works both ways
                    except Exception as e:  # one datagram must never stop the socket thread
                        self._count_internal_drop(before)
                        failed = e
                if failed is not None:
                    self._log_internal(data, failed, "dropped")
                    continue
                try:
                    self._act(actions, batch)
                except Exception as e:  # counted as handled: the relay did decide
                    self._log_internal(data, e, "handled, but handing on one of its actions failed")
        finally:
            if batch is not None and batch.events:
                self._hand_over(batch)
        return n

    # -- the caller's side -------------------------------------------------------

    def say(self, body: str, dst: str = "", plain: bool = False) -> List[Message]:
        """Send a CHAT; returns the messages it became (more than one if it was long), as written.

        A direct one is sealed end to end when this node can (``encrypts``), unless ``plain``."""
        return self._originate("CHAT", body, dst, plain=plain)

    def wait_for_keys(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until no message of ours waits for a key; False if some still do.

        For the end of piped input: a private message held for its destination's key goes once the
        key comes, which takes a round trip, not a restart."""
        if self.private is None:
            return True
        deadline = self._clock() + timeout_s
        while True:
            with self._lock:
                if not self.private.waiting:
                    return True
                self._key_came.clear()
            left = deadline - self._clock()
            if left <= 0 or self._stopping.is_set():
                return False
            self._key_came.wait(left)

    @property
    def encrypts(self) -> bool:
        """Whether our direct messages are sealed end to end (or held until they can be)."""
        return self.private is not None

    def ping(self, dst: str = "") -> List[Message]:
        if not dst:
            self.last_roll_call = self._clock()
        return self._originate("PING", "", dst)

    def _originate(self, kind: str, body: str, dst: str, extra: Optional[dict] = None, ttl: int = 0,
                   plain: bool = False) -> List[Message]:
        with self._lock:
            messages, actions = self.relay.originate(kind, body, dst, self._clock(), self._wall(), extra, ttl,
                                                     **({"plain": True} if plain else {}))
        if kind == "CHAT" and self.store is not None:
            self._reserve(messages)
            for msg in messages:
                self._save(msg)
        self._act(actions)
        if self.delivery is not None:
            self._wake()  # a retry timer may now be the earliest
        return messages

    def history(self, count: int) -> List[dict]:
        """The last ``count`` messages shown or sent, oldest first (empty without history)."""
        if self.store is None:
            return []
        self.store.flush(1.0)
        return self.store.last_messages(count)

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
        """/peers: membership's view of each neighbour, with the trace's counters when tracing is on."""
        if self.membership is None:
            return []
        with self._lock:
            t = self.relay.trace
            rows = t.neighbour_rows(self._clock()) if t is not None else self.membership.peer_rows(self._clock())
            for row in rows:
                if not row["nick"]:  # one that said goodbye, or one gone: the nick the mesh knew it by
                    row["nick"] = self.membership.nick_of(row["label"])
            return rows

    def why(self, prefix: str) -> Tuple[Optional[dict], str]:
        """/why: this node's record of the message whose id starts with ``prefix`` ("" for the last
        shown), as plain data, or None and why there is none."""
        with self._lock:
            t = self.relay.trace
            if t is None:
                return None, "this node keeps no records: it runs with --no-trace"
            mid, error = t.find(prefix)
            if mid is None:
                return None, error
            m = self.membership

            def name(addr: Addr) -> str:
                n = m.neighbours.get(addr) if m is not None else None
                return n.label if n is not None else f"{addr[0]}:{addr[1]}"

            return t.why(mid, self._clock(), name), ""

    def trace_route(self, dst: str) -> Tuple[Optional[str], str]:
        """/trace: send a TRACE to ``dst``; its id, or None and why it could not go. The result comes
        as a TraceResult event once the target answers (or at the next reaping without it)."""
        with self._lock:
            msg, sends, error = self.relay.trace_route(dst, self._clock(), self._wall())
        self._act(sends)
        return (msg.mid if msg is not None else None), error

    def stats(self) -> dict:
        """The relay's counters, and the capabilities' (membership, delivery, the store) beside them."""
        with self._lock:
            out = self.relay.stats()
            if self.private is not None:
                out.update(self.private.counters)
            m, d = self.membership, self.delivery
            if m is not None:
                out.update(m.counters)
                out["neighbours_up"] = sum(1 for n in m.neighbours.values() if n.up)
            if d is not None:
                ds = d.stats()
                out.update({k: ds[k] for k in DELIVERY_STATS})
                out["outbox"] += ds["trying"]  # waiting for an ack: being tried, or held
                # Named apart from the relay's drops, which add up to what was received.
                out["delivery_malformed"] = sum(v for k, v in ds.items() if k.startswith("dropped_"))
        if self.files is not None:
            with self._lock:
                out.update(self.files.stats())
            out["file_jobs_dropped"] = self.file_disk.dropped if self.file_disk is not None else 0
        if self.store is not None:
            st = self.store.stats()
            out["history_written"], out["history_dropped"] = st["store_written"], st["store_dropped"]
            out["history_commits"] = st["store_commits"]
        out["rcvbuf_bytes"] = self.rcvbuf_bytes
        out.update(self.bulk_counts)
        return out

    def peer_table(self) -> list:
        with self._lock:
            return self.relay.peer_table(self._clock())

    # -- what --metrics and /map read: snapshots under the lock, formatted outside it -----------

    def mesh_map(self) -> dict:
        """The mesh as this node knows it (meshmap.py draws it); without membership, just us."""
        if self.membership is None:
            me = {"label": self.label, "nick": "", "hops": 0, "last_seen_s": 0.0, "state": "you", "via": None,
                  "links": []}
            return {"label": self.label, "nodes": [me], "neighbours": []}
        with self._lock:
            return self.membership.mesh_map(self._clock())

    def metrics_page(self) -> Tuple[str, bytes]:
        """GET /metrics: the counters of /stats and the neighbours' rows, as exposition text."""
        stats = self.stats()
        rows = self.neighbour_rows() if self.membership is not None else [
            {"label": addr, "configured": configured, "last_heard_s": ago}
            for addr, configured, ago in self.peer_table()]
        known = len(self.who()) - 1 if self.membership is not None else None
        assert self.metrics is not None
        text = exposition(stats, rows, self.label, __version__, known, dict(self.metrics.requests))
        return "text/plain; version=0.0.4; charset=utf-8", text.encode("utf-8")

    def map_page(self) -> Tuple[str, bytes]:
        """GET /map.json: what /map draws (scripts/meshmap.py reads it)."""
        return json_page(self.mesh_map())


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
