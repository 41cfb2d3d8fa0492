"""Membership: who our neighbours are, whether they are alive, who is in the mesh, how far, by which way.

Rules, so that a mesh of these (and of seed-design nodes) behaves:
1. A neighbour is an address that proved it is there: it echoed a token we
   sent to that address (a HELLO handshake). Tokens are an HMAC of the
   address and a 30-second epoch under a per-run secret, so nothing is kept
   for an address that has not proved itself, whatever a flood of forged
   sources says.
2. To an address that has not proved itself we send at most
   ``CHALLENGES_PER_ADDR`` HELLOs a minute (one, if it never sent a HELLO),
   never larger than the datagram that asked for it, and at most
   ``CHALLENGE_BUDGET_PER_S`` of them in all: a forged source gets back no
   more than it sent, and a flood of them a bounded trickle.
3. Configured peers are always neighbours and never evicted. One that has
   never sent us a HELLO (a node built from the seed README, or a
   listen-only client) keeps getting CHAT and PING and one probe a minute;
   nothing else. A neighbour that speaks HELLO is up while we hear from it,
   down after ``DOWN_AFTER_INTERVALS`` of its announced HELLO intervals of
   silence, never more than ``DOWN_AFTER_S`` (28.5 s), and up again as soon
   as anything arrives from it. A learned (not configured) neighbour that
   goes down is forgotten.
4. HELLOs back off from 1 s to 15 s while a link is stable, like SWIM's fixed
   probe period but cheaper when nothing changes, and each carries the
   longest gap until the next one, so the other side's timeout follows ours.
   A neighbour whose HELLO is overdue is suspected, as in SWIM: we ask it
   (a HELLO that must be answered) every ``SUSPECT_PROBE_S`` until it answers
   or is down, so a lost HELLO or two on a lossy link never takes a live
   neighbour down, and stable links cost one HELLO each way per 15 s.
   A node greets all its neighbours in one round (one wake-up, not one per
   neighbour): a HELLO due soon goes early with the others.
5. Every origin's distance in hops is learned from the first copy of its
   messages (``ttl0 - ttl + 1``), and the neighbour that copy came from is
   the next hop back to it. Those give the adaptive TTL and the routes of
   direct messages.
6. Nothing here touches a socket, a thread or a clock: ``now`` (monotonic)
   and ``wall`` are arguments; the node calls it under its one lock and
   drives ``tick`` from its select() timeout at ``next_deadline()``.
"""

import base64
import hashlib
import hmac
import random
import re
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from .bucket import new_bucket, take
from .wire import Addr, Message, WireError, decode, encode, format_addr, parse_addr

HELLO_MIN_S = 1.0
# Idle cost is wake-ups: a HELLO received wakes a process. 15 s apart on a stable link, with the
# suspicion probes below, is two-fifths fewer than 9 s with the same bound on detecting the dead.
HELLO_MAX_S = 15.0
DOWN_AFTER_INTERVALS = 3
DOWN_AFTER_S = 28.5  # silence after which a neighbour is down, whatever its interval: within 30 s at most
DOWN_MARGIN_S = 0.5
PEER_IVL_CAP_S = 15.5  # whatever a neighbour announces, it is suspected after this of silence
SUSPECT_GRACE_S = 1.0  # a HELLO this late is not yet suspicious (a loaded machine, a slow link)
SUSPECT_PROBE_S = 1.5  # a suspected neighbour is asked this often until it answers or is down
PROBE_LEGACY_S = 60.0  # a configured peer that never said HELLO: one probe a minute, no more
PROBE_DOWN_S = 5.0  # a configured HELLO speaker that is down: probed this often until it answers
ROUND_EARLY = 0.15  # a HELLO due within this share of its interval goes with the others now: one wake-up a round
ANSWER_EVERY_S = 0.5  # at most one immediate answer per neighbour per this long
ANNOUNCE_WAIT_S = 1.0  # a neighbour proved by a bare challenge is announced once its full HELLO comes
MAX_LEARNED_PER_HOST = 4  # learned neighbours from one (non-loopback) address
FULL_NOTICE_S = 60.0  # tell the user at most this often that a node that found us was refused
CHALLENGE_WINDOW_S = 60.0  # HELLOs to one unproven address: at most CHALLENGES_PER_ADDR in this long
CHALLENGES_PER_ADDR = 3  # answers to its HELLOs (two nodes that beacon at once challenge each other twice)
CHALLENGE_SLACK_BYTES = 16  # a challenge may outgrow what asked for it by this much (digits of ts)
CHALLENGE_BUDGET_PER_S = 20.0  # HELLOs to unproven addresses, all together (burst twice that)
TOKEN_EPOCH_S = 30.0  # a token is good for this epoch and the next
MAX_PROVEN = 4096  # unproven addresses remembered for the per-address challenge limit
MAX_MEMBERS = 4096  # nodes known in the mesh; the least recently heard go first
PRESENCE_MIN_S = 60.0
PRESENCE_MAX_S = 3600.0
# A bigger mesh announces less often, so the mesh-wide total stays flat: a flood costs about one
# datagram per link, and an idle 200-node mesh must stay under 2% of a core in all.
PRESENCE_PER_MEMBER_S = 15.0
PRESENCE_SETTLE_S = 1.5  # after a link comes up, announce once the others have come up too
PRESENCE_REPEAT_S = 60.0  # link changes announce at most this often
FLAP_S = 300.0  # a neighbour back up within this of going down flapped: not announced to the mesh again
MEMBER_FORGET_S = 2 * PRESENCE_MAX_S
ROUTE_FRESH_S = PRESENCE_MAX_S  # a route dies with its next hop; retries flood in any case
BEACON_FIRST_S = 1.0  # the first beacons, so that nodes started together find each other at once
BEACON_FIRST_COUNT = 3
BEACON_ALONE_S = 5.0  # no neighbour up yet
BEACON_S = 15.0  # once in a mesh: only newcomers need them
SILENT_AFTER_S = 3 * PRESENCE_MAX_S
TTL_SLACK = 2
DEFAULT_TTL = 8  # the seed's, until the mesh is known
MIN_AUTO_TTL = 2
MAX_NICK_CHARS = 32
MAX_MESH_CHARS = 32
MAX_TOKEN_CHARS = 32
MAX_CAPS = 32
RTT_SAMPLES = 8  # HELLO sequence numbers remembered per neighbour for round-trip times
LOSS_WINDOW = 64  # HELLOs over which loss is estimated
MAX_LINKS = 16  # neighbour labels a PRESENCE may carry (for /map); more, and the field is ignored
MAX_LINK_LABEL_CHARS = 64

# Kinds every seed-design node accepts; anything else goes only to neighbours that said HELLO.
BASE_KINDS = frozenset(("CHAT", "PING"))
LINK_KINDS = frozenset(("HELLO",))  # one hop only: never flooded, never in the seen cache
CAPS = ("HELLO", "PONG", "PRESENCE", "ROUTE", "TRACE")  # TRACE: traceroute.py


class PeerUp(NamedTuple):
    label: str
    addr: Addr
    nick: str


class PeerDown(NamedTuple):
    label: str
    addr: Addr
    nick: str


class Refused(NamedTuple):
    """A node that proved itself was refused a place: the user is told (at most once a minute)."""

    text: str


class Originate(NamedTuple):
    """Ask the relay to flood a message of ours (a presence announcement)."""

    kind: str
    body: str
    extra: Dict[str, Any]
    ttl: int


class Unicast(NamedTuple):
    """A link-local datagram for one address."""

    data: bytes
    addr: Addr


class Beacon(NamedTuple):
    """A datagram for the discovery group, on every interface we beacon on."""

    data: bytes


@dataclass(frozen=True)
class MembershipConfig:
    label: str
    mesh: str = "meshchat"
    nick: str = ""
    max_peers: int = 32
    peers_only: bool = False
    max_ttl: int = 16
    discover: bool = False  # beacon to the LAN's discovery group
    hello_max_s: float = HELLO_MAX_S  # tests shorten it to see a neighbour go down in a second
    caps: Tuple[str, ...] = CAPS  # what we say we speak (the delivery layer adds its own)
    announce: Tuple[Tuple[str, Any], ...] = ()  # more fields for our PRESENCE (our box key, signed with it)
    key: str = ""  # our identity key (secure extra): in our full HELLOs, so neighbours learn it at once
    fport: int = 0  # our bulk socket's port (file pieces come there, node.py), in our full HELLOs; 0: none


def valid_nick(text: object) -> bool:
    return (isinstance(text, str) and 0 < len(text) <= MAX_NICK_CHARS and text.isprintable()
            and not any(c in text for c in " @#:/\\") and text.strip() == text)


def tag_of(label: str) -> str:
    """A short tag, stable per label, that tells two nodes with one nick apart."""
    digest = zlib.crc32(label.encode("utf-8", "surrogatepass")).to_bytes(4, "big")
    return base64.b32encode(digest).decode("ascii")[:4].lower()


def display_name(label: str, nick: str) -> str:
    return f"{nick}#{tag_of(label)}" if nick else label


class Neighbour:
    __slots__ = ("addr", "configured", "speaks", "up", "label", "nick", "caps", "last_heard", "since",
                 "interval", "next_hello", "peer_ivl", "seq_out", "sent", "their_tok", "rx_seq",
                 "rx_expected", "rx_got", "srtt_ms", "rx_at", "answered_at", "untold", "probe_due", "key",
                 "fport", "bulk_off")

    def __init__(self, addr: Addr, configured: bool, now: float) -> None:
        self.addr = addr
        self.configured = configured
        self.speaks = False  # has sent us a HELLO at least once
        self.up = False
        self.label = format_addr(addr)
        self.nick = ""
        self.caps: frozenset = frozenset()
        self.last_heard: Optional[float] = None
        self.since = now
        self.interval = HELLO_MIN_S
        self.next_hello = now
        self.peer_ivl = HELLO_MAX_S
        self.seq_out = 0
        self.sent: Dict[int, float] = {}
        self.their_tok = ""
        self.rx_seq: Optional[int] = None
        self.rx_expected = 0
        self.rx_got = 0
        self.srtt_ms: Optional[float] = None
        self.rx_at = 0.0  # when their latest HELLO arrived, for the "held" of our answer
        self.answered_at = float("-inf")
        self.untold = False  # up, but its PeerUp waits for a HELLO that says its nick (at most ANNOUNCE_WAIT_S)
        self.probe_due = 0.0  # suspected (its HELLO overdue): the next ask not before this
        self.key = ""  # its identity key, from its HELLOs (told in /peers; pinned only from signed messages)
        self.fport = 0  # the port of its bulk socket, from its full HELLOs (0: none: its pieces go to addr)
        self.bulk_off = False  # the bulk path to or from it does not work: neither side uses it (give_up_bulk)

    def down_at(self) -> float:
        assert self.last_heard is not None
        return self.last_heard + min(DOWN_AFTER_INTERVALS * self.peer_ivl, DOWN_AFTER_S)

    def suspect_at(self) -> float:
        """When its next HELLO is overdue: we start asking (never after it would be down)."""
        assert self.last_heard is not None
        return max(self.last_heard + self.peer_ivl + SUSPECT_GRACE_S, self.probe_due)

    @property
    def state(self) -> str:
        if self.up:
            return "up"
        if not self.speaks:
            return "legacy" if self.last_heard is not None else "unknown"
        return "down"

    @property
    def loss(self) -> Optional[float]:
        if self.rx_expected < 2:
            return None
        return max(0.0, 1.0 - self.rx_got / self.rx_expected)


class Member:
    __slots__ = ("label", "nick", "hops", "last_seen", "via", "via_at", "caps", "announced", "gone", "links",
                 "presence")

    def __init__(self, label: str) -> None:
        self.label = label
        self.nick = ""
        self.caps: frozenset = frozenset()  # what it speaks, from its PRESENCE or HELLO
        self.announced = False  # it sent a PRESENCE or a HELLO: /who lists it (any src can be forged)
        self.gone = False  # it was our neighbour and went down (or said goodbye), unheard since
        self.hops: Optional[int] = None
        self.last_seen = 0.0
        self.via: Optional[Addr] = None
        self.via_at = 0.0
        self.links: Tuple[str, ...] = ()  # its up neighbours, as its last PRESENCE said (for /map only)
        # Its last PRESENCE as it signed it: served (ttl 1) to a neighbour that restarted and asks what
        # it missed (SINCE), so that it knows the mesh's names at once, not at their next announcement.
        self.presence: Optional[Message] = None


def _int(value: object, low: int, high: int) -> Optional[int]:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def _num(value: object, low: float, high: float) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
        return float(value)
    return None


def _token_text(value: object) -> Optional[str]:
    if isinstance(value, str) and 0 < len(value) <= MAX_TOKEN_CHARS and value.isalnum() and value.isascii():
        return value
    return None


class Hello(NamedTuple):
    """The fields of a HELLO, validated; anything malformed is None."""

    mesh: Optional[str]
    tok: Optional[str]
    echo: Optional[str]
    ask: bool
    bye: bool
    seq: Optional[int]
    ack: Optional[int]
    held_ms: float
    ivl: Optional[float]
    nick: str
    caps: frozenset
    key: str  # its identity key as it travels (secure extra), or ""
    fport: Optional[int]  # its bulk socket's port; None if absent, 0 if present but not a port


_KEY_TEXT = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, urlsafe base64 without padding (crypto.py)

_CAPSETS: Dict[frozenset, frozenset] = {}  # one object per distinct set: thousands of members share a few
MAX_CAPSETS = 256


def parse_caps(caps: object) -> frozenset:
    if isinstance(caps, list) and len(caps) <= MAX_CAPS and all(isinstance(c, str) and len(c) <= 16 for c in caps):
        found = frozenset(caps)
        shared = _CAPSETS.get(found)
        if shared is not None:
            return shared
        if len(_CAPSETS) < MAX_CAPSETS:  # past the bound (forged sets), each keeps its own
            _CAPSETS[found] = found
        return found
    return frozenset()


def parse_links(links: object) -> Optional[Tuple[str, ...]]:
    """A PRESENCE's ``links`` (labels of its up neighbours), or None if absent or malformed."""
    if not isinstance(links, list) or len(links) > MAX_LINKS:
        return None
    out = []
    for label in links:
        if not isinstance(label, str) or len(label) > MAX_LINK_LABEL_CHARS:
            return None
        try:
            parse_addr(label)
        except WireError:
            return None
        out.append(label)
    return tuple(dict.fromkeys(out))


def parse_hello(msg: Message) -> Hello:
    x = msg.extra
    mesh = x.get("mesh")
    if not (isinstance(mesh, str) and len(mesh) <= MAX_MESH_CHARS):
        mesh = None
    capset = parse_caps(x.get("caps"))
    nick = x.get("nick")
    key = x.get("key")
    return Hello(
        mesh=mesh,
        tok=_token_text(x.get("tok")),
        echo=_token_text(x.get("echo")),
        ask=x.get("ask") == 1,
        bye=x.get("bye") == 1,
        seq=_int(x.get("seq"), 0, 2**53),
        ack=_int(x.get("ack"), 0, 2**53),
        held_ms=_num(x.get("held"), 0.0, 1e7) or 0.0,
        ivl=_num(x.get("ivl"), 0.1, 60.0),
        nick=nick if valid_nick(nick) else "",
        caps=capset,
        key=key if isinstance(key, str) and _KEY_TEXT.fullmatch(key) else "",
        fport=None if "fport" not in x else (_int(x["fport"], 1, 65535) or 0),
    )


class Membership:
    def __init__(
        self,
        config: MembershipConfig,
        configured: Iterable[Addr] = (),
        secret: Optional[bytes] = None,
        new_mid: Callable[[], str] = lambda: uuid.uuid4().hex,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.config = config
        self.label = config.label
        self.nick = config.nick
        self._secret = secret if secret is not None else uuid.uuid4().bytes + uuid.uuid4().bytes
        self._new_mid = new_mid
        self._rng = rng or random.Random()
        self.neighbours: Dict[Addr, Neighbour] = {}
        self.members: Dict[str, Member] = {}
        self._challenged: Dict[Addr, List[float]] = {}  # unproven address -> [window start, HELLOs sent]
        self._budget = new_bucket(CHALLENGE_BUDGET_PER_S)  # HELLOs to unproven addresses, all together
        self.version = 0  # bumped whenever the flood targets (or a bulk port) change
        self._flood: Tuple[Addr, ...] = ()
        self._flood_ext: Tuple[Addr, ...] = ()
        self.addr_by_label: Dict[str, Addr] = {}
        self._presence_due: Optional[float] = None
        self._last_presence: Optional[float] = None
        self._known_since: Optional[float] = None  # when we first learned a distance
        self._beacon_due: Optional[float] = 0.0 if config.discover else None
        self._full_told: Optional[float] = None
        self._went_down: Dict[Addr, float] = {}  # when each neighbour last went down: a quick return is a flap
        self._beacons = 0
        self.counters = {"hello_sent": 0, "hello_received": 0, "challenges": 0, "peer_up": 0, "peer_down": 0,
                         "suspect_probes": 0, "fport_invalid": 0,
                         "bulk_given_up": 0}
        for addr in configured:
            self.add_configured(addr, 0.0)

    # -- the neighbour table -------------------------------------------------------

    def add_configured(self, addr: Addr, now: float) -> None:
        n = self.neighbours.get(addr)
        if n is None:
            n = self.neighbours[addr] = Neighbour(addr, True, now)
            n.next_hello = now
        n.configured = True
        self._changed()

    def _changed(self) -> None:
        ns = self.neighbours.values()
        self._flood = tuple(n.addr for n in ns if n.up or (n.configured and not n.speaks))
        self._flood_ext = tuple(n.addr for n in ns if n.up)
        self.addr_by_label = {n.label: n.addr for n in ns}
        self.version += 1

    def flood_targets(self, kind: str) -> Tuple[Addr, ...]:
        """Neighbours a message of ``kind`` may go to: seed-design peers get only CHAT and PING."""
        return self._flood if kind in BASE_KINDS else self._flood_ext

    def may_send(self, addr: Addr, kind: str) -> bool:
        """Whether ``addr`` takes ``kind``: only a neighbour that said HELLO takes more than CHAT and PING."""
        if kind in BASE_KINDS:
            return True
        n = self.neighbours.get(addr)
        return n is not None and n.speaks

    def _room(self, addr: Optional[Addr] = None) -> bool:
        """Room for one more learned neighbour (from ``addr``): under --max-peers, and, from another
        machine, under MAX_LEARNED_PER_HOST from one address, so one host's many ports cannot take
        every place (on loopback the nodes of one machine share an address)."""
        if len(self.neighbours) >= self.config.max_peers:
            return False
        if addr is None or addr[0].startswith("127."):
            return True
        same = sum(1 for n in self.neighbours.values() if not n.configured and n.addr[0] == addr[0])
        return same < MAX_LEARNED_PER_HOST

    # -- tokens ------------------------------------------------------------------------

    def _token(self, addr: Addr, epoch: int) -> str:
        mac = hmac.new(self._secret, f"{addr[0]}:{addr[1]}/{epoch}".encode(), hashlib.sha256)
        return mac.hexdigest()[:16]

    def _token_now(self, addr: Addr, now: float) -> str:
        return self._token(addr, int(now // TOKEN_EPOCH_S))

    def _proves(self, echo: Optional[str], addr: Addr, now: float) -> bool:
        if not echo:
            return False
        epoch = int(now // TOKEN_EPOCH_S)
        return any(hmac.compare_digest(echo, self._token(addr, e)) for e in (epoch, epoch - 1))

    # -- HELLOs out ----------------------------------------------------------------------

    def _hello(self, addr: Addr, now: float, wall: float, ask: bool, n: Optional[Neighbour],
               echo: str = "", full: bool = True, gap: Optional[float] = None) -> Unicast:
        """A HELLO for ``addr``; ``gap`` is the longest wait until our next one (the other side's timeout)."""
        extra: Dict[str, Any] = {"mesh": self.config.mesh, "tok": self._token_now(addr, now)}
        if n is not None:
            echo = echo or n.their_tok
        if echo:
            extra["echo"] = echo
        if ask:
            extra["ask"] = 1
        if full:
            extra["caps"] = list(self.config.caps)
            if self.config.key:
                extra["key"] = self.config.key
            if self.config.fport and not (n is not None and n.bulk_off):
                extra["fport"] = self.config.fport
            if self.nick:
                extra["nick"] = self.nick
            if n is not None:
                n.seq_out += 1
                extra["seq"] = n.seq_out
                n.sent[n.seq_out] = now
                if len(n.sent) > RTT_SAMPLES:
                    del n.sent[next(iter(n.sent))]
                if n.rx_seq is not None:
                    extra["ack"] = n.rx_seq
                    extra["held"] = round((now - n.rx_at) * 1000.0, 1)
                if gap is None:
                    gap = max(n.next_hello - now, 0.0)
                # A probe's next HELLO comes as soon as it is answered: never promise more than a link's longest gap.
                extra["ivl"] = round(min(gap, self.config.hello_max_s) + DOWN_MARGIN_S, 2)
        # Short mids and rounded times: a HELLO to a stranger must not outgrow the one that asked (rule 2).
        msg = Message(self._new_mid()[:12], round(wall, 2), 1, "HELLO", self.label, format_addr(addr), "", extra)
        self.counters["hello_sent"] += 1
        return Unicast(encode(msg), addr)

    def goodbye(self, now: float, wall: float) -> list:
        """HELLOs saying we are leaving, for every neighbour that is up (a clean stop)."""
        out = []
        for n in self.neighbours.values():
            if n.up and n.their_tok:
                hello = self._hello(n.addr, now, wall, ask=False, n=n, full=False)
                msg = decode(hello.data)
                out.append(Unicast(encode(msg._replace(extra=dict(msg.extra, bye=1))), n.addr))
        return out

    def beacon(self, now: float, wall: float) -> bytes:
        """A beacon for the discovery group: a HELLO to nobody in particular, asking to be answered."""
        extra = {"mesh": self.config.mesh, "tok": "b" + self._token_now(("0.0.0.0", 0), now)[:15], "ask": 1,
                 "caps": list(self.config.caps)}
        if self.nick:
            extra["nick"] = self.nick
        return encode(Message(self._new_mid()[:12], round(wall, 2), 1, "HELLO", self.label, "", "", extra))

    def _may_challenge(self, addr: Addr, size: int, now: float, reply_len: int) -> bool:
        """Rule 2: one small answer per unproven address per interval, under a total budget."""
        if reply_len > size + CHALLENGE_SLACK_BYTES:
            return False
        window = self._challenged.get(addr)
        if window is not None and now - window[0] >= CHALLENGE_WINDOW_S:
            window = None
        if window is not None and window[1] >= CHALLENGES_PER_ADDR:
            return False
        if window is None and len(self._challenged) >= MAX_PROVEN:
            return False
        if not take(self._budget, CHALLENGE_BUDGET_PER_S, now):
            return False
        if window is None:
            window = self._challenged[addr] = [now, 0]
        window[1] += 1
        self.counters["challenges"] += 1
        return True

    def stranger(self, addr: Addr, size: int, now: float, wall: float) -> list:
        """A datagram (not a HELLO) from an address that is not a neighbour: invite it, within rule 2."""
        if self.config.peers_only or addr in self.neighbours or addr in self._challenged or not self._room():
            return []
        hello = self._hello(addr, now, wall, ask=True, n=None, full=False)
        if not self._may_challenge(addr, size, now, len(hello.data)):
            self.counters["hello_sent"] -= 1
            return []
        return [hello]

    # -- HELLOs in ------------------------------------------------------------------------

    def hello_received(self, msg: Message, addr: Addr, size: int, now: float, wall: float) -> Tuple[list, str]:
        """A HELLO from ``addr``: actions, and the reason it was dropped ("" if handled)."""
        h = parse_hello(msg)
        if h.mesh is None or h.tok is None:
            return [], "malformed"
        if h.mesh != self.config.mesh:
            return [], "other_mesh"
        if msg.src == self.label:
            return [], "own"
        self.counters["hello_received"] += 1
        n = self.neighbours.get(addr)
        proven = self._proves(h.echo, addr, now)
        if n is None:
            if self.config.peers_only:
                return [], "not_peer"
            if not proven:
                if not h.ask or not self._room():
                    return [], "unproven"
                reply = self._hello(addr, now, wall, ask=True, n=None, echo=h.tok, full=False)
                if not self._may_challenge(addr, size, now, len(reply.data)):
                    self.counters["hello_sent"] -= 1
                    return [], "rate"
                return [reply], ""
            if not self._room(addr):
                return self._refused(addr, now), "unproven"  # no room: --max-peers
            n = self.neighbours[addr] = Neighbour(addr, False, now)
            self._challenged.pop(addr, None)
        actions: list = []
        n.last_heard = now
        n.their_tok = h.tok
        if n.label != msg.src:
            n.label = msg.src
            self._changed()
        if h.nick or (n.nick and h.caps):  # only a full HELLO (it has caps) says the nick is gone
            n.nick = h.nick
        if h.caps:
            n.caps = h.caps
            self._bulk_port(n, h.fport)
        if h.key:
            n.key = h.key
        if not n.speaks:
            n.speaks = True
            self._changed()
        if h.ivl is not None:
            n.peer_ivl = min(h.ivl, PEER_IVL_CAP_S)
        if h.seq is not None:
            self._count_seq(n, h.seq)
            n.rx_at = now
        if proven and h.ack is not None and h.ack in n.sent:
            rtt = max(0.0, (now - n.sent.pop(h.ack)) * 1000.0 - h.held_ms)
            n.srtt_ms = rtt if n.srtt_ms is None else 0.875 * n.srtt_ms + 0.125 * rtt
        if h.bye and proven:
            # It is leaving cleanly: down now, not after 20 s of silence.
            return (self._set_down(n, now) if n.up else []), ""
        if not n.up and (proven or n.configured):
            # A configured address is the user's word: its HELLO is enough (the handshake still runs).
            actions.extend(self._set_up(n, now))
        if (h.ask or not proven) and (proven or now - n.answered_at >= ANSWER_EVERY_S):
            # They want proof that we are here, or we want theirs: answer now. Only an answer that
            # asks in turn could loop, so only those are limited.
            n.answered_at = now
            actions.append(self._hello(addr, now, wall, ask=not proven, n=n))
        if n.untold and h.caps:
            actions.extend(self._announce(n))
        if msg.src and n.up:
            self._learn_member(msg.src, n.nick or None, 1, addr, now, n.caps or None)
        return actions, ""

    def _bulk_port(self, n: Neighbour, fport: Optional[int]) -> None:
        """A full HELLO says where its bulk socket is, or (no field: an older node) that it has none.
        A bad value is dropped (counted): its files then come to its main address, as to an older node."""
        if fport == 0:
            self.counters["fport_invalid"] += 1
        fport = 0 if n.bulk_off else fport or 0
        if fport != n.fport:
            n.fport = fport
            self._changed()  # the node rebuilds its bulk address maps

    def give_up_bulk(self, addr: Addr, now: float) -> bool:
        """We asked ``addr`` for pieces and none came to our bulk socket (a NAT or a firewall in the way):
        its pieces go to its main address, and our full HELLOs to it stop announcing our bulk port (the
        next goes at once), so it sends ours to our main address. False if already given up (or unknown)."""
        n = self.neighbours.get(addr)
        if n is None or n.bulk_off:
            return False
        n.bulk_off = True
        n.fport = 0
        n.next_hello = min(n.next_hello, now)
        self.counters["bulk_given_up"] += 1
        self._changed()
        return True

    def bulk_ports(self) -> Dict[Addr, int]:
        """Up neighbours that announced a bulk socket: their main address -> its port."""
        return {n.addr: n.fport for n in self.neighbours.values() if n.up and n.fport}

    def _refused(self, addr: Addr, now: float) -> list:
        if self._full_told is not None and now - self._full_told < FULL_NOTICE_S:
            return []
        self._full_told = now
        why = (f"{MAX_LEARNED_PER_HOST} already come from {addr[0]}" if len(self.neighbours) < self.config.max_peers
               else f"--max-peers {self.config.max_peers} reached")
        return [Refused(f"{format_addr(addr)} found us but was not taken as a neighbour ({why}); "
                        "it can still reach us, but gets nothing from us")]

    def _count_seq(self, n: Neighbour, seq: int) -> None:
        if n.rx_seq is None or seq < n.rx_seq - LOSS_WINDOW or seq > n.rx_seq + LOSS_WINDOW:
            n.rx_expected, n.rx_got = 1, 1  # a first HELLO, or they restarted
        elif seq > n.rx_seq:
            n.rx_expected += seq - n.rx_seq
            n.rx_got += 1
            if n.rx_expected > LOSS_WINDOW:  # forget slowly, so loss follows the link's present
                n.rx_expected //= 2
                n.rx_got //= 2
        else:
            return  # late or repeated: no news
        n.rx_seq = seq

    def _set_up(self, n: Neighbour, now: float) -> list:
        n.up = True
        n.since = now
        n.interval = min(HELLO_MIN_S, self.config.hello_max_s)
        # A full HELLO at once: a neighbour that proved us by a bare challenge learns our nick now.
        n.next_hello = now
        self._changed()
        self.counters["peer_up"] += 1
        went = self._went_down.pop(n.addr, None)
        if went is None or now - went >= FLAP_S:
            # A new link: announce ourselves (routes, nicks and caps change). A link that flapped
            # (a few HELLOs lost) changes nothing the mesh needs to hear about: no mesh-wide flood.
            self._schedule_presence(now)
        if not n.caps:  # nothing but a bare challenge from it yet: announce it with its nick, shortly
            n.untold = True
            return []
        return [PeerUp(n.label, n.addr, n.nick)]

    def _announce(self, n: Neighbour) -> list:
        n.untold = False
        return [PeerUp(n.label, n.addr, n.nick)] if n.up else []

    def _set_down(self, n: Neighbour, now: float) -> list:
        went = self._went_down
        went.pop(n.addr, None)
        if len(went) >= MAX_PROVEN:
            del went[next(iter(went))]  # the oldest goes: at worst a flap is announced
        went[n.addr] = now
        told = not n.untold  # never announced up: nothing to take back
        n.untold = False
        n.up = False
        n.since = now
        n.interval = PROBE_DOWN_S
        n.next_hello = now + PROBE_DOWN_S
        n.rx_seq = None
        n.sent.clear()
        n.srtt_ms = None
        if not n.configured:
            del self.neighbours[n.addr]
        for m in self.members.values():
            if m.via == n.addr:
                m.via = None
        gone = self.members.get(n.label)
        if gone is not None:
            gone.gone = True
        self._changed()
        self.counters["peer_down"] += 1
        return [PeerDown(n.label, n.addr, n.nick)] if told else []

    def heard(self, addr: Addr, now: float) -> list:
        """Anything at all arrived from ``addr``: a neighbour that was down is up again."""
        n = self.neighbours.get(addr)
        if n is None:
            return []
        n.last_heard = now
        if n.up or not n.speaks:
            return []
        return self._set_up(n, now)

    # -- what floods tell us -----------------------------------------------------------------

    def learn(self, msg: Message, addr: Addr, now: float, trusted: bool = True, age: Optional[float] = None) -> None:
        """The first copy of a flooded message: its origin is alive, this far, and reached through ``addr``.

        ``trusted`` False (a node that checks signatures, and this one is not verified): its
        distance and way are learned, not the nick, caps or links it claims. ``age`` (seconds): a
        copy served to us by a neighbour (a catch-up after a restart), old on purpose: what its origin
        says of itself is learned, not its distance, its way, nor that it is alive now."""
        src = msg.src
        if src == self.label:
            return
        x = msg.extra
        hops = nick = None
        if x and age is None:  # once per message: kept short
            ttl0 = x.get("ttl0")
            if type(ttl0) is int and msg.ttl <= ttl0 <= 255:
                hops = ttl0 - msg.ttl + 1
            if not trusted:
                x = None  # what it says of itself: not taken
        if x:
            nick = x.get("nick")
            if nick is not None:
                known = self.members.get(src)
                if (known is None or nick != known.nick) and not valid_nick(nick):
                    nick = None
        caps = parse_caps(x.get("caps")) if x and msg.kind in ("PRESENCE", "KEY") else None
        n = self.neighbours.get(addr)
        via = addr if n is not None and n.up and age is None else None
        known = self.members.get(src)
        seen = now if age is None else now - max(0.0, age)
        if known is not None and known.last_seen > seen:
            seen = known.last_seen
        self._learn_member(src, nick, hops, via, seen, caps)
        member = self.members[src]
        if x and msg.kind == "PRESENCE" and "links" in x:
            links = parse_links(x["links"])
            if links is not None:
                member.links = links
        if trusted and msg.kind == "PRESENCE" and not msg.dst and (
                member.presence is None or msg.ts > member.presence.ts):
            member.presence = msg

    def presences(self, limit: int) -> List[Message]:
        """The last PRESENCE of each member we know (newest last, at most ``limit``): names are the
        mesh's state, not its history, so even one older than what the asker last saw still counts."""
        out = sorted((m.presence for m in self.members.values() if m.presence is not None), key=lambda p: p.ts)
        return out[-limit:] if limit > 0 else []

    def _learn_member(self, label: str, nick: Optional[str], hops: Optional[int], via: Optional[Addr],
                      now: float, caps: Optional[frozenset] = None) -> None:
        m = self.members.pop(label, None)  # re-inserted at the end: the dict stays least recent first
        if m is None:
            if len(self.members) >= MAX_MEMBERS:
                del self.members[next(iter(self.members))]
            m = Member(label)
        self.members[label] = m
        m.last_seen = now
        m.gone = False
        if nick is not None:
            m.nick = nick
        if hops is not None:
            m.hops = hops
            if self._known_since is None:
                self._known_since = now
        if via is not None:
            m.via, m.via_at = via, now
        if caps:
            m.caps = caps
            m.announced = True

    # -- timers ---------------------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> list:
        actions: list = []
        for n in list(self.neighbours.values()):
            if n.untold and now >= n.since + ANNOUNCE_WAIT_S:
                actions.extend(self._announce(n))
            if n.up and n.last_heard is not None and now >= n.down_at():
                actions.extend(self._set_down(n, now))
            elif n.up and n.speaks and n.last_heard is not None and now >= n.suspect_at():
                n.probe_due = now + min(SUSPECT_PROBE_S, n.peer_ivl)
                self.counters["suspect_probes"] += 1
                actions.append(self._hello(n.addr, now, wall, ask=True, n=n))
        due = [n for n in self.neighbours.values() if now >= n.next_hello]
        if due:
            # A round: the up neighbours whose HELLO is due soon go now too, so that a node with k
            # neighbours wakes once per round to greet them, not k times.
            early = [n for n in self.neighbours.values()
                     if n.up and now < n.next_hello and now >= n.next_hello - ROUND_EARLY * n.interval]
            for n in due + early:
                gap = self._next_interval(n)
                n.next_hello = now + gap
                actions.append(self._hello(n.addr, now, wall, ask=not n.up, n=n, gap=gap))
        if self._presence_due is not None and now >= self._presence_due:
            actions.append(self._presence(now))
        if self._beacon_due is not None and now >= self._beacon_due:
            self._beacons += 1
            if self._beacons < BEACON_FIRST_COUNT:
                gap = BEACON_FIRST_S
            else:
                gap = BEACON_S if self._flood_ext else BEACON_ALONE_S
            self._beacon_due = now + gap * self._rng.uniform(0.75, 1.0)
            actions.append(Beacon(self.beacon(now, wall)))
        return actions

    def _next_interval(self, n: Neighbour) -> float:
        if n.up:
            n.interval = min(n.interval * 2.0, self.config.hello_max_s)
            return n.interval * self._rng.uniform(0.9, 1.0)  # jitter only ever shortens: ivl stays a bound
        return PROBE_DOWN_S if n.speaks else PROBE_LEGACY_S

    def next_deadline(self) -> Optional[float]:
        times = []
        for n in self.neighbours.values():
            times.append(n.next_hello)
            if n.untold:
                times.append(n.since + ANNOUNCE_WAIT_S)
            if n.up and n.last_heard is not None:
                times.append(n.down_at())
                if n.speaks:
                    times.append(n.suspect_at())
        if self._presence_due is not None:
            times.append(self._presence_due)
        if self._beacon_due is not None:
            times.append(self._beacon_due)
        return min(times) if times else None

    def expire(self, now: float) -> None:
        """The reaper's share: forget what is too old to matter."""
        for addr in [a for a, (t, _) in self._challenged.items() if now - t >= CHALLENGE_WINDOW_S]:
            del self._challenged[addr]
        for label in [k for k, m in self.members.items() if now - m.last_seen > MEMBER_FORGET_S]:
            del self.members[label]

    # -- presence ------------------------------------------------------------------------------

    def _presence_interval(self) -> float:
        return min(PRESENCE_MAX_S, max(PRESENCE_MIN_S, PRESENCE_PER_MEMBER_S * len(self.members)))

    def _schedule_presence(self, now: float) -> None:
        soon = now + PRESENCE_SETTLE_S
        if self._last_presence is not None:
            soon = max(soon, self._last_presence + PRESENCE_REPEAT_S)
        if self._presence_due is None or soon < self._presence_due:
            self._presence_due = soon

    def _presence(self, now: float) -> Originate:
        self._last_presence = now
        self._presence_due = now + self._presence_interval() * self._rng.uniform(0.8, 1.0)
        extra: Dict[str, Any] = {"caps": list(self.config.caps)}
        if self.nick:
            extra["nick"] = self.nick
        # Our up neighbours, so that every node can draw the mesh's links (/map); a few at most.
        extra["links"] = sorted(n.label for n in self.neighbours.values() if n.up)[:MAX_LINKS]
        extra.update(self.config.announce)
        return Originate("PRESENCE", "", extra, self.config.max_ttl)

    def set_nick(self, nick: str, now: float) -> None:
        self.nick = nick
        self._presence_due = now  # announce it at once
        for n in self.neighbours.values():
            if n.up:
                n.interval = HELLO_MIN_S
                n.next_hello = min(n.next_hello, now)

    # -- what the relay and the user ask ----------------------------------------------------------

    def ttl_for(self, dst: str) -> int:
        """Rule 5: the farthest known distance (or ``dst``'s) plus slack; the seed's 8 until known."""
        cap = self.config.max_ttl
        if self._known_since is None:
            return min(DEFAULT_TTL, cap)
        if dst:
            m = self.members.get(dst)
            if m is not None and m.hops is not None:
                return max(MIN_AUTO_TTL, min(cap, m.hops + TTL_SLACK))
        far = max((m.hops for m in self.members.values() if m.hops is not None), default=1)
        return max(MIN_AUTO_TTL, min(cap, far + TTL_SLACK))

    def next_hop(self, dst: str, now: float) -> Optional[Addr]:
        """The neighbour a direct message to ``dst`` goes through, if the way is known and alive."""
        for n in self.neighbours.values():
            if n.up and n.label == dst:
                return n.addr
        m = self.members.get(dst)
        if m is None or m.via is None or now - m.via_at > ROUTE_FRESH_S:
            return None
        n = self.neighbours.get(m.via)
        if n is None or not n.up:
            return None
        return n.addr

    def resolve(self, name: str) -> Tuple[Optional[str], str]:
        """A typed name (label, nick, or nick#tag) to a label, or an error saying why not."""
        try:
            parse_addr(name)
            return name, ""
        except WireError:
            pass
        nick, _, tag = name.partition("#")
        found = {}
        for label, nk in self._names():
            if nk and nk.lower() == nick.lower() and (not tag or tag_of(label) == tag.lower()):
                found[label] = nk
        if not found:
            if self.nick and self.nick.lower() == nick.lower() and (not tag or tag_of(self.label) == tag.lower()):
                return None, "that is this node"  # our own name: never in the tables above
            return None, f"no node called {name!r} is known; /who lists the nodes"
        if len(found) > 1:
            options = ", ".join(f"{display_name(lb, nk)} ({lb})" for lb, nk in sorted(found.items()))
            return None, f"{name!r} is ambiguous: {options}; use one of those"
        return next(iter(found)), ""

    def _names(self) -> List[Tuple[str, str]]:
        names = [(m.label, m.nick) for m in self.members.values()]
        names.extend((n.label, n.nick) for n in self.neighbours.values() if n.nick)
        return names

    def nick_of(self, label: str) -> str:
        m = self.members.get(label)
        if m is not None and m.nick:
            return m.nick
        addr = self.addr_by_label.get(label)
        n = self.neighbours.get(addr) if addr is not None else None
        return n.nick if n is not None else ""

    def is_up(self, addr: Addr) -> bool:
        n = self.neighbours.get(addr)
        return n is not None and n.up

    def label_caps(self, addr: Addr) -> Tuple[str, frozenset]:
        """A neighbour's label and what it speaks (KeyError if it is none)."""
        n = self.neighbours[addr]
        return n.label, n.caps

    def caps_of(self, label: str) -> Optional[frozenset]:
        """What the node ``label`` said it speaks (as a neighbour, or in its PRESENCE); None if unknown."""
        addr = self.addr_by_label.get(label)
        n = self.neighbours.get(addr) if addr is not None else None
        if n is not None and n.caps:
            return n.caps
        m = self.members.get(label)
        return m.caps if m is not None and m.caps else None

    def heard_within(self, label: str, now: float, seconds: float) -> bool:
        m = self.members.get(label)
        return m is not None and now - m.last_seen <= seconds

    def is_down(self, label: str) -> bool:
        """Whether ``label`` is a neighbour we know is down (a node we merely have not heard is not)."""
        addr = self.addr_by_label.get(label)
        n = self.neighbours.get(addr) if addr is not None else None
        if n is not None:
            return n.speaks and not n.up
        m = self.members.get(label)
        return m is not None and m.gone  # a learned neighbour that went down is forgotten as one

    def repair_neighbours(self) -> List[Tuple[Addr, str]]:
        """Up neighbours that speak REPAIR, as (addr, label): whom delivery may ask for a message."""
        return [(n.addr, n.label) for n in self.neighbours.values() if n.up and "REPAIR" in n.caps]

    def speaks(self, label: str, cap: str) -> Optional[bool]:
        """Whether the node ``label`` said it speaks ``cap``; None if we know nothing of what it speaks."""
        m = self.members.get(label)
        if m is None or not m.caps:
            return None
        return cap in m.caps

    def who(self, now: float) -> List[Dict[str, Any]]:
        rows: Dict[str, Dict[str, Any]] = {}
        for m in self.members.values():
            if not m.announced:
                continue  # a label seen only as a message's src: anyone can make those up by the thousand
            state = "alive" if now - m.last_seen < SILENT_AFTER_S else "silent"
            rows[m.label] = {"label": m.label, "nick": m.nick, "hops": m.hops,
                             "last_seen_s": round(now - m.last_seen, 1), "state": state}
        for n in self.neighbours.values():
            row = rows.setdefault(n.label, {"label": n.label, "nick": n.nick, "hops": 1, "last_seen_s": None,
                                            "state": ""})
            row["hops"] = 1
            row["nick"] = n.nick or row["nick"]
            row["state"] = "neighbour " + n.state
            if n.last_heard is not None:
                row["last_seen_s"] = round(now - n.last_heard, 1)
        rows.pop(self.label, None)
        me = {"label": self.label, "nick": self.nick, "hops": 0, "last_seen_s": 0.0, "state": "you"}
        return [me] + sorted(rows.values(), key=lambda r: (r["hops"] is None, r["hops"] or 0, r["label"]))

    def peer_rows(self, now: float) -> List[Dict[str, Any]]:
        rows = []
        for n in self.neighbours.values():
            rows.append({
                "addr": format_addr(n.addr), "label": n.label, "nick": n.nick, "configured": n.configured,
                "state": n.state,
                "last_heard_s": None if n.last_heard is None else round(now - n.last_heard, 1),
                "rtt_ms": None if n.srtt_ms is None else round(n.srtt_ms, 2),
                "loss": None if n.loss is None else round(n.loss, 3),
                "key": n.key or None,
            })
        return rows

    def mesh_map(self, now: float) -> Dict[str, Any]:
        """What /map draws: /who's nodes with the neighbour each is reached through (``via``) and the
        links each announced, and our neighbours' rows (state, rtt, loss)."""
        nodes = self.who(now)
        by_label = {m.label: m for m in self.members.values()}
        for row in nodes:
            m = by_label.get(row["label"])
            via = self.neighbours.get(m.via) if m is not None and m.via is not None else None
            row["via"] = via.label if via is not None and via.up else None
            row["links"] = list(m.links) if m is not None else []
        return {"label": self.label, "nodes": nodes, "neighbours": self.peer_rows(now)}
