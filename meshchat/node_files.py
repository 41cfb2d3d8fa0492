"""The node's file sharing (a mixin of ``Node``): the files capability set up, /send, /accept and
/cancel, and what the files thread found (it calls these).

Part of node.py's room (the only I/O), kept in a file of its own because it is a job of its own:
it runs on the node's threads (the main thread for the commands, the files thread for its
callbacks) under the node's lock, and acts through the node's sockets and events as node.py does.
The bulk socket that file pieces come in on is node.py's, with the other sockets.
"""

import os
import random
from typing import TYPE_CHECKING, Any, Optional

from . import crypto
from . import files as filesmod
from .filedisk import Callbacks as FileCallbacks, FileDisk
from .membership import display_name
from .private import CAP as PRIVATE_CAP
from .relay import Notice, Send
from .store import data_dir_for
from .wire import Addr

if TYPE_CHECKING:
    from .node import FileSharing, History


class FileSharingIO:
    """/send and its kin, and the files thread's callbacks, for ``Node``."""

    def _files_setup(self, cfg: "FileSharing", history: "Optional[History]") -> None:
        """The files capability and its disk thread; OSError if the downloads folder cannot be made."""
        folder = cfg.downloads
        if folder is None:
            base = self.store.dir if self.store is not None else data_dir_for(
                self.label, history.data_dir if history is not None else None)
            folder = str(base / "downloads")
        self.file_disk = FileDisk(folder, FileCallbacks(
            self._file_hashed, self._file_hash_failed, self._file_read, self._file_write_failed,
            self._file_finished, self._file_resumed))
        m = self.membership
        assert m is not None

        def neighbours() -> list:
            return [n.addr for n in m.neighbours.values() if n.up and filesmod.CAP in n.caps]

        def hops_to(label: str) -> Optional[int]:
            own = m.addr_by_label.get(label)
            if own is not None and m.is_up(own):
                return 1
            member = m.members.get(label)
            return member.hops if member is not None else None

        # Link datagrams' ids (one hop, never flooded) need to be unique, not unpredictable: a seeded
        # generator, since os.urandom per chunk showed in profiles of a transfer.
        mids = random.Random(os.urandom(16))
        self.files = filesmod.Files(
            filesmod.FilesConfig(self.label, cfg.accept_bytes, cfg.quota_bytes, self.file_disk.used_bytes()),
            new_mid=lambda: "%012x" % mids.getrandbits(48), neighbours=neighbours,
            open_box=self.identity.box.open if self.identity is not None else None, hops_to=hops_to)
        self.files.remember_done(self.file_disk.done_fids())

    # -- file sharing: commands, and what the files thread found (it calls these) ----------------------

    def send_file(self, path: str, dst: str = "", plain: bool = False) -> str:
        """/send: "" once the file is being hashed (its offer goes when that is done), else why not.
        To one node (``dst``, a label) it is sealed end to end when this node can (``encrypts``), unless
        ``plain`` (files.py rule 6)."""
        if self.files is None or self.file_disk is None:
            return "file sharing is off on this node"
        if dst == self.label:
            return "that is this node: a file to yourself goes nowhere"
        path = os.path.expanduser(path)  # ~/Pictures/cat.jpg, as a shell would take it
        try:
            with open(path, "rb"):
                pass
            if not os.path.isfile(path):
                return f"{path}: not a file"
            size = os.path.getsize(path)
        except OSError as e:
            return f"{path}: {e.strerror or e}"
        if size > filesmod.MAX_FILE_BYTES:
            return f"{path}: {size} bytes, over the {filesmod.MAX_FILE_BYTES} bytes a file may have"
        key = crypto.new_file_key().hex() if dst and self.private is not None and not plain else ""
        hops = 0
        if dst and self.membership is not None:
            with self._lock:
                m = self.membership
                caps, own = m.caps_of(dst), m.neighbours.get(m.addr_by_label.get(dst))  # type: ignore[arg-type]
                if (caps is not None and filesmod.CAP not in caps) or (own is not None and not own.speaks):
                    return (f"{display_name(dst, m.nick_of(dst))} does not take files (a seed-design node, "
                            f"or one with --no-files): nothing was sent")
                member = m.members.get(dst)
                hops = (member.hops or 0) if member is not None else 0
                if self.membership.addr_by_label.get(dst) is not None:
                    hops = 1
        if not self.file_disk.put(("hash", path, os.urandom(8).hex(), self.label, dst, key,
                                   min(hops, filesmod.MAX_HOPS))):
            return "the files thread is busy: try again in a moment"
        return ""

    def file_rows(self) -> list:
        if self.files is None:
            return []
        with self._lock:
            return self.files.rows(self._clock())

    def accept_file(self, fid: str) -> str:
        return self._file_command(fid, "accept")

    def cancel_file(self, fid: str) -> str:
        return self._file_command(fid, "cancel")

    def _file_command(self, fid: str, what: str) -> str:
        if self.files is None:
            return "file sharing is off on this node"
        with self._lock:
            now = self._clock()
            text, actions = getattr(self.files, what)(fid, now)
            actions = self.relay._sends(actions, now, self._wall())  # its FGETs as datagrams
        self._act(actions)
        self._wake()
        return text

    def _file_job(self, action: Any) -> None:
        disk = self.file_disk
        assert disk is not None
        kind = type(action)
        if kind is filesmod.ReadPiece:
            disk.put(("read", action.fid, action.path, action.index, action.addr, action.key))  # dropped: asked again
        elif kind is filesmod.WritePiece:
            if not disk.put(("write", action.fid, action.index, action.data, action.key)):
                self._file_write_failed(action.fid, action.index, "the files thread is behind")
        elif kind is filesmod.SaveMeta:
            disk.put(("meta", action.offer, action.hashes))
        elif kind is filesmod.Finish:
            if not disk.put(("finish", action.offer)):
                self._file_finished(action.offer.fid, None, "the files thread is behind")
        elif kind is filesmod.Discard:
            disk.put(("discard", action.fid))

    def _file_hashed(self, offer: "filesmod.Offer", hashes: bytes, path: str) -> None:
        if offer.dst:
            self._direct_file_hashed(offer, hashes, path)
            return
        with self._lock:
            self.files.share(offer, hashes, path, self._clock())  # type: ignore[union-attr]
        self._originate(filesmod.OFFER_KIND, "", offer.dst, {"file": offer.fields()})
        self._on_event(filesmod.FileOffered(offer, True, False))
        self._wake()

    def _direct_file_hashed(self, offer: "filesmod.Offer", hashes: bytes, path: str) -> None:
        """A file for one node: sealed to its box key and offered, or held until the key comes (as a
        direct CHAT is: private.py rule 2); in clear (no key of our own, or --plain) it says so."""
        p, m = self.private, self.membership
        name = display_name(offer.dst, self.nick_of(offer.dst))
        asks: list = []
        no_key = False
        with self._lock:
            now, wall = self._clock(), self._wall()
            their_key = p.key_of(offer.dst) if p is not None and offer.key else None
            held = bool(offer.key) and their_key is None
            self.files.share(offer, hashes, path, now, waiting=held)  # type: ignore[union-attr]
            if held:
                p.wait_for(offer.dst)  # type: ignore[union-attr]
                caps = m.caps_of(offer.dst) if m is not None else None
                no_key = caps is not None and PRIVATE_CAP not in caps
                if not no_key:
                    asks = self.relay._ask_key(offer.dst, now, wall)
        if held:
            why = (f"{name} announced no key for private messages (an older node, or one without the secure "
                   f"extra): it waits until it has one; /send --plain @NAME PATH sends it in clear"
                   if no_key else f"it waits for {name}'s key (asked for it), then goes encrypted")
            self._on_event(Notice(f"{offer.name!r} for {name} is not offered yet: {why}"))
            self._act(asks)
            self._wake()
            return
        if their_key is not None:
            offer = filesmod.seal_offer(offer, their_key, crypto.seal_to)
            with self._lock:
                self.files.offered(offer, self._clock())  # type: ignore[union-attr]
        self._offer_direct(offer)

    def _offer_direct(self, offer: "filesmod.Offer") -> None:
        self._originate(filesmod.OFFER_KIND, "", offer.dst, {"file": offer.fields()})
        name = display_name(offer.dst, self.nick_of(offer.dst))
        self._on_event(filesmod.FileOffered(offer, True, False))
        self._on_event(Notice(f"{offer.name!r} goes to {name} only, " + (
            "end-to-end encrypted: relays carry it and cannot read it" if offer.sealed else
            "not encrypted: every node on the way can read it")))
        self._wake()

    def _file_offers_due(self) -> None:
        """Our direct files that waited for their destination's key, sealed and offered now it came."""
        p = self.private
        assert p is not None and self.files is not None
        with self._lock:
            ready = self.files.waiting_for(lambda label: p.key_of(label) is not None)
            sealed = []
            for offer in ready:
                offer = filesmod.seal_offer(offer, p.key_of(offer.dst), crypto.seal_to)  # type: ignore[arg-type]
                self.files.offered(offer, self._clock())
                sealed.append(offer)
        for offer in sealed:
            self._offer_direct(offer)

    def _file_hash_failed(self, path: str, why: str) -> None:
        self._on_event(Notice(f"{path}: {why}"))

    def _file_read(self, fid: str, index: int, data: bytes, addr: Addr) -> None:
        with self._lock:
            raw = self.files.piece_read(fid, index, data, addr, self._wall())  # type: ignore[union-attr]
        if raw is not None:
            with self._lock:
                self.relay.counters.sent += 1
                self.relay.counters.link_sent += 1
            self._send(Send(raw, (addr,)))

    def _file_write_failed(self, fid: str, index: int, why: str) -> None:
        with self._lock:
            actions = self.files.write_failed(fid, index, why, self._clock())  # type: ignore[union-attr]
        self._act(actions)

    def _file_finished(self, fid: str, path: Optional[str], why: str) -> None:
        with self._lock:
            actions = self.files.finished(fid, path, why, self._clock())  # type: ignore[union-attr]
        self._act(actions)
        self._wake()

    def _file_resumed(self, offer: "filesmod.Offer", hashes: Optional[bytes], have: list) -> None:
        with self._lock:
            actions = self.files.resume(offer, hashes, have, self._clock())  # type: ignore[union-attr]
        self._act(actions)
        self._wake()
