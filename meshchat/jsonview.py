"""``meshchat --json`` events shown as the terminal console shows them, a line at a time.

For programs that run nodes with ``--json`` and show their output to people
(scripts/spawn_local_mesh.py): each event is turned back into the value the
node had and handed to the terminal console's own method, so a private line
says ``, encrypted``, a delivery ``✓ delivered``, and /why, /map and /trace
are the same tables, in both places, without a second copy of their wording.
An event this module does not know, or one it cannot read, is one readable
line, never a raw dict and never a traceback. Called from the caller's
thread; one ``JsonView`` per node (it remembers that node's label and its
files' names).
"""

import io
import json
from typing import Callable, Dict, List

from .console import TerminalConsole
from .commands import HELP
from .delivery import Delivered, Undelivered
from .files import FileDone, FileFailed, FileOffered, FileProgress, Offer
from .membership import PeerDown, PeerUp
from .relay import Pong
from .traceroute import TraceHop, TraceResult
from .wire import Message

MAX_FILE_NAMES = 256  # fid -> name, for the progress and failure events, which carry no name


class JsonView(TerminalConsole):
    """The terminal console without a terminal: ``lines(event)`` is what it would show for one
    JSON event, without the time and colour (the caller adds its own prefix)."""

    def __init__(self, name_of: Callable[[str], str] = lambda label: label) -> None:
        super().__init__(io.StringIO(), color=False, interactive=False)
        self.name_of = name_of
        # Only a node with a key checks signatures and seals direct messages: its ready event has a
        # fingerprint. The JSON says verified/encrypted false either way; the terminal says nothing
        # for a node that cannot tell, and so do we.
        self.checks = False
        self._out: List[str] = []
        self._file_names: Dict[str, str] = {}

    def _line(self, lead: str, body: str = "", replace_typed: str = "") -> None:
        self._out.append(lead + body)

    def lines(self, e: dict) -> List[str]:
        self._out = []
        show = _SHOW.get(e.get("event")) if isinstance(e, dict) else None
        try:
            if show is None:
                raise LookupError
            show(self, e)
        except (LookupError, TypeError, ValueError, AttributeError):
            self._out = []
            self.notice(unknown_line(e))
        return self._out

    def _tell(self, e: dict) -> object:
        """``verified`` as the terminal knows it: None where the node cannot tell."""
        return bool(e.get("verified")) if self.checks else None

    def _name(self, fid: str, name: object = None) -> str:
        if isinstance(name, str):
            if len(self._file_names) >= MAX_FILE_NAMES and fid not in self._file_names:
                del self._file_names[next(iter(self._file_names))]
            self._file_names[fid] = name
            return name
        return self._file_names.get(fid, fid[:6])

    def _ready(self, e: dict) -> None:
        self.checks = bool(e.get("fingerprint"))
        self.ready(e["node"], e.get("fingerprint") or "")

    def _chat(self, e: dict) -> None:
        extra = {"nick": e.get("nick") or ""}
        if e.get("part"):
            extra["part"] = e["part"]
        m = Message(e["mid"], float(e["ts"]), int(e["ttl"]), "CHAT", e["src"], e.get("dst") or "", e["body"], extra)
        self.chat(m, bool(e.get("late")), self._tell(e), e.get("sealed"),
                  e.get("encrypted") if self.checks and m.dst else None)

    def _sent(self, e: dict) -> None:
        m = Message(e["mid"], 0.0, 0, "CHAT", self.label, e.get("dst") or "", e["body"],
                    {"part": e["part"]} if e.get("part") else {})
        self.sent([m], to=self.name_of(m.dst) if m.dst else "", encrypted=e.get("encrypted"))

    def _notice(self, e: dict) -> None:
        if e["text"] == HELP:  # /help comes as a notice in JSON; the terminal shows it unmarked
            self.help()
            return
        for line in str(e["text"]).splitlines() or [""]:
            self.notice(line)

    def _error(self, e: dict) -> None:
        for line in str(e["error"]).splitlines() or [""]:
            self.error(line)

    def _file_offer(self, e: dict) -> None:
        offer = Offer(e["fid"], self._name(e["fid"], e["name"]), int(e["size"]), e.get("sha256", ""), "", 0, e["src"])
        self.file_event(FileOffered(offer, self._tell(e), bool(e.get("fetching"))))

    def _file_progress(self, e: dict) -> None:
        have, size, rate = int(e["have"]), int(e["size"]), float(e["rate"])
        left = (size - have) / rate if rate > 0 else None
        self.file_event(FileProgress(e["fid"], self._name(e["fid"], e.get("name")), have, size, rate, left))


def unknown_line(e: object) -> str:
    """``name: key value, key value`` for an event nobody taught us; nested values as compact JSON."""
    if not isinstance(e, dict):
        return json.dumps(e, separators=(",", ":"))[:500]
    fields = ", ".join(f"{k} {v if isinstance(v, (str, int, float)) else json.dumps(v, separators=(',', ':'))}"
                       for k, v in e.items() if k != "event")
    return f"{e.get('event', 'event')}: {fields}"[:500]


def _trace(e: dict) -> TraceResult:
    hops = tuple(TraceHop(int(h["hop"]), h["label"], float(h["rtt_ms"])) for h in e["hops"])
    return TraceResult(e["target"], e["mid"], hops, bool(e["complete"]))


def _record(e: dict) -> dict:
    return {k: v for k, v in e.items() if k != "event"}


# Every event JsonConsole writes (a test checks that none is missing), back to the terminal's method.
_SHOW: Dict[str, Callable[[JsonView, dict], None]] = {
    "ready": JsonView._ready,
    "chat": JsonView._chat,
    "sent": JsonView._sent,
    "notice": JsonView._notice,
    "error": JsonView._error,
    "whoami": lambda v, e: v.whoami(e["node"], e.get("nick") or "", e.get("fingerprint")),
    "delivered": lambda v, e: v.delivery(Delivered(e["mid"], e["dst"], int(e["tries"]), float(e["rtt_ms"]))),
    "undelivered": lambda v, e: v.delivery(Undelivered(e["mid"], e["dst"], int(e["tries"]), bool(e["held"]))),
    "history": lambda v, e: v.history(e["messages"]),
    "ping": lambda v, e: v.pinged([Message(e["mid"], 0.0, 0, "PING", v.label, e.get("dst") or "", "")]),
    "pong": lambda v, e: v.pong(Pong(e["src"], float(e["rtt_ms"]), e.get("mid", ""))),
    "stats": lambda v, e: v.stats(_record(e)),
    "peers": lambda v, e: v.peers(e["peers"]),
    "who": lambda v, e: v.who(e["nodes"]),
    "map": lambda v, e: v.map(_record(e)),
    "why": lambda v, e: v.why(_record(e)),
    "trace": lambda v, e: v.trace(_trace(e)),
    "files": lambda v, e: v.files(e["files"]),
    "file_offer": JsonView._file_offer,
    "file_progress": JsonView._file_progress,
    "file_done": lambda v, e: v.file_event(FileDone(e["fid"], v._name(e["fid"], e["name"]), e["path"],
                                                    int(e["size"]), e.get("sha256", ""))),
    "file_failed": lambda v, e: v.file_event(FileFailed(e["fid"], v._name(e["fid"], e.get("name")), e["reason"])),
    "peer_up": lambda v, e: v.peer_state(PeerUp(e["peer"], ("", 0), e.get("nick") or "")),
    "peer_down": lambda v, e: v.peer_state(PeerDown(e["peer"], ("", 0), e.get("nick") or "")),
}
