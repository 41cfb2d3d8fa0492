"""File sharing: offers, piece bookkeeping, fetching from whoever has the file (sans-I/O).

Rules, so that every node agrees:
1. A file is offered by its origin in a ``FOFFER`` (flooded like a CHAT, signed like every message
   it originates): ``fid``, ``name``, ``size``, ``sha`` (SHA-256 of the whole), ``cs`` (chunk size)
   and ``hl`` (SHA-256 of the hash list: the SHA-256 of each chunk, 32 bytes each, concatenated).
2. Pieces: the hash list is cut into parts of ``cs`` bytes, pieces ``0 .. m-1``; the file's chunks
   follow, pieces ``m .. m+n-1``. ``FGET`` asks a neighbour for pieces, ``FDATA`` carries one,
   ``FHAVE`` says which a neighbour has. All three go one hop, only to neighbours that said ``FILE``
   in their HELLO caps, and are taken only from neighbours that proved themselves (relay.py).
3. Nothing is stored, served or counted before it is verified: a chunk against its hash, the hash
   list whole against ``hl`` (before any chunk is asked for), the file whole against ``sha`` when
   complete (the node's files thread reads it back: ``Finish``).
4. Every table is bounded: offers remembered, transfers at once, sources, requests in flight, the
   pieces asked for in one datagram, the answers served a second.
5. No socket, thread, clock or disk here: ``now`` is an argument, and the disk work comes back as
   actions (``ReadPiece``, ``WritePiece``, ``SaveMeta``, ``Finish``) for the node's files thread;
   what it finds comes back through ``piece_read``, ``write_failed`` and ``finished``.

The node calls all of this under its one lock, from the socket thread and the files thread.
"""

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from .bucket import new_bucket, take
from .membership import Unicast
from .wire import Addr, Message, encode

CAP = "FILE"
OFFER_KIND = "FOFFER"
LINK_KINDS = ("FGET", "FDATA", "FHAVE")

# 1,400 bytes with every header: a 768-byte chunk is 1,024 base64 characters, which leaves room for
# the envelope with a label of up to 200 characters (tests/test_files.py encodes the worst case).
CHUNK_BYTES = 768
HASH_BYTES = 32
MAX_FILE_BYTES = 1 << 30  # 1 GiB: its hash list (44 MB) is held in memory while it moves
MAX_NAME_CHARS = 255
MAX_OFFERS = 256  # offers remembered; the oldest that is not moving is forgotten first
MAX_ACTIVE = 8  # transfers fetching at once; more wait their turn
MAX_SOURCES = 16  # neighbours asked for one transfer
MAX_INFLIGHT = 512  # requests out for one transfer
MAX_WANT = 32  # pieces asked for in one FGET
MAX_RANGES = 64  # ranges in one FHAVE (a sender with more announces only the first)
INITIAL_WINDOW = 8.0  # requests out to a new source
MAX_WINDOW = 128.0
SLOW_START_WINDOW = 32.0
MIN_TIMEOUT_S = 0.25
# A source with requests out is asked again at most this often: its FGETs (with our FHAVEs, HELLOs and
# chat) stay well under the 200 datagrams a second a neighbour takes from us (relay.py's rate limit),
# which drops the excess, each drop a round of timeouts and a halved window.
FGET_GAP_S = 0.01
MAX_TIMEOUT_S = 2.0
CARRY_SLACK_HOPS = 1  # a node this much off the shortest way between a direct file's ends still carries it
ENDGAME_PIECES = 16  # at most this many left and all asked for: ask a second source too
HAVE_CHANGED_S = 0.3  # an FHAVE goes this soon after what we have changed
HAVE_REFRESH_S = 2.0  # and this often anyway (a neighbour that restarted learns who has what)
PROGRESS_S = 0.25  # a progress event per transfer at most this often
SERVE_PER_S = 4000.0  # FDATA a node sends a second, all neighbours together (bursts of 0.1 s)
SERVE_BURST_S = 0.25
FETCH_STALL_S = 120.0  # a transfer with no progress for this long fails (with sources or without)
STALL_RESET_S = 10.0  # no piece for this long: the fetch state starts afresh (the watchdog, _stalled)
OFFER_ASKS = 3  # times we ask neighbours for an offer they announce pieces of and we never heard of
SERVE_KEEP_S = 3600.0  # a finished file is served for this long
OFFER_FLOOD_S = 30.0  # an offer served back younger than this floods on from the asker; older, one hop
MAX_DONE = 1000  # fids of files finished in earlier runs, remembered so they are not fetched again
MAX_BAD_PIECES = 3  # a source that sent this many pieces that do not verify is no longer asked
# End-to-end files (rule 6): a direct file's chunks are sealed, and a piece stays CHUNK_BYTES on the
# wire, so a sealed file's plaintext chunk is smaller by the AEAD's tag.
TAG_BYTES = 16
SEALED_CHUNK_BYTES = CHUNK_BYTES - TAG_BYTES
FILE_KEY_BYTES = 32
MAX_BOX_CHARS = 2048  # the sealed part of an offer: a name of 255 characters (up to 4 bytes each) fits
MAX_HOPS = 255

_FID_RE = re.compile(r"[0-9a-f]{16}\Z")
_SHA_RE = re.compile(r"[0-9a-f]{64}\Z")
_KEY_RE = _SHA_RE  # a file key: 32 bytes in hex


class Offer(NamedTuple):
    fid: str
    name: str
    size: int
    sha: str
    hl: str
    cs: int
    src: str
    dst: str = ""
    box: str = ""  # a sealed offer: name, sha and the file key, sealed to ``dst`` (rule 6)
    hops: int = 0  # a direct offer: how far its origin was from ``dst`` (0: not known)
    key: str = ""  # the file key (hex), at the origin and at ``dst`` once opened; never on the wire

    @property
    def sealed(self) -> bool:
        return bool(self.box)

    @property
    def pcs(self) -> int:
        """Plaintext bytes per chunk (a sealed chunk carries the AEAD's tag too)."""
        return self.cs - TAG_BYTES if self.box or self.key else self.cs

    @property
    def chunks(self) -> int:
        return (self.size + self.pcs - 1) // self.pcs

    @property
    def parts(self) -> int:
        return (self.chunks * HASH_BYTES + self.cs - 1) // self.cs

    def fields(self) -> Dict[str, Any]:
        """What travels: a sealed offer shows neither name nor SHA-256 (a relay could confirm a guess)."""
        out: Dict[str, Any] = {"fid": self.fid, "size": self.size, "hl": self.hl, "cs": self.cs}
        if self.box:
            out["box"] = self.box
        else:
            out["name"], out["sha"] = self.name, self.sha
        if self.dst:
            out["hops"] = self.hops
        return out


_BOX_RE = re.compile(r"[A-Za-z0-9_-]+={0,2}\Z")


def parse_offer(msg: Message) -> Optional[Offer]:
    """The offer a FOFFER carries, or None if anything in it is not as rules 1 and 6 say."""
    x = msg.extra.get("file")
    if not isinstance(x, dict):
        return None
    fid, size, hl, cs = (x.get(k) for k in ("fid", "size", "hl", "cs"))
    if not (isinstance(fid, str) and _FID_RE.match(fid) and isinstance(hl, str) and _SHA_RE.match(hl)):
        return None
    if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES or type(cs) is not int or cs != CHUNK_BYTES:
        return None
    hops = x.get("hops", 0)
    if type(hops) is not int or not 0 <= hops <= MAX_HOPS:
        return None
    if "box" in x:
        box = x["box"]
        # Sealed: only to one node, and nothing of what the box hides beside it.
        if (not msg.dst or "name" in x or "sha" in x or not isinstance(box, str)
                or not 0 < len(box) <= MAX_BOX_CHARS or not _BOX_RE.match(box)):
            return None
        return Offer(fid, "", size, "", hl, cs, msg.src, msg.dst, box, hops)
    name, sha = x.get("name"), x.get("sha")
    if not (isinstance(sha, str) and _SHA_RE.match(sha)):
        return None
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        return None
    return Offer(fid, name, size, sha, hl, cs, msg.src, msg.dst, "", hops)


def _box_aad(o: Offer) -> bytes:
    """What an offer's box is bound to: moved onto another offer (or with its size or hash list
    changed), it does not open."""
    return json.dumps(["FOFFER", o.fid, o.src, o.dst, o.size, o.hl, o.cs], separators=(",", ":")).encode("utf-8")


def seal_offer(o: Offer, their_key: bytes, seal_to: Callable[[bytes, bytes, bytes], bytes]) -> Offer:
    """Our offer of a direct file with its name, SHA-256 and file key sealed to ``dst``'s box key."""
    inner = json.dumps({"name": o.name, "sha": o.sha, "key": o.key}, separators=(",", ":"), ensure_ascii=False)
    box = seal_to(their_key, inner.encode("utf-8"), _box_aad(o))
    return o._replace(box=base64.urlsafe_b64encode(box).decode("ascii"))


def open_offer(o: Offer, open_box: Callable[[bytes, bytes], Optional[bytes]]) -> Optional[Offer]:
    """A sealed offer to us with what its box hides filled in; None if it does not open or what is
    inside is not as rule 6 says."""
    try:
        plain = open_box(base64.urlsafe_b64decode(o.box.encode("ascii")), _box_aad(o))
        inner = json.loads(plain.decode("utf-8")) if plain is not None else None
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(inner, dict):
        return None
    name, sha, key = inner.get("name"), inner.get("sha"), inner.get("key")
    if (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not isinstance(sha, str)
            or not _SHA_RE.match(sha) or not isinstance(key, str) or not _KEY_RE.match(key)):
        return None
    return o._replace(name=name, sha=sha, key=key)


def hash_list(chunk_hashes: Iterable[bytes]) -> bytes:
    return b"".join(chunk_hashes)


# -- actions and events ------------------------------------------------------------------------------

class ReadPiece(NamedTuple):
    """Files thread: read chunk ``index`` of ``path`` and give it to ``piece_read`` for ``addr``
    (sealed under ``key`` first, when the file is a sealed one held in clear: rule 6)."""
    fid: str
    path: str
    index: int
    addr: Addr
    key: str = ""


class WritePiece(NamedTuple):
    """Files thread: write a verified chunk at ``index * cs`` of the transfer's temporary file
    (opened with ``key`` first, at the destination of a sealed file: rule 6)."""
    fid: str
    index: int
    data: bytes
    key: str = ""


class SaveMeta(NamedTuple):
    """Files thread: keep the offer (and the hash list, once verified) beside the temporary file."""
    offer: Offer
    hashes: Optional[bytes]


class Finish(NamedTuple):
    """Files thread: every chunk is in: check the whole SHA-256, rename into place, call ``finished``."""
    offer: Offer


class Discard(NamedTuple):
    """Files thread: a cancelled or failed download: remove its temporary file and its metadata."""
    fid: str


class FileOffered(NamedTuple):
    offer: Offer
    verified: Optional[bool]
    fetching: bool  # False: it waits for /accept (or was refused: a FileFailed follows)


class FileProgress(NamedTuple):
    fid: str
    name: str
    have: int  # bytes
    size: int
    rate: float  # bytes a second, lately
    left_s: Optional[float]


class FileDone(NamedTuple):
    fid: str
    name: str
    path: str
    size: int
    sha: str


class FileFailed(NamedTuple):
    fid: str
    name: str
    reason: str


@dataclass(frozen=True)
class FilesConfig:
    label: str
    accept_bytes: int = 16 << 20  # offers up to this from verified senders are fetched at once; 0: ask
    quota_bytes: int = 1 << 30  # downloads on disk, this run's and earlier ones together
    used_bytes: int = 0  # already in the downloads folder at start
    serve_per_s: float = SERVE_PER_S


class Source:
    __slots__ = ("addr", "ranges", "window", "out", "srtt", "rttvar", "bad", "halved_at", "heard", "asked_at")

    def __init__(self, addr: Addr, now: float = 0.0) -> None:
        self.addr = addr
        self.heard = now  # its last FHAVE: a live neighbour sends one every HAVE_REFRESH_S
        self.asked_at = float("-inf")  # our last FGET to it
        self.ranges: List[Tuple[int, int]] = []
        self.window = INITIAL_WINDOW
        self.out = 0
        self.srtt: Optional[float] = None
        self.rttvar = 0.0
        self.bad = 0
        self.halved_at = float("-inf")

    def restart(self) -> None:
        """Back to what a new source gets: the window, the round trip and the count of requests out."""
        self.window, self.out, self.srtt, self.rttvar = INITIAL_WINDOW, 0, None, 0.0
        self.halved_at = float("-inf")

    def has(self, piece: int) -> bool:
        for a, b in self.ranges:
            if a <= piece < b:
                return True
        return False

    def timeout(self) -> float:
        # RFC 6298's srtt + 4 x rttvar: a neighbour that stalls now and then (a busy CPU, a GIL) gets
        # the margin its variance asks for; a spurious timeout re-asks a piece still on its way,
        # and a window of duplicates is what then fills the serving budget.
        if self.srtt is None:
            return MAX_TIMEOUT_S / 2
        return min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, self.srtt + 4.0 * self.rttvar))

    def sampled(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt


@dataclass
class Transfer:
    offer: Offer
    state: str  # "offered" (waits for /accept), "fetching", "finishing", "done" (serving), "failed", "own"
    verified: Optional[bool] = None
    path: str = ""  # ours: the file we share; a download: where it landed
    hashes: Optional[bytes] = None  # the hash list, once verified
    have: bytearray = field(default_factory=bytearray)  # per piece: 1 when we have it
    need: bytearray = field(default_factory=bytearray)  # per piece: 1 when missing and not asked for
    count: int = 0  # pieces we have
    parts: Dict[int, bytes] = field(default_factory=dict)  # hash-list parts before they verify
    inflight: Dict[int, List[Tuple[Addr, float]]] = field(default_factory=dict)
    sources: Dict[Addr, Source] = field(default_factory=dict)
    changed: bool = False  # what we have changed since our last FHAVE
    have_sent: float = float("-inf")
    progress_at: float = float("-inf")
    moved_at: float = 0.0  # last time a piece came (or the transfer started)
    started: float = 0.0
    samples: List[Tuple[float, int]] = field(default_factory=list)  # (when, bytes) for the rate
    since: float = 0.0  # when it reached its state
    spread: int = 0  # where this node starts asking in the file (_candidates)
    carry: bool = False  # a direct file for another node that we fetch and serve on (rule 6), never shown
    reset_at: float = float("-inf")  # the watchdog's last fresh start (_stalled)
    wake: float = float("inf")  # a source held back by FGET_GAP_S is asked again then
    # The FOFFER as it came (or as we sent it) and the ttl it goes on with: served again to a neighbour
    # whose copy of the flood was lost (it announces no pieces of it, so it would never fetch).
    offer_msg: Optional[Message] = None
    offer_ttl: int = 0

    @property
    def pieces(self) -> int:
        return self.offer.parts + self.offer.chunks

    def have_bytes(self) -> int:
        if not self.have:
            return 0  # failed or cancelled: its pieces are gone
        m, cs, size = self.offer.parts, self.offer.pcs, self.offer.size
        chunks = self.count - sum(self.have[:m])
        if chunks and self.have[-1] and size % cs:
            return (chunks - 1) * cs + size % cs
        return chunks * cs


def ranges_of(bits: bytearray, limit: int = MAX_RANGES) -> List[List[int]]:
    """The runs of 1s in ``bits`` as ``[start, end)`` pairs, the first ``limit`` of them."""
    out: List[List[int]] = []
    i, n = 0, len(bits)
    while i < n and len(out) < limit:
        a = bits.find(1, i)
        if a < 0:
            break
        b = bits.find(0, a)
        if b < 0:
            b = n
        out.append([a, b])
        i = b
    return out


def _parse_ranges(value: object, pieces: int) -> Optional[List[Tuple[int, int]]]:
    if not isinstance(value, list) or len(value) > MAX_RANGES:
        return None
    out = []
    for r in value:
        if (not isinstance(r, list) or len(r) != 2 or type(r[0]) is not int or type(r[1]) is not int
                or not 0 <= r[0] < r[1] <= pieces):
            return None
        out.append((r[0], r[1]))
    return out


class Files:
    """Every transfer this node knows of, and the decisions about them (rules above)."""

    def __init__(self, config: FilesConfig, new_mid: Callable[[], str],
                 neighbours: Callable[[], Iterable[Addr]] = lambda: (),
                 open_box: Optional[Callable[[bytes, bytes], Optional[bytes]]] = None,
                 hops_to: Callable[[str], Optional[int]] = lambda label: None) -> None:
        self.config = config
        self._open_box = open_box  # ours (crypto's BoxKey.open): sealed offers to us (rule 6)
        self._hops_to = hops_to  # how far a node is (membership), to tell whether we are on a direct file's way
        self.label = config.label
        self._new_mid = new_mid
        self._neighbours = neighbours  # the up neighbours that said FILE
        self.transfers: Dict[str, Transfer] = {}  # fid -> transfer, oldest first
        self.used = config.used_bytes
        self._serve = new_bucket(config.serve_per_s, SERVE_BURST_S)
        # ``wall - now`` as last told (tick, every datagram): the ts of requests made where only ``now``
        # is at hand (an /accept, a finished transfer starting the next one).
        self._wall_offset = 0.0
        self.counters: Dict[str, int] = {
            "files_offered": 0, "files_done": 0, "files_failed": 0, "file_pieces_received": 0,
            "file_pieces_served": 0, "file_requests_sent": 0, "file_timeouts": 0,
            "file_dropped_bad_piece": 0, "file_dropped_unasked": 0, "file_dropped_malformed": 0,
            "file_dropped_unknown": 0, "file_serve_budget": 0, "file_offers_forgotten": 0,
            "file_dropped_bad_box": 0, "files_carried": 0,
            "file_stall_resets": 0, "file_offer_asks": 0, "file_offers_served": 0}
        self._offer_asks: Dict[str, Tuple[int, float]] = {}  # fid -> (asks, when last): bounded, MAX_OFFERS
        self._done: Set[str] = set()  # fids finished in an earlier run (remember_done): bounded, MAX_DONE

    # -- what the user does ------------------------------------------------------------------------

    def share(self, offer: Offer, hashes: bytes, path: str, now: float, waiting: bool = False) -> None:
        """A file of ours (hashed by the files thread): served to whoever asks for it. ``waiting``:
        a sealed one whose destination's box key we do not know yet (offered by ``offered``)."""
        t = Transfer(offer, "waiting" if waiting else "own", True, path, hashes, started=now, since=now,
                     moved_at=now)
        t.have = bytearray(b"\x01") * t.pieces
        t.need = bytearray(t.pieces)
        t.count = t.pieces
        t.changed = not waiting
        self._remember(t)

    def waiting_for(self, has_key: Callable[[str], bool]) -> List[Offer]:
        """Our offers that waited for a box key ``has_key`` now has: to seal (seal_offer) and send."""
        return [t.offer for t in self.transfers.values() if t.state == "waiting" and has_key(t.offer.dst)]

    def offered(self, offer: Offer, now: float) -> None:
        """A waiting offer of ours went out (sealed): from now on it is served."""
        t = self.transfers.get(offer.fid)
        if t is not None and t.state == "waiting":
            t.offer, t.state, t.since, t.changed = offer, "own", now, True

    def accept(self, fid: str, now: float) -> Tuple[str, list]:
        """/accept: start fetching an offer that waits; the text for the user, and actions."""
        t = self.find(fid)
        if t is None:
            return f"no offer {fid!r} (see /files)", []
        if t.state == "own":
            return f"{t.offer.name} is your own file: the others fetch it from you", []
        if t.state == "failed" and not t.carry:  # cancelled, or failed: /accept tries again from the start
            t.hashes, t.count, t.parts, t.samples = None, 0, {}, []
            t.reset_at, t.wake, t.progress_at = float("-inf"), float("inf"), float("-inf")
            t.state = "offered"
        if t.state != "offered":
            return f"{t.offer.name} is {t.state} already", []
        return "", self._start(t, now)

    def cancel(self, fid: str, now: float) -> Tuple[str, list]:
        t = self.find(fid)
        if t is None:
            return f"no transfer {fid!r} (see /files)", []
        if t.carry and t.state == "done":
            return "no longer carried", self._uncarry(t)
        if t.state in ("own", "done", "failed"):
            # Stop serving it; the file itself stays where it is.
            del self.transfers[t.offer.fid]
            return f"{t.offer.name}: no longer served", []
        return "", self._fail(t, "cancelled", now)

    def find(self, fid: str) -> Optional[Transfer]:
        """By id or a unique prefix of it (what /files shows)."""
        t = self.transfers.get(fid)
        if t is not None or not fid:
            return t
        found = [t for f, t in self.transfers.items() if f.startswith(fid)]
        return found[0] if len(found) == 1 else None

    def rows(self, now: float) -> List[dict]:
        """/files: every transfer, oldest first."""
        out = []
        for t in self.transfers.values():
            o = t.offer
            state = ("carrying" if t.state in ("fetching", "offered") else "carried") if t.carry else t.state
            out.append({"fid": o.fid, "name": o.name or "(sealed)", "size": o.size, "state": state, "src": o.src,
                        "have": o.size if t.state in ("own", "done") else t.have_bytes(),
                        "sources": len(t.sources), "path": "" if t.carry else t.path, "rate": self._rate(t, now),
                        "dst": o.dst, "encrypted": bool(o.sealed or o.key) if o.dst else None})
        return out

    # -- resuming after a restart --------------------------------------------------------------------

    def resume(self, offer: Offer, hashes: Optional[bytes], chunks_had: Iterable[int], now: float) -> list:
        """A download found on disk by the files thread (its chunks already checked against ``hashes``)."""
        if offer.fid in self.transfers:
            return []
        t = Transfer(offer, "offered", True, started=now, since=now, moved_at=now,
                     carry=bool(offer.dst) and offer.dst != self.label)
        self._remember(t)
        self.used += offer.size
        self._init_bits(t)
        if hashes is not None and len(hashes) == offer.chunks * HASH_BYTES:
            self._hashes_verified(t, hashes)
            m = offer.parts
            for i in chunks_had:
                if 0 <= i < offer.chunks and not t.have[m + i]:
                    t.have[m + i] = 1
                    t.need[m + i] = 0
                    t.count += 1
        t.state = "fetching"
        return self._check_complete(t, now)

    # -- the wire: receiving -----------------------------------------------------------------------

    def offer_received(self, msg: Message, verified: Optional[bool], now: float) -> list:
        """A FOFFER's first copy (the relay floods it on as any message)."""
        offer = parse_offer(msg)
        if offer is None:
            self.counters["file_dropped_malformed"] += 1
            return []
        if offer.fid in self.transfers or offer.fid in self._done:
            return []
        if offer.src == self.label:
            return []  # ours, from before a restart (a neighbour served it back): never fetched from others
        if offer.dst and offer.dst != self.label:
            return self._carry(msg, offer, verified, now)
        if offer.sealed:
            opened = open_offer(offer, self._open_box) if self._open_box is not None else None
            if opened is None:  # tampered, moved, not for our key, or we have no key: never fetched
                self.counters["file_dropped_bad_box"] += 1
                return []
            offer = opened
        if verified is False:
            # Anyone can put any src on a message: an unverified offer is shown, never fetched by itself.
            fetch = False
        else:
            limit = self.config.accept_bytes
            fetch = limit > 0 and offer.size <= limit
        t = Transfer(offer, "offered", verified, started=now, since=now, moved_at=now,
                     spread=int.from_bytes(hashlib.sha256((self.label + offer.fid).encode()).digest()[:4], "big"))
        self._remember(t)
        self.counters["files_offered"] += 1
        out: list = [FileOffered(offer, verified, fetch)]
        if fetch:
            out.extend(self._start(t, now))
        return out

    def _carry(self, msg: Message, offer: Offer, verified: Optional[bool], now: float) -> list:
        """A direct offer for another node (rule 6): fetched and served on, never shown or finished, when
        we are on its way (our distance from its origin and to its destination add up to about the
        origin's own distance to it), it is verified and under the size fetched without asking."""
        if offer.dst == offer.src or verified is False:
            return []
        limit = self.config.accept_bytes
        if not (limit > 0 and offer.size <= limit):
            return []
        ahead = self._hops_to(offer.dst)
        ttl0 = msg.extra.get("ttl0")
        behind = ttl0 - msg.ttl + 1 if type(ttl0) is int and 0 < msg.ttl <= ttl0 else None
        if ahead is None or (offer.hops and (behind is None or behind + ahead > offer.hops + CARRY_SLACK_HOPS)):
            return []
        t = Transfer(offer, "offered", verified, started=now, since=now, moved_at=now, carry=True,
                     spread=int.from_bytes(hashlib.sha256((self.label + offer.fid).encode()).digest()[:4], "big"))
        self._remember(t)
        self.counters["files_carried"] += 1
        return self._start(t, now)

    def have_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        self._wall_offset = wall - now
        t = self._transfer_of(msg)
        if t is None:
            return self._ask_offer(msg, addr, now, wall), ""
        ranges = _parse_ranges(msg.extra.get("have"), t.pieces)
        if ranges is None:
            self.counters["file_dropped_malformed"] += 1
            return [], ""
        if t.state not in ("fetching", "offered"):
            return [], ""
        s = t.sources.get(addr)
        if s is None:
            if len(t.sources) >= MAX_SOURCES or not ranges:
                return [], ""
            s = t.sources[addr] = Source(addr, now)
        s.ranges = ranges
        s.heard = now
        return (self._pump(t, now) if t.state == "fetching" else []), ""

    def get_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """An FGET: each piece we have, verified, goes back as an FDATA, within the serving budget."""
        self._wall_offset = wall - now
        t = self._transfer_of(msg)
        want = msg.extra.get("want")
        if not isinstance(want, list) or len(want) > MAX_WANT:
            self.counters["file_dropped_malformed"] += 1
            return [], ""
        if t is None or t.state not in ("own", "done", "fetching", "finishing"):
            self.counters["file_dropped_unknown"] += 1
            return [], ""
        if msg.extra.get("offer") is True:
            return self._offer_copy(t, addr, now), ""
        out: list = []
        m = t.offer.parts
        for piece in want:
            if type(piece) is not int or not 0 <= piece < t.pieces or not t.have[piece]:
                continue
            if not take(self._serve, self.config.serve_per_s, now, SERVE_BURST_S):
                self.counters["file_serve_budget"] += 1
                break
            if piece < m:
                if t.hashes is None:
                    continue  # parts of a hash list not verified yet are not served (rule 3)
                out.append(Unicast(self._fdata(t.offer.fid, piece, t.hashes[piece * t.offer.cs:(piece + 1) * t.offer.cs],
                                               now, wall), addr))
                self.counters["file_pieces_served"] += 1
            else:
                # Off the socket thread: the files thread reads it and hands it to piece_read.
                out.append(ReadPiece(t.offer.fid, t.path, piece - m, addr, "" if t.carry else t.offer.key))
        return out, ""

    def piece_read(self, fid: str, index: int, data: bytes, addr: Addr, wall: float) -> Optional[bytes]:
        """The FDATA for a chunk the files thread read for ``addr``; None if it is no longer ours to serve
        or does not match its hash (the file changed on disk under us)."""
        t = self.transfers.get(fid)
        if t is None or t.hashes is None:
            return None
        if hashlib.sha256(data).digest() != t.hashes[index * HASH_BYTES:(index + 1) * HASH_BYTES]:
            return None
        self.counters["file_pieces_served"] += 1
        return self._fdata(fid, t.offer.parts + index, data, 0.0, wall)

    def data_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        self._wall_offset = wall - now
        t = self._transfer_of(msg)
        piece = msg.extra.get("i")
        if t is None or t.state != "fetching":
            self.counters["file_dropped_unasked"] += 1
            return [], ""
        if type(piece) is not int or not 0 <= piece < t.pieces:
            self.counters["file_dropped_malformed"] += 1
            return [], ""
        try:
            data = base64.b64decode(msg.body, validate=True)
        except (binascii.Error, ValueError):
            self.counters["file_dropped_malformed"] += 1
            return [], ""
        asked = t.inflight.pop(piece, None)
        s = t.sources.get(addr)
        if asked:
            for who, when in asked:
                other = t.sources.get(who)
                if other is not None:
                    other.out -= 1
                if who == addr and s is not None:
                    s.sampled(now - when)
                    # Slow start to SLOW_START_WINDOW, then additive increase: about one more a round trip.
                    s.window = min(MAX_WINDOW, s.window + (1.0 if s.window < SLOW_START_WINDOW else 1.0 / s.window))
        if t.have[piece]:
            return self._pump(t, now), ""  # a duplicate (the endgame asks twice)
        if asked is None:
            self.counters["file_dropped_unasked"] += 1
            return [], ""
        m, cs = t.offer.parts, t.offer.cs
        out: list = []
        if piece < m:
            expected = cs if piece < m - 1 else t.offer.chunks * HASH_BYTES - (m - 1) * cs
            if len(data) != expected:
                return self._bad(t, piece, s, now), ""
            t.parts[piece] = data
            self._got(t, piece, now)
            if len(t.parts) == m:
                whole = b"".join(t.parts[i] for i in range(m))
                if hashlib.sha256(whole).hexdigest() != t.offer.hl:
                    # One part is bad and we cannot tell which: all are fetched again (counted).
                    self.counters["file_dropped_bad_piece"] += 1
                    for i in range(m):
                        t.have[i] = 0
                        t.need[i] = 1
                    t.count -= m
                    t.parts.clear()
                    if s is not None:
                        s.bad += 1
                else:
                    t.parts.clear()
                    self._hashes_verified(t, whole)
                    out.append(SaveMeta(t.offer, whole))
        else:
            index = piece - m
            assert t.hashes is not None  # chunks are asked for only once the hash list is verified
            if hashlib.sha256(data).digest() != t.hashes[index * HASH_BYTES:(index + 1) * HASH_BYTES]:
                return self._bad(t, piece, s, now), ""
            self._got(t, piece, now)
            out.append(WritePiece(t.offer.fid, index, data, "" if t.carry else t.offer.key))
        self.counters["file_pieces_received"] += 1
        out.extend(self._check_complete(t, now))
        if t.state == "fetching":
            out.extend(self._pump(t, now))
        return out, ""

    # -- what the files thread found -------------------------------------------------------------

    def write_failed(self, fid: str, index: int, why: str, now: float) -> list:
        t = self.transfers.get(fid)
        if t is None or t.state not in ("fetching", "finishing"):
            return []
        return self._fail(t, f"cannot write: {why}", now)

    def finished(self, fid: str, path: Optional[str], why: str, now: float) -> list:
        """The files thread checked the whole file: renamed to ``path``, or not (``why``)."""
        t = self.transfers.get(fid)
        if t is None or t.state != "finishing":
            return []
        if path is None:
            return self._fail(t, why, now)
        t.state, t.path, t.since = "done", path, now
        t.changed = True
        self.counters["files_done"] += 1
        o = t.offer
        return [FileProgress(o.fid, o.name, o.size, o.size, self._rate(t, now), 0.0),
                FileDone(o.fid, o.name, path, o.size, o.sha)] + self._next_waiting(now)

    # -- offers lost on the way -------------------------------------------------------------------------
    # A FOFFER floods once, and nothing repairs a lost copy: on a lossy line the nodes beyond the loss
    # never hear of the file while their neighbour serves it. That neighbour's FHAVE names the fid, so a
    # node asks it for the offer (an FGET with ``offer``: true, a few times at most) and gets the FOFFER
    # as it was flooded, signature and all, which its relay then takes as a first copy (and floods on).

    def keep_offer(self, msg: Message, ttl: int) -> None:
        """The FOFFER of a transfer we know (it came, or we sent it) and the ttl a copy of it goes with.
        A direct file's offer too: a carrier on the way whose copy was lost learns it so (rule 6)."""
        x = msg.extra.get("file")
        fid = x.get("fid") if isinstance(x, dict) else None
        t = self.transfers.get(fid) if type(fid) is str else None
        if t is not None and t.offer_msg is None and ttl >= 1:
            t.offer_msg, t.offer_ttl = msg, ttl

    def _ask_offer(self, msg: Message, addr: Addr, now: float, wall: float) -> list:
        """An FHAVE for a fid we never heard of: ask its sender for the offer, now and then, a few times."""
        fid = msg.extra.get("fid")
        if type(fid) is not str or not _FID_RE.match(fid):
            self.counters["file_dropped_malformed"] += 1
            return []
        asks, last = self._offer_asks.pop(fid, (0, float("-inf")))
        if len(self._offer_asks) >= MAX_OFFERS:
            del self._offer_asks[next(iter(self._offer_asks))]
        self._offer_asks[fid] = (asks, last)
        if asks >= OFFER_ASKS or now - last < HAVE_REFRESH_S:
            return []
        self._offer_asks[fid] = (asks + 1, now)
        self.counters["file_offer_asks"] += 1
        return [Unicast(self._link("FGET", "", {"fid": fid, "want": [], "offer": True}, wall), addr)]

    def _offer_copy(self, t: Transfer, addr: Addr, now: float) -> list:
        """An FGET asking for the offer (only neighbours that proved themselves get here: relay.py)."""
        if t.offer_msg is None:
            return []
        if not take(self._serve, self.config.serve_per_s, now, SERVE_BURST_S):
            self.counters["file_serve_budget"] += 1
            return []
        self.counters["file_offers_served"] += 1
        # Fresh, it floods on from the asker as it would have; older, it goes one hop (ttl 1, as repair
        # serves), so that nodes beyond, who never asked, do not take an old message for a skewed clock.
        fresh = self._wall_offset + now - t.offer_msg.ts < OFFER_FLOOD_S
        return [Unicast(encode(t.offer_msg._replace(ttl=t.offer_ttl if fresh else 1)), addr)]

    def asked_offer(self, msg: Message) -> bool:
        """Whether ``msg`` (a FOFFER) answers our ask for it: the relay takes it although it is old."""
        x = msg.extra.get("file") if msg.extra else None
        fid = x.get("fid") if isinstance(x, dict) else None
        return type(fid) is str and self._offer_asks.get(fid, (0, 0.0))[0] > 0

    def remember_done(self, fids: Iterable[str]) -> None:
        """Files this node finished in an earlier run (the files thread's list): never fetched again."""
        for fid in fids:
            if _FID_RE.match(fid) and len(self._done) < MAX_DONE:
                self._done.add(fid)

    # -- timers ---------------------------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> list:
        self._wall_offset = wall - now
        out: list = []
        neighbours = None
        for t in list(self.transfers.values()):
            if t.state == "fetching":
                out.extend(self._timeouts(t, now))
                if t.state == "fetching":
                    out.extend(self._pump(t, now))
                    if now - t.progress_at >= PROGRESS_S and t.count:
                        t.progress_at = now
                        if not t.carry:  # another node's file: never shown here
                            out.append(self._progress(t, now))
            if t.state == "done" and now - t.since > SERVE_KEEP_S:
                t.state = "kept"  # listed, no longer served
                t.have = bytearray()
                if t.carry:  # another node's file: its pieces go, and so does the transfer
                    out.extend(self._uncarry(t))
                continue
            if t.state in ("fetching", "done", "own") and (
                    (t.changed and now - t.have_sent >= HAVE_CHANGED_S) or now - t.have_sent >= HAVE_REFRESH_S):
                if neighbours is None:
                    neighbours = list(self._neighbours())
                if t.hashes is not None and neighbours:
                    data = self._fhave(t, wall)
                    out.extend(Unicast(data, a) for a in neighbours)
                t.changed = False
                t.have_sent = now
        return out

    def next_deadline(self) -> Optional[float]:
        """Coarse but sufficient: while anything moves or is served, every 0.05 s."""
        soonest = None
        for t in self.transfers.values():
            if t.state in ("fetching", "done", "own"):
                d = t.have_sent + (HAVE_CHANGED_S if t.changed else HAVE_REFRESH_S)
                if t.state == "fetching":
                    d = min(d, self._earliest_timeout(t), self._stall_deadline(t), t.wake)
                    if t.count:  # progress_at is -inf until the first piece: no event to send before
                        d = min(d, t.progress_at + PROGRESS_S)
                soonest = d if soonest is None else min(soonest, d)
        return soonest

    def stats(self) -> Dict[str, int]:
        out = dict(self.counters)
        out["files_moving"] = sum(1 for t in self.transfers.values() if t.state == "fetching")
        return out

    # -- inside ----------------------------------------------------------------------------------------

    def _transfer_of(self, msg: Message) -> Optional[Transfer]:
        fid = msg.extra.get("fid")
        return self.transfers.get(fid) if type(fid) is str else None  # anything else: no transfer

    def _uncarry(self, t: Transfer) -> list:
        del self.transfers[t.offer.fid]
        self.used -= t.offer.size
        return [Discard(t.offer.fid)]

    def _remember(self, t: Transfer) -> None:
        if len(self.transfers) >= MAX_OFFERS:
            for fid, old in self.transfers.items():
                if old.state in ("offered", "done", "failed", "kept"):
                    del self.transfers[fid]
                    self.counters["file_offers_forgotten"] += 1
                    break
        self.transfers[t.offer.fid] = t

    def _init_bits(self, t: Transfer) -> None:
        t.have = bytearray(t.pieces)
        t.need = bytearray(b"\x01") * t.offer.parts + bytearray(t.offer.chunks)

    def _hashes_verified(self, t: Transfer, whole: bytes) -> None:
        m = t.offer.parts
        t.hashes = whole
        for i in range(m):
            t.have[i] = 1
            t.need[i] = 0
        t.count = sum(t.have)
        t.need[m:] = bytes(1 if not t.have[m + i] else 0 for i in range(t.offer.chunks))
        t.changed = True

    def _start(self, t: Transfer, now: float) -> list:
        o = t.offer
        if o.size > self.config.quota_bytes - self.used:
            return self._fail(t, f"it does not fit in the downloads quota ({self.used} of "
                                 f"{self.config.quota_bytes} bytes used)", now)
        if sum(1 for x in self.transfers.values() if x.state == "fetching") >= MAX_ACTIVE:
            t.state = "queued"
            return []
        self.used += o.size
        self._init_bits(t)
        t.state, t.since, t.moved_at, t.started = "fetching", now, now, now
        if o.parts == 0:  # an empty file: its hash list is empty, nothing to fetch
            if o.hl != hashlib.sha256(b"").hexdigest():
                return self._fail(t, "its hash list does not match its size", now)
            self._hashes_verified(t, b"")
        # A row at 0% at once: a transfer no neighbour can serve yet says so, rather than nothing.
        shown = [] if t.carry else [FileProgress(o.fid, o.name, 0, o.size, 0.0, None)]
        return [SaveMeta(o, None)] + shown + self._check_complete(t, now) + self._pump(t, now)

    def _next_waiting(self, now: float) -> list:
        for t in self.transfers.values():
            if t.state == "queued":
                t.state = "offered"
                return self._start(t, now)
        return []

    def _fail(self, t: Transfer, reason: str, now: float) -> list:
        downloading = t.state in ("fetching", "finishing", "queued")
        if t.state in ("fetching", "finishing"):
            self.used -= t.offer.size
        t.state, t.since = "failed", now
        t.inflight.clear()
        t.sources.clear()
        t.have, t.need, t.parts = bytearray(), bytearray(), {}
        self.counters["files_failed"] += 1
        out: list = [] if t.carry else [FileFailed(t.offer.fid, t.offer.name, reason)]  # carried: never shown
        if downloading:
            out.append(Discard(t.offer.fid))
        return out + self._next_waiting(now)

    def _got(self, t: Transfer, piece: int, now: float) -> None:
        t.have[piece] = 1
        t.need[piece] = 0
        t.count += 1
        t.changed = True
        t.moved_at = now
        t.samples.append((now, t.offer.cs))
        if len(t.samples) > 4096:
            del t.samples[:2048]

    def _bad(self, t: Transfer, piece: int, s: Optional[Source], now: float) -> list:
        """A piece that does not verify: not stored, asked for again (elsewhere if the source keeps lying)."""
        self.counters["file_dropped_bad_piece"] += 1
        t.need[piece] = 1
        if s is not None:
            s.bad += 1
            if s.bad >= MAX_BAD_PIECES:
                self._drop_source(t, s)
        return self._pump(t, now)

    def _drop_source(self, t: Transfer, s: Source) -> None:
        del t.sources[s.addr]
        for piece, asks in list(t.inflight.items()):
            rest = [a for a in asks if a[0] != s.addr]
            if rest:
                t.inflight[piece] = rest
            else:
                del t.inflight[piece]
                t.need[piece] = 1

    def _check_complete(self, t: Transfer, now: float) -> list:
        if t.state == "fetching" and t.hashes is not None and t.count == t.pieces:
            t.inflight.clear()
            if t.carry:  # every piece verified against the hash list; the whole is the destination's to check
                t.state, t.since, t.changed = "done", now, True
                return []
            t.state, t.since = "finishing", now
            return [Finish(t.offer)]
        return []

    def _earliest_timeout(self, t: Transfer) -> float:
        soonest = float("inf")
        for piece, asks in t.inflight.items():
            for addr, when in asks:
                s = t.sources.get(addr)
                soonest = min(soonest, when + (s.timeout() if s is not None else MIN_TIMEOUT_S))
        return soonest

    def _timeouts(self, t: Transfer, now: float) -> list:
        for piece, asks in list(t.inflight.items()):
            left = []
            for addr, when in asks:
                s = t.sources.get(addr)
                if s is None:
                    continue
                if now - when >= s.timeout():
                    s.out -= 1
                    self.counters["file_timeouts"] += 1
                    if now - s.halved_at >= s.timeout():  # halve once per round trip, not per piece
                        s.window = max(1.0, s.window / 2.0)
                        s.halved_at = now
                else:
                    left.append((addr, when))
            if left:
                t.inflight[piece] = left
            else:
                del t.inflight[piece]
                t.need[piece] = 1
        return self._stalled(t, now)

    def _stalled(self, t: Transfer, now: float) -> list:
        """The watchdog: no piece for STALL_RESET_S starts the fetch afresh; none for FETCH_STALL_S fails.

        Whatever wedged the windows (a count of requests out that no answer will bring down, windows
        halved to one, a source gone without a word) is forgotten: requests out are asked again,
        windows and round trips start anew, and a source silent for as long (a live neighbour sends
        an FHAVE every HAVE_REFRESH_S) is no longer counted on."""
        idle = now - t.moved_at
        if idle > FETCH_STALL_S:
            if t.sources:
                why = f"no progress for {FETCH_STALL_S:g} s from {len(t.sources)} node(s) that have it"
            else:
                why = f"no node had it for {FETCH_STALL_S:g} s"
            return self._fail(t, why, now)
        if idle < STALL_RESET_S or now - t.reset_at < STALL_RESET_S or not (t.sources or t.inflight):
            return []  # (with nothing asked and no one to ask, there is nothing to start afresh)
        t.reset_at = now
        self.counters["file_stall_resets"] += 1
        for piece in t.inflight:
            t.need[piece] = 1
        t.inflight.clear()
        for addr, s in list(t.sources.items()):
            if now - s.heard >= STALL_RESET_S:
                del t.sources[addr]
            else:
                s.restart()
        t.have_sent = float("-inf")  # our FHAVE at once: a neighbour that restarted learns of us again
        return []

    def _stall_deadline(self, t: Transfer) -> float:
        if not (t.sources or t.inflight):
            return t.moved_at + FETCH_STALL_S  # no fresh start to make (_stalled), only the failure
        return min(t.moved_at + FETCH_STALL_S, max(t.moved_at, t.reset_at) + STALL_RESET_S)

    def _pump(self, t: Transfer, now: float) -> list:
        """Ask each source for what it has and we lack, up to its window: rarest first, then the endgame."""
        t.wake = float("inf")
        if t.state != "fetching" or not t.sources:
            return []
        m = t.offer.parts
        hashes_only = t.hashes is None  # no chunk is asked for before the hash list verifies
        limit = m if hashes_only else t.pieces
        sources = sorted(t.sources.values(), key=lambda s: s.out - s.window)
        out: list = []
        for s in sources:
            free = int(s.window) - s.out
            room = MAX_INFLIGHT - len(t.inflight)
            free = min(free, room, MAX_WANT)
            if free <= 0 or (s.out and free < self._batch(s)):
                continue
            if s.out and now - s.asked_at < FGET_GAP_S:
                t.wake = min(t.wake, s.asked_at + FGET_GAP_S)  # the timer asks it then (next_deadline)
                continue
            picks = self._candidates(t, s, limit, free)
            if not picks and not hashes_only:
                picks = self._endgame(t, s, free)
            if not picks:
                continue
            for piece in picks:
                t.need[piece] = 0
                t.inflight.setdefault(piece, []).append((s.addr, now))
            s.out += len(picks)
            s.asked_at = now
            self.counters["file_requests_sent"] += 1
            out.append(Unicast(self._fget(t.offer.fid, picks, now + self._wall_offset), s.addr))
        return out

    @staticmethod
    def _batch(s: Source) -> int:
        """Pieces a source with requests out waits to have free before it is asked again: one FGET per
        piece would cost a datagram per chunk each way, and the neighbour's rate limit (relay.py) drops
        FGETs long before the chunks run out; a quarter of the window keeps it full between asks."""
        return max(1, min(MAX_WANT, int(s.window) // 4))

    def _candidates(self, t: Transfer, s: Source, limit: int, free: int) -> List[int]:
        """Up to ``free`` pieces ``s`` has and nobody was asked for, rarest first among a few from each of
        its ranges (a sample: scanning every piece per answer would cost more than the answer)."""
        need = t.need
        found: List[int] = []
        per_range = max(free, 4)
        # Each node starts its scan at its own point of the file (t.spread): fetchers of one source then
        # ask it for different pieces, and get the rest from each other, not all the same ones from it.
        start = t.spread % limit if limit and t.hashes is not None else 0
        for a, b in s.ranges:
            b = min(b, limit)
            taken = 0
            for lo, hi in ((max(a, start), b), (a, min(b, start))):
                i = lo
                while i < hi and taken < per_range:
                    i = need.find(1, i, hi)
                    if i < 0:
                        break
                    found.append(i)
                    taken += 1
                    i += 1
            if len(found) >= 4 * free:
                break
        if len(found) <= free:
            return found
        others = [o for o in t.sources.values() if o is not s]
        found.sort(key=lambda p: (sum(1 for o in others if o.has(p)), p))
        return sorted(found[:free])

    def _endgame(self, t: Transfer, s: Source, free: int) -> List[int]:
        """All that is left is asked for, and little is: ask ``s`` too for pieces another source has out."""
        if len(t.inflight) > ENDGAME_PIECES or t.pieces - t.count > ENDGAME_PIECES:
            return []
        picks = []
        for piece, asks in t.inflight.items():
            if len(asks) == 1 and asks[0][0] != s.addr and s.has(piece):
                picks.append(piece)
                if len(picks) >= free:
                    break
        for piece in picks:
            t.need[piece] = 1  # put back so _pump marks it asked of s as well
        return picks

    def _rate(self, t: Transfer, now: float) -> float:
        recent = [(when, b) for when, b in t.samples if now - when <= 3.0]
        if not recent:
            return 0.0
        # Over the time pieces have been coming, not since the start: a transfer that waited for a
        # source would otherwise show a fraction of its rate (and hours left) once they come.
        span = min(3.0, max(0.25, now - recent[0][0]))
        return sum(b for _, b in recent) / span

    def _progress(self, t: Transfer, now: float) -> FileProgress:
        o = t.offer
        have = min(t.have_bytes(), o.size)
        rate = self._rate(t, now)
        # No time left from the first fraction of a second (a hash-list part or two): it would say hours.
        left = (o.size - have) / rate if rate > 0 and now - t.started >= 1.0 else None
        return FileProgress(o.fid, o.name, have, o.size, rate, left)

    # -- datagrams ------------------------------------------------------------------------------------

    def _link(self, kind: str, body: str, extra: Dict[str, Any], wall: float) -> bytes:
        return encode(Message(self._new_mid(), round(wall, 3), 1, kind, self.label, "", body, extra))

    def _fget(self, fid: str, pieces: List[int], wall: float) -> bytes:
        return self._link("FGET", "", {"fid": fid, "want": pieces}, wall)

    def _fdata(self, fid: str, piece: int, data: bytes, now: float, wall: float) -> bytes:
        return self._link("FDATA", base64.b64encode(data).decode("ascii"), {"fid": fid, "i": piece}, wall)

    def _fhave(self, t: Transfer, wall: float) -> bytes:
        if t.state in ("own", "done"):
            ranges = [[0, t.pieces]]
        else:
            ranges = ranges_of(t.have)
        return self._link("FHAVE", "", {"fid": t.offer.fid, "have": ranges}, wall)


# -- names on disk -----------------------------------------------------------------------------------

_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*\u0080-\u009f\u200b-\u200f\u202a-\u202e\u2066-\u2069]')


def safe_name(offered: str) -> str:
    """The offered name as a plain base name, safe on Linux, macOS and Windows: no directory, no
    ``..``, no control, reserved or invisible direction characters, no device name; never empty."""
    base = re.split(r"[/\\]", offered)[-1]
    base = _BAD_CHARS.sub("_", base).strip(" .")
    stem = base.split(".")[0].upper().rstrip(" ")
    if stem in _RESERVED:
        base = "_" + base
    if not base or set(base) <= {"_", "."}:
        base = "file"
    if len(base.encode("utf-8")) > 200:
        stem, dot, ext = base.rpartition(".")
        if not dot or len(ext) > 16:
            stem, ext, dot = base, "", ""
        while len((stem + dot + ext).encode("utf-8")) > 200:
            stem = stem[:-1]
        base = stem + dot + ext
    return base


def numbered(name: str, n: int) -> str:
    """``name (n).ext``: the n-th alternative to a name that is taken."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name} ({n})"
    return f"{stem} ({n}).{ext}"
