"""The files thread: every disk operation of file sharing, off the socket thread.

``meshchat-files`` takes jobs from a bounded queue: hash a file we offer, read a chunk to serve,
write a verified chunk, keep an offer's metadata, check a finished download whole and rename it
into place, remove what a cancelled one left, and at start find the downloads a restart cut short.
Why a thread of its own rather than the store's writer: the store's is SQLite's one writer, batched
for commits; these are plain file reads and writes, some large (hashing a file), which must not
hold up history. Why bounded: a neighbour's requests must not grow memory; a read dropped because
the queue is full is asked for again (the requester times out), a write dropped fails its transfer.

What it finds goes back through ``Callbacks`` (the node, which takes its lock and calls files.py).
"""

import hashlib
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from . import crypto
from .files import CHUNK_BYTES, HASH_BYTES, SEALED_CHUNK_BYTES, Offer, numbered, safe_name

log = logging.getLogger(__name__)

QUEUE_ITEMS = 4096
PARTIAL_DIR = ".meshchat-partial"  # inside the downloads folder: temporary files and their metadata
DONE_FILE = "done"  # in PARTIAL_DIR: the ids of files finished, a line each, so a restart never fetches them again
DONE_KEEP = 1000  # the newest this many are kept (files.MAX_DONE)
MAX_NUMBERED = 1000  # "name (1000).ext" at most, then a unique id


class Callbacks(NamedTuple):
    hashed: Callable[[Offer, bytes, str], None]  # offer, hash list, path
    hash_failed: Callable[[str, str], None]  # path, why
    read: Callable[[str, int, bytes, tuple], None]  # fid, index, data, addr
    write_failed: Callable[[str, int, str], None]  # fid, index, why
    finished: Callable[[str, Optional[str], str], None]  # fid, path or None, why
    resumed: Callable[[Offer, Optional[bytes], List[int]], None]


class FileDisk:
    def __init__(self, downloads: str, callbacks: Callbacks) -> None:
        self.downloads = Path(downloads)
        self.partial = self.downloads / PARTIAL_DIR
        self.partial.mkdir(parents=True, exist_ok=True)  # OSError: the caller says it in one line
        self._cb = callbacks
        self._queue: "queue.Queue" = queue.Queue(QUEUE_ITEMS)
        self._stop = threading.Event()
        self._handles: Dict[str, Tuple[object, str]] = {}  # fid -> (open file, its mode): ours or a download
        self._ciphers: Optional[Tuple[str, "crypto.FileCipher"]] = None  # the sealed file last used
        self.dropped = 0

    def used_bytes(self) -> int:
        """What the downloads folder holds (partial downloads count once resumed, by their size)."""
        total = 0
        for folder in (self.downloads,):
            try:
                for entry in os.scandir(folder):
                    if entry.is_file():
                        total += entry.stat().st_size
            except OSError:
                pass
        return total

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def put(self, job: tuple) -> bool:
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def run(self) -> None:
        """The body of ``meshchat-files`` (the node starts it): resume, then jobs until stopped."""
        try:
            self._jobs(("resume",))
            while not self._stop.is_set():
                job = self._queue.get()
                if job is None:
                    break
                self._jobs(job)
        finally:
            for f, _ in self._handles.values():
                try:
                    f.close()  # type: ignore[attr-defined]
                except OSError:
                    pass
            self._handles.clear()

    def _jobs(self, job: tuple) -> None:
        try:
            getattr(self, "_" + job[0])(*job[1:])
        except OSError as e:  # a disk error ends that job, never the thread
            log.warning("files: %s failed: %s", job[0], e)

    # -- jobs ----------------------------------------------------------------------------------------

    def _hash(self, path: str, fid: str, src: str, dst: str, key: str = "", hops: int = 0) -> None:
        # A sealed file (``key``): the hash list is over the sealed chunks, which is what travels and what
        # carriers check; the SHA-256 of the whole stays over the plaintext (it goes inside the box).
        cipher = crypto.FileCipher(bytes.fromhex(key), fid) if key else None
        h = hashlib.sha256()
        hashes = []
        size = 0
        try:
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(SEALED_CHUNK_BYTES if cipher else CHUNK_BYTES)
                    if not chunk:
                        break
                    h.update(chunk)
                    if cipher is not None:
                        chunk = cipher.seal(len(hashes), chunk)
                    size += len(chunk)
                    hashes.append(hashlib.sha256(chunk).digest())
        except OSError as e:
            self._cb.hash_failed(path, e.strerror or str(e))
            return
        if cipher is not None:
            size -= len(hashes) * crypto.FILE_TAG_BYTES
        whole = b"".join(hashes)
        name = os.path.basename(path) or "file"
        offer = Offer(fid, name[:255], size, h.hexdigest(), hashlib.sha256(whole).hexdigest(), CHUNK_BYTES, src, dst,
                      "", hops, key)
        self._cb.hashed(offer, whole, path)

    def _read(self, fid: str, path: str, index: int, addr: tuple, key: str = "") -> None:
        # A download serves what it has from its temporary file, through the handle it writes with.
        # A sealed file held in clear (ours, or one we are the destination of) is sealed again per chunk.
        part = self.partial / f"{fid}.part"
        if not path and fid not in self._handles and not part.exists():
            return  # it finished (or was cancelled) after this was asked: the requester asks again
        f = self._handle(fid, path or str(part), "rb" if path else "r+b")
        size = SEALED_CHUNK_BYTES if key else CHUNK_BYTES
        f.seek(index * size)  # type: ignore[attr-defined]
        data = f.read(size)  # type: ignore[attr-defined]
        if key:
            data = self._cipher(fid, key).seal(index, data)
        self._cb.read(fid, index, data, addr)

    def _write(self, fid: str, index: int, data: bytes, key: str = "") -> None:
        size = CHUNK_BYTES
        if key:  # the destination of a sealed file: its plaintext is what lands on disk
            size = SEALED_CHUNK_BYTES
            opened = self._cipher(fid, key).open(index, data)
            if opened is None:  # it matched the hash list, so its sender sealed it wrong
                self._cb.write_failed(fid, index, "a chunk does not open with the file's key")
                return
            data = opened
        try:
            f = self._handle(fid, str(self.partial / f"{fid}.part"), "r+b")
            f.seek(index * size)  # type: ignore[attr-defined]
            f.write(data)  # type: ignore[attr-defined]
        except OSError as e:
            self._cb.write_failed(fid, index, e.strerror or str(e))

    def _cipher(self, fid: str, key: str) -> "crypto.FileCipher":
        """The chunk cipher of a sealed file, kept for the one file in use (chunks come in runs)."""
        kept = self._ciphers
        if kept is None or kept[0] != fid:
            kept = self._ciphers = (fid, crypto.FileCipher(bytes.fromhex(key), fid))
        return kept[1]

    def _meta(self, offer: Offer, hashes: Optional[bytes]) -> None:
        part = self.partial / f"{offer.fid}.part"
        if not part.exists():
            with open(part, "wb"):
                pass
        meta = dict(offer._asdict(), hashes=hashes.hex() if hashes is not None else None)
        tmp = self.partial / f"{offer.fid}.json.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, self.partial / f"{offer.fid}.json")

    def _finish(self, offer: Offer) -> None:
        self._close(offer.fid)
        part = self.partial / f"{offer.fid}.part"
        h = hashlib.sha256()
        try:
            with open(part, "r+b") as f:
                f.truncate(offer.size)
                f.seek(0)
                for block in iter(lambda: f.read(1 << 16), b""):
                    h.update(block)
        except OSError as e:
            self._cb.finished(offer.fid, None, f"cannot read it back: {e.strerror or e}")
            return
        if h.hexdigest() != offer.sha:
            self._discard(offer.fid)
            self._cb.finished(offer.fid, None, "its SHA-256 differs from the offer's")
            return
        path = self._place(part, safe_name(offer.name), offer.fid)
        try:
            (self.partial / f"{offer.fid}.json").unlink()
        except OSError:
            pass
        self._note_done(offer.fid)
        self._cb.finished(offer.fid, str(path), "")

    def done_fids(self) -> List[str]:
        """The ids of files finished here before (newest last, at most DONE_KEEP): the node hands them to
        files.py, so that an offer seen again after a restart (caught up, or served back) is not fetched."""
        try:
            lines = (self.partial / DONE_FILE).read_text(encoding="ascii", errors="replace").split()
        except OSError:
            return []
        return [fid for fid in lines if len(fid) == 16 and all(c in "0123456789abcdef" for c in fid)][-DONE_KEEP:]

    def _note_done(self, fid: str) -> None:
        path = self.partial / DONE_FILE
        try:
            with open(path, "a", encoding="ascii") as f:
                f.write(fid + "\n")
            if path.stat().st_size > 2 * DONE_KEEP * 17:  # now and then cut back to the newest
                tmp = self.partial / (DONE_FILE + ".tmp")
                tmp.write_text("".join(f + "\n" for f in self.done_fids()), encoding="ascii")
                os.replace(tmp, path)
        except OSError as e:
            log.warning("files: could not note %s as done: %s", fid, e)

    def _place(self, part: Path, name: str, fid: str) -> Path:
        """Rename ``part`` to ``name`` in the downloads folder, never over an existing file."""
        for n in range(MAX_NUMBERED + 1):
            target = self.downloads / (name if n == 0 else numbered(name, n))
            try:
                # os.link fails if the target exists (no overwrite, no race); not every file system has links.
                os.link(part, target)
                part.unlink()
                return target
            except FileExistsError:
                continue
            except OSError:
                if target.exists():
                    continue
                os.rename(part, target)  # Windows refuses to rename over an existing file, as we want
                return target
        target = self.downloads / numbered(name, int(fid[:8], 16))
        os.rename(part, target)
        return target

    def _discard(self, fid: str) -> None:
        self._close(fid)
        for suffix in (".part", ".json"):
            try:
                (self.partial / f"{fid}{suffix}").unlink()
            except FileNotFoundError:
                pass

    def _forget(self, fid: str) -> None:
        self._close(fid)

    def _resume(self) -> None:
        """Downloads a restart cut short: their offer, hash list, and which chunks on disk verify."""
        for meta in sorted(self.partial.glob("*.json")):
            try:
                x = json.loads(meta.read_text(encoding="utf-8"))
                hashes = bytes.fromhex(x.pop("hashes")) if x.get("hashes") else None
                offer = Offer(**x)
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("files: %s unreadable, left alone: %s", meta, e)
                continue
            have: List[int] = []
            if hashes is not None:
                # The destination of a sealed file keeps it in clear: each chunk is sealed again to be
                # checked against the hash list (over what travels). A carrier keeps what travelled.
                cipher = crypto.FileCipher(bytes.fromhex(offer.key), offer.fid) if offer.key else None
                try:
                    with open(self.partial / f"{offer.fid}.part", "rb") as f:
                        for i in range(offer.chunks):
                            chunk = f.read(offer.pcs if offer.key else offer.cs)
                            if not chunk:
                                break
                            if cipher is not None:
                                chunk = cipher.seal(i, chunk)
                            if hashlib.sha256(chunk).digest() == hashes[i * HASH_BYTES:(i + 1) * HASH_BYTES]:
                                have.append(i)
                except (OSError, crypto.CryptoUnavailable):
                    pass
            self._cb.resumed(offer, hashes, have)

    def _handle(self, fid: str, path: str, mode: str) -> object:
        # Kept with the mode it was opened in: a file's own .mode is normalised ("r+b" reads "rb+"), and
        # comparing against it reopened the file for every chunk read or written.
        kept = self._handles.get(fid)
        if kept is not None and kept[1] == mode:
            return kept[0]
        if kept is not None:
            kept[0].close()  # type: ignore[attr-defined]
            del self._handles[fid]
        f = open(path, mode)
        if len(self._handles) >= 64:  # open files: bounded
            old = next(iter(self._handles))
            self._handles.pop(old)[0].close()  # type: ignore[attr-defined]
        self._handles[fid] = (f, mode)
        return f

    def _close(self, fid: str) -> None:
        kept = self._handles.pop(fid, None)
        if kept is not None:
            kept[0].close()  # type: ignore[attr-defined]
