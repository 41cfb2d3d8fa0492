"""The store: history, outbox, held messages and a few settings on disk.

The only module that touches the disk. One SQLite database (``history.db``,
WAL) per node label, in its own data dir, guarded by an OS lock on
``lock`` so that two processes never share it.

Threads:
- Any thread calls ``put(item)``: it only appends to a queue and never
  blocks, so a slow disk never delays relaying. Past ``queue_max`` items
  waiting, new ones are dropped and counted (``dropped``).
- One writer thread (``meshchat-store``) takes items off the queue and
  commits them in batches (every ``COMMIT_INTERVAL_S`` or
  ``BATCH_MAX_ITEMS``), enforcing the bounds as it writes.
- Reads (``last_messages``, ``messages_since``, ``has_message``, ...) use a
  second connection under their own lock: WAL lets it read beside the
  writer. They see what is committed; ``flush()`` first to read your writes.
- Sequence numbers (``next_seq``) are reserved synchronously in blocks on
  the writer's connection (under its lock), so a restart after a crash
  never reuses one (see ``next_seq``).

Time: ``created`` stamps and expiry use the wall clock (``clock``,
``time.time`` by default) because they must survive a restart; only the
writer's batching uses ``time.monotonic()``.
"""

import errno
import json
import logging
import os
import queue
import re
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "history.db"
LOCK_NAME = "lock"

HISTORY_MAX = 100_000
# When over the bound, delete this share of history_max at once, so that
# trimming costs one DELETE per batch of messages instead of one per message.
HISTORY_TRIM_FRACTION = 0.05
HOLD_S = 24 * 3600.0
PER_DST_MAX = 100
# Held messages come from other nodes (anyone can name any dst), so they are
# also bounded in total; our own outbox is bounded per dst only.
HELD_MAX = 1000
QUEUE_MAX = 10_000
COMMIT_INTERVAL_S = 0.1
BATCH_MAX_ITEMS = 200
# A crash loses at most this many sequence numbers (never reuses one), at the
# cost of one synchronous, fsynced write per block.
SEQ_BLOCK = 100
CLOSE_TIMEOUT_S = 5.0

NODE_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}


class StoreError(Exception):
    """The store cannot be used; the message is one line for the user."""


class SaveMessage(NamedTuple):
    mid: str
    ts: float
    src: str
    dst: str
    kind: str
    body: str
    origin: Optional[str]
    seq: Optional[int]
    late: bool
    raw: Optional[bytes]


class OutboxAdd(NamedTuple):
    """Add or update (``tries``) an undelivered direct message of ours."""

    mid: str
    dst: str
    raw: bytes
    created: float
    tries: int = 1


class OutboxRemove(NamedTuple):
    mid: str


class HeldAdd(NamedTuple):
    """A direct message relayed for someone not heard from lately."""

    mid: str
    dst: str
    raw: bytes
    created: float


class HeldRemove(NamedTuple):
    mid: str


class SetMeta(NamedTuple):
    key: str
    value: str


Item = Union[SaveMessage, OutboxAdd, OutboxRemove, HeldAdd, HeldRemove, SetMeta]


class _Flush(NamedTuple):
    done: threading.Event


class _Forward(NamedTuple):
    """Call ``fn(events)`` once everything queued before it is committed (see ``forward``)."""
    fn: Callable[[List[Any]], None]
    events: List[Any]


class _Many(NamedTuple):
    """Items queued together (one wake-up of the writer), and maybe events to hand on after them."""
    items: List[Any]
    forward: Optional[_Forward]


class _Stop(NamedTuple):
    pass


_STOP = _Stop()

_SCHEMA = (
    """CREATE TABLE messages(
        mid TEXT PRIMARY KEY, ts REAL NOT NULL, src TEXT NOT NULL,
        dst TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
        origin TEXT, seq INTEGER, late INTEGER NOT NULL DEFAULT 0, raw BLOB,
        stored_at INTEGER NOT NULL UNIQUE)""",
    "CREATE INDEX messages_ts ON messages(ts)",
    "CREATE INDEX messages_origin_seq ON messages(origin, seq)",
    """CREATE TABLE outbox(
        mid TEXT PRIMARY KEY, dst TEXT NOT NULL, raw BLOB NOT NULL,
        created REAL NOT NULL, tries INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX outbox_dst ON outbox(dst, created)",
    "CREATE INDEX outbox_created ON outbox(created)",
    """CREATE TABLE held(
        mid TEXT PRIMARY KEY, dst TEXT NOT NULL, raw BLOB NOT NULL,
        created REAL NOT NULL)""",
    "CREATE INDEX held_dst ON held(dst, created)",
    "CREATE INDEX held_created ON held(created)",
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_TABLES = {"messages", "outbox", "held", "meta"}


def safe_label(label: str) -> str:
    """``label`` as one file name on every platform (``127.0.0.1:9001`` -> ``127.0.0.1_9001``)."""
    name = _UNSAFE_CHARS_RE.sub("_", label).rstrip(". ")
    # "." and ".." would name the parent, and Windows refuses device names
    # even with an extension.
    if name in ("", ".", "..") or name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = "_" + name
    return name


def user_data_dir() -> Path:
    """The platform's per-user data directory for meshchat."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "meshchat"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "meshchat"
    # The XDG spec says to ignore a relative value.
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base_path = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base_path / "meshchat"


def data_dir_for(label: str, base: Optional[str] = None) -> Path:
    """The data dir of the node ``label``: a subfolder of ``base`` (--data-dir) or of the user data dir.

    A subfolder even under --data-dir, so that the nodes of a local mesh can
    share one --data-dir.
    """
    root = Path(base).expanduser() if base else user_data_dir()
    return root / safe_label(label)


class _DirLock:
    """An OS lock on one file, held until ``release()`` or the end of the process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock()
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise

    def _lock(self) -> None:
        assert self._fd is not None
        if sys.platform == "win32":
            import msvcrt

            os.lseek(self._fd, 0, os.SEEK_SET)
            msvcrt.locking(self._fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            # flock, not fcntl/lockf: its lock belongs to this open file, so
            # a second open in the same process is refused too.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if sys.platform == "win32":
                import msvcrt

                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
        # Closing releases a flock; the file stays, since deleting it would
        # race with another process that is opening it.
        os.close(fd)


def _is_locked_error(exc: sqlite3.Error) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _nick_in(raw: Any) -> str:
    """The nick a stored datagram carried ("" if none, or not readable): history names its sender by
    it when the mesh does not know the sender yet (just after a start)."""
    try:
        nick = json.loads(raw).get("nick") if raw else None
    except (ValueError, TypeError, AttributeError, RecursionError):
        return ""
    return nick if isinstance(nick, str) and len(nick) <= 64 else ""


class Store:
    """History, outbox, held messages and settings of one node, in one data dir."""

    def __init__(self) -> None:
        raise TypeError("use Store.open(dir)")

    @classmethod
    def open(
        cls,
        directory: Union[str, Path],
        history_max: int = HISTORY_MAX,
        hold_s: float = HOLD_S,
        per_dst_max: int = PER_DST_MAX,
        held_max: int = HELD_MAX,
        queue_max: int = QUEUE_MAX,
        clock: Callable[[], float] = time.time,
    ) -> "Store":
        """Lock ``directory`` and open (or create, or replace if unusable) its database.

        Raises StoreError (one line) when the dir is locked by another
        process or cannot be used at all. Warnings (a database moved aside)
        are in ``store.warnings``, one line each, for the caller to show.
        """
        if history_max <= 0 or per_dst_max <= 0 or held_max <= 0 or queue_max <= 0 or hold_s <= 0:
            raise ValueError("bounds must be positive")
        self = object.__new__(cls)
        self.dir = Path(directory)
        self.history_max = history_max
        self.hold_s = hold_s
        self.per_dst_max = per_dst_max
        self.held_max = held_max
        self.queue_max = queue_max
        self.clock = clock
        self.warnings: List[str] = []
        # Counters, for /stats.
        self.dropped = 0
        self.written = 0
        self.commits = 0  # transactions: what history costs is mostly one of these per batch
        self.write_errors = 0
        self.history_trimmed = 0
        self.outbox_dropped = 0
        self.held_dropped = 0
        self.expired = 0
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._drop_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._seq_lock = threading.Lock()
        self._seq_used: Dict[str, int] = {}
        self._seq_ceiling: Dict[str, int] = {}
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._lock: Optional[_DirLock] = None
        self._db: Optional[sqlite3.Connection] = None
        self._reader: Optional[sqlite3.Connection] = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create data dir {self.dir}: {exc.strerror or exc}") from None
        try:
            self._lock = _DirLock(self.dir / LOCK_NAME)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
                raise StoreError(
                    f"data dir {self.dir} is in use by another meshchat process; use --data-dir or --no-history"
                ) from None
            raise StoreError(f"cannot lock data dir {self.dir}: {exc.strerror or exc}") from None
        try:
            self._open_db()
        except BaseException:
            self._close_connections()
            self._lock.release()
            raise
        return self

    # Opening

    @property
    def db_path(self) -> Path:
        return self.dir / DB_NAME

    def _connect(self) -> sqlite3.Connection:
        # Autocommit (isolation_level=None): transactions are explicit, so a
        # batch is exactly one BEGIN ... COMMIT.
        return sqlite3.connect(str(self.db_path), timeout=5.0, isolation_level=None, check_same_thread=False)

    def _open_db(self) -> None:
        try:
            problem = self._try_open()
        except sqlite3.Error as exc:
            if _is_locked_error(exc):
                raise StoreError(f"{self.db_path} is locked by another program") from None
            problem = f"unreadable ({exc})"
        if problem is not None:
            self._close_connections()
            self._move_aside(problem)
            try:
                problem = self._try_open()
            except sqlite3.Error as exc:
                problem = str(exc)
            if problem is not None:
                raise StoreError(f"cannot create {self.db_path}: {problem}")
        try:
            self._after_open()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use {self.db_path}: {exc}") from None

    def _try_open(self) -> Optional[str]:
        """Open and check the database; None if usable, else why not."""
        db = self._db = self._connect()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables:
            self._create_schema(db)
        elif version != SCHEMA_VERSION or not _TABLES <= tables:
            return f"schema version {version}, expected {SCHEMA_VERSION}"
        check = db.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            first = " ".join(str(check[0][0]).split())[:120]  # one line, whatever SQLite says
            return f"damaged (integrity check: {first})"
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            # E.g. some network file systems: still correct, only slower.
            log.warning("%s: journal mode %s, not WAL", self.db_path, mode)
        db.execute("PRAGMA synchronous=NORMAL")
        self._reader = self._connect()
        self._reader.execute("PRAGMA query_only=1")
        return None

    def _create_schema(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")

    def _move_aside(self, problem: str) -> None:
        stamp = int(self.clock())
        target = self.dir / f"{DB_NAME}.corrupt-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.dir / f"{DB_NAME}.corrupt-{stamp}.{n}"
        try:
            os.replace(self.db_path, target)
            # A stale WAL would be replayed into the fresh database: it goes
            # along, under names SQLite pairs with the moved copy.
            for suffix in ("-wal", "-shm"):
                side = self.dir / (DB_NAME + suffix)
                if side.exists():
                    os.replace(side, self.dir / (target.name + suffix))
        except OSError as exc:
            raise StoreError(f"{self.db_path} is {problem} and cannot be moved aside: {exc.strerror or exc}") from None
        # Said once, by whoever opened the store (the CLI prints its warnings), not logged as well.
        self.warnings.append(f"{self.db_path} was {problem}: moved aside to {target.name}, starting a new history")

    def _after_open(self) -> None:
        db = self._db
        assert db is not None
        node_id = self._meta_now("node_id")
        if node_id is None or not NODE_ID_RE.match(node_id):
            node_id = secrets.token_hex(8)
            self._set_meta_now("node_id", node_id)
        self._node_id = node_id
        self._message_count = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self._next_order = (db.execute("SELECT MAX(stored_at) FROM messages").fetchone()[0] or 0) + 1
        db.execute("BEGIN IMMEDIATE")
        self._trim_history(db)
        self._expire(db)
        db.execute("COMMIT")

    def _meta_now(self, key: str) -> Optional[str]:
        assert self._db is not None
        with self._write_lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta_now(self, key: str, value: str) -> None:
        """Write one setting durably (fsynced) before returning."""
        assert self._db is not None
        with self._write_lock:
            db = self._db
            db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
            finally:
                db.execute("PRAGMA synchronous=NORMAL")

    # The writer

    def start(self) -> None:
        """Start the writer thread (once)."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(target=self._run, name="meshchat-store", daemon=True)
        self._thread.start()

    def put(self, item: Item) -> bool:
        """Queue ``item`` for the writer; never blocks. False if dropped (queue full or closed)."""
        if type(item) not in self._HANDLERS:
            raise TypeError(f"not a store item: {item!r}")
        if self._closed:
            return False
        # SimpleQueue has no bound of its own, so control items always fit;
        # concurrent putters can overshoot the bound by one each, harmlessly.
        if self._queue.qsize() >= self.queue_max:
            with self._drop_lock:
                self.dropped += 1
            return False
        self._queue.put(item)
        return True

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        if self._closed:
            return True
        if not self._writer_alive():
            self._drain_inline()
            return True
        done = threading.Event()
        self._queue.put(_Flush(done))
        return done.wait(timeout_s)

    def forward(self, fn: Callable[[List[Any]], None], events: List[Any]) -> None:
        """``fn(events)``, on the writer thread, once what was queued before is committed."""
        self.put_many([], fn, events)

    def put_many(self, items: List[Item], fn: Optional[Callable[[List[Any]], None]] = None,
                 events: Optional[List[Any]] = None) -> None:
        """``items`` in one go (the writer wakes once for them all), then ``fn(events)`` on the
        writer thread once they are committed.

        How the node saves and shows what one drain of its socket gave: a message is shown only
        once it is in history (so a restart never shows it again), and the main thread never
        waits for a commit. Never blocks. Past the queue's bound the items are dropped (counted)
        but the events still go on: history falling behind must not hide the conversation.
        Without a writer, or once closed, everything happens at once on the calling thread."""
        for item in items:
            if type(item) not in self._HANDLERS:
                raise TypeError(f"not a store item: {item!r}")
        forward = _Forward(fn, events if events is not None else []) if fn is not None else None
        if items and self._queue.qsize() >= self.queue_max:
            with self._drop_lock:
                self.dropped += len(items)
            items = []
        if self._closed or not self._writer_alive():
            if not self._closed:
                for item in items:
                    self._queue.put(item)
                self._drain_inline()
            if forward is not None:
                self._call_forward(forward)
            return
        self._queue.put(_Many(items, forward))

    def _writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _drain_inline(self) -> None:
        """Write what is queued from the calling thread (no writer thread running)."""
        batch: List[Any] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Flush):
                item.done.set()
            elif isinstance(item, _Many):
                batch.extend(item.items)
                if item.forward is not None:
                    if batch:
                        self._write_batch(batch)
                        batch = []
                    self._call_forward(item.forward)
            elif not isinstance(item, _Stop):
                batch.append(item)
            if len(batch) >= BATCH_MAX_ITEMS:
                self._write_batch(batch)
                batch = []
        if batch:
            self._write_batch(batch)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            # A bug must stop the writer loudly, not leave it half-alive;
            # put() keeps working and drops once the queue is full.
            log.exception("store writer crashed; history is no longer written")

    def _loop(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            batch: List[Any] = []
            waiting: List[threading.Event] = []
            forwards: List[_Forward] = []
            stop = False
            deadline = time.monotonic() + COMMIT_INTERVAL_S
            while True:
                kind = type(item)
                if kind is _Stop:
                    stop = True
                    break
                if kind is _Flush:
                    waiting.append(item.done)
                    break
                if kind is _Many:
                    batch.extend(item.items)
                    if item.forward is not None:
                        forwards.append(item.forward)
                else:
                    batch.append(item)
                if len(batch) >= BATCH_MAX_ITEMS:
                    break
                if forwards and q.empty():
                    break  # someone waits for this commit: now (what is queued already goes along)
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                try:
                    item = q.get(timeout=remaining_s)
                except queue.Empty:
                    break
            if batch:
                self._write_batch(batch)
            for done in waiting:
                done.set()
            for f in forwards:
                self._call_forward(f)
            if stop:
                return

    @staticmethod
    def _call_forward(f: _Forward) -> None:
        try:
            f.fn(f.events)
        except Exception:  # the receiver's bug must not stop the writer
            log.exception("store: handing on %d events failed", len(f.events))

    _HANDLERS: Dict[type, str] = {
        SaveMessage: "_save_message",
        OutboxAdd: "_outbox_add",
        OutboxRemove: "_outbox_remove",
        HeldAdd: "_held_add",
        HeldRemove: "_held_remove",
        SetMeta: "_set_meta",
    }

    def _write_batch(self, batch: List[Any]) -> None:
        with self._write_lock:
            db = self._db
            assert db is not None
            try:
                self._apply(db, batch)
                return
            except sqlite3.Error as exc:
                self._rollback(db)
                log.warning("store: batch of %d not written (%s); retrying one by one", len(batch), exc)
            # One bad item must not cost the others: write them one by one.
            for item in batch:
                try:
                    self._apply(db, [item])
                except sqlite3.Error as exc:
                    self._rollback(db)
                    self.write_errors += 1
                    log.warning("store: %s not written: %s", type(item).__name__, exc)

    def _apply(self, db: sqlite3.Connection, batch: List[Any]) -> None:
        count, order = self._message_count, self._next_order
        try:
            db.execute("BEGIN IMMEDIATE")
            touched_holds = False
            run: List[SaveMessage] = []  # messages in a row go in one executemany: the common case
            for item in batch:
                if type(item) is SaveMessage:
                    run.append(item)
                    continue
                if run:
                    self._save_messages(db, run)
                    run = []
                getattr(self, self._HANDLERS[type(item)])(db, item)
                touched_holds = touched_holds or isinstance(item, (OutboxAdd, HeldAdd))
            if run:
                self._save_messages(db, run)
            self._trim_history(db)
            if touched_holds:
                self._expire(db)
            db.execute("COMMIT")
            self.commits += 1
        except BaseException:
            self._message_count, self._next_order = count, order
            raise
        self.written += len(batch)

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _save_messages(self, db: sqlite3.Connection, run: List[SaveMessage]) -> None:
        if len(run) == 1:
            self._save_message(db, run[0])
            return
        first = self._next_order
        cursor = db.executemany(
            "INSERT OR IGNORE INTO messages(mid, ts, src, dst, kind, body, origin, seq, late, raw, stored_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(m.mid, m.ts, m.src, m.dst, m.kind, m.body, m.origin, m.seq, int(bool(m.late)), m.raw, first + i)
             for i, m in enumerate(run)],
        )
        added = max(cursor.rowcount, 0)
        self._message_count += added
        self._next_order = first + len(run)  # a duplicate leaves a gap in the order: harmless

    def _save_message(self, db: sqlite3.Connection, m: SaveMessage) -> None:
        cursor = db.execute(
            "INSERT OR IGNORE INTO messages(mid, ts, src, dst, kind, body, origin, seq, late, raw, stored_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.mid, m.ts, m.src, m.dst, m.kind, m.body, m.origin, m.seq, int(bool(m.late)), m.raw, self._next_order),
        )
        if cursor.rowcount == 1:
            self._message_count += 1
            self._next_order += 1

    def _trim_history(self, db: sqlite3.Connection) -> None:
        if self._message_count <= self.history_max:
            return
        excess = self._message_count - self.history_max + max(1, int(self.history_max * HISTORY_TRIM_FRACTION))
        excess = min(excess, self._message_count)
        cursor = db.execute(
            "DELETE FROM messages WHERE stored_at <="
            " (SELECT stored_at FROM messages ORDER BY stored_at LIMIT 1 OFFSET ?)",
            (excess - 1,),
        )
        self._message_count -= cursor.rowcount
        self.history_trimmed += cursor.rowcount

    def _outbox_add(self, db: sqlite3.Connection, m: OutboxAdd) -> None:
        db.execute(
            "INSERT INTO outbox(mid, dst, raw, created, tries) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(mid) DO UPDATE SET tries = excluded.tries",
            (m.mid, m.dst, m.raw, m.created, m.tries),
        )
        self.outbox_dropped += self._bound_dst(db, "outbox", m.dst)

    def _outbox_remove(self, db: sqlite3.Connection, m: OutboxRemove) -> None:
        db.execute("DELETE FROM outbox WHERE mid = ?", (m.mid,))

    def _held_add(self, db: sqlite3.Connection, m: HeldAdd) -> None:
        db.execute(
            "INSERT OR IGNORE INTO held(mid, dst, raw, created) VALUES (?, ?, ?, ?)", (m.mid, m.dst, m.raw, m.created)
        )
        dropped = self._bound_dst(db, "held", m.dst)
        cursor = db.execute(
            "DELETE FROM held WHERE rowid IN"
            " (SELECT rowid FROM held ORDER BY created DESC, rowid DESC LIMIT -1 OFFSET ?)",
            (self.held_max,),
        )
        self.held_dropped += dropped + cursor.rowcount

    def _held_remove(self, db: sqlite3.Connection, m: HeldRemove) -> None:
        db.execute("DELETE FROM held WHERE mid = ?", (m.mid,))

    def _set_meta(self, db: sqlite3.Connection, m: SetMeta) -> None:
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (m.key, m.value))

    def _bound_dst(self, db: sqlite3.Connection, table: str, dst: str) -> int:
        """Keep the newest ``per_dst_max`` of ``dst`` in ``table``; the number dropped."""
        cursor = db.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE dst = ?"
            " ORDER BY created DESC, rowid DESC LIMIT -1 OFFSET ?)",
            (dst, self.per_dst_max),
        )
        return cursor.rowcount

    def _expire(self, db: sqlite3.Connection) -> None:
        cutoff = self.clock() - self.hold_s
        for table in ("outbox", "held"):
            self.expired += db.execute(f"DELETE FROM {table} WHERE created < ?", (cutoff,)).rowcount

    # Reads (any thread)

    def _read(self, sql: str, params: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
        if self._reader is None:
            raise StoreError("store is closed")
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def last_messages(self, n: int) -> List[Dict[str, Any]]:
        """The ``n`` newest messages by ``ts``, oldest first (late ones in their place in the conversation)."""
        rows = self._read(
            "SELECT mid, ts, src, dst, kind, body, late, raw FROM messages ORDER BY ts DESC, stored_at DESC LIMIT ?",
            (max(0, n),),
        )
        keys = ("mid", "ts", "src", "dst", "kind", "body", "late", "nick")
        return [dict(zip(keys, row[:6] + (bool(row[6]), _nick_in(row[7])))) for row in reversed(rows)]

    def messages_since(self, ts: float, limit: int) -> List[bytes]:
        """Raw datagrams of the broadcasts newer than ``ts``, oldest first, at most ``limit``.

        Oldest first, so an asker that got ``limit`` can ask again from the
        last ``ts`` it received.
        """
        try:
            rows = self._read(
                "SELECT raw FROM messages WHERE dst = '' AND ts > ? AND raw IS NOT NULL ORDER BY ts, stored_at LIMIT ?",
                (ts, max(0, limit)),
            )
        except sqlite3.Error as e:  # a catch-up answered from memory instead, not a crash of the thread
            log.warning("history could not be read for a catch-up: %s", e)
            return []
        return [bytes(row[0]) for row in rows]

    def last_ts(self) -> Optional[float]:
        """The ``ts`` of the newest stored message (what to ask SINCE after a restart)."""
        return self._read("SELECT MAX(ts) FROM messages")[0][0]

    def highest_seqs(self, origins_max: int = 32) -> Dict[str, int]:
        """Per origin, the highest seq in history, for the ``origins_max`` most recently stored origins."""
        rows = self._read(
            "SELECT origin, MAX(seq) FROM messages WHERE origin IS NOT NULL AND seq IS NOT NULL"
            " GROUP BY origin ORDER BY MAX(stored_at) DESC LIMIT ?",
            (max(0, origins_max),),
        )
        return {origin: seq for origin, seq in rows}

    def has_message(self, mid: str) -> bool:
        return bool(self._read("SELECT 1 FROM messages WHERE mid = ?", (mid,)))

    def outbox(self) -> List[Tuple[str, str, bytes, float, int]]:
        """Undelivered direct messages of ours not yet expired: (mid, dst, raw, created, tries), oldest first."""
        rows = self._read(
            "SELECT mid, dst, raw, created, tries FROM outbox WHERE created >= ? ORDER BY created, rowid",
            (self.clock() - self.hold_s,),
        )
        return [(mid, dst, bytes(raw), created, tries) for mid, dst, raw, created, tries in rows]

    def held(self) -> List[Tuple[str, str, bytes, float]]:
        """Held messages for others not yet expired: (mid, dst, raw, created), oldest first."""
        rows = self._read(
            "SELECT mid, dst, raw, created FROM held WHERE created >= ? ORDER BY created, rowid",
            (self.clock() - self.hold_s,),
        )
        return [(mid, dst, bytes(raw), created) for mid, dst, raw, created in rows]

    def meta(self, key: str) -> Optional[str]:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def pins(self, limit: int = 4096) -> Dict[str, str]:
        """Pinned keys (trust.py), kept as ``pin:<label>`` in meta: {label: key text}, at most ``limit``."""
        rows = self._read("SELECT key, value FROM meta WHERE key LIKE 'pin:%' ORDER BY rowid LIMIT ?", (limit,))
        return {key[4:]: value for key, value in rows}

    def node_id(self) -> str:
        """This node's stable id: 16 lowercase hex chars, created once."""
        return self._node_id

    # Sequence numbers

    def _seq_key(self, stream: str) -> str:
        return f"seq_ceiling.{stream}"

    def _load_seq(self, stream: str) -> None:
        if stream not in self._seq_ceiling:
            value = self._meta_now(self._seq_key(stream))
            ceiling = int(value) if value and value.isdigit() else 0
            # Any seq up to the reserved ceiling may have gone out before a
            # crash, so all of them count as used.
            self._seq_ceiling[stream] = ceiling
            self._seq_used[stream] = ceiling

    def highest_seq(self, stream: str = "broadcast") -> int:
        """The highest seq of ``stream`` used so far (0 if none), across restarts."""
        with self._seq_lock:
            self._load_seq(stream)
            return self._seq_used[stream]

    def set_highest_seq(self, n: int, stream: str = "broadcast") -> None:
        """Record that seq ``n`` of ``stream`` is used; call BEFORE sending it.

        Returns once ``n`` is covered by a reservation on disk (fsynced):
        crossing the reserved ceiling reserves the next ``SEQ_BLOCK``, so
        only one call in SEQ_BLOCK waits for the disk. Never goes down.
        """
        with self._seq_lock:
            self._load_seq(stream)
            if n <= self._seq_used[stream]:
                return
            if n > self._seq_ceiling[stream]:
                ceiling = n + SEQ_BLOCK - 1
                self._set_meta_now(self._seq_key(stream), str(ceiling))
                self._seq_ceiling[stream] = ceiling
            self._seq_used[stream] = n

    def next_seq(self, stream: str = "broadcast") -> int:
        """The next unused seq of ``stream`` (1, 2, ...), reserved on disk before it is returned."""
        with self._seq_lock:
            self._load_seq(stream)
            n = self._seq_used[stream] + 1
        self.set_highest_seq(n, stream)
        return n

    # Closing

    def stats(self) -> Dict[str, int]:
        return {
            "store_queued": self._queue.qsize(),
            "store_dropped": self.dropped,
            "store_written": self.written,
            "store_commits": self.commits,
            "store_write_errors": self.write_errors,
            "history_trimmed": self.history_trimmed,
            "outbox_dropped": self.outbox_dropped,
            "held_dropped": self.held_dropped,
            "hold_expired": self.expired,
        }

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, stop the writer, release the dir. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout_s)
            if thread.is_alive():
                # Closing the connection under a writer stuck on the disk is
                # unsafe; the process exit ends both (the thread is a daemon).
                log.warning("store: thread %s did not stop within %.1f s; queued items may be lost",
                            thread.name, timeout_s)
                return
        try:
            self._drain_inline()
            # A clean stop: the next run continues right after the last seq
            # used instead of skipping the rest of the reserved block.
            with self._seq_lock:
                for stream, used in self._seq_used.items():
                    if used < self._seq_ceiling[stream]:
                        self._set_meta_now(self._seq_key(stream), str(used))
        except sqlite3.Error as exc:
            log.warning("store: not all written on close: %s", exc)
        finally:
            self._close_connections()
            if self._lock is not None:
                self._lock.release()

    def _close_connections(self) -> None:
        for name, lock in (("_reader", self._read_lock), ("_db", self._write_lock)):
            with lock:
                conn = getattr(self, name)
                setattr(self, name, None)
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
