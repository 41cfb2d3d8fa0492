"""What the user sees (what the user types is commands.py).

- ``TerminalConsole`` prints for people: colour per sender, a timestamp,
  text from the network made harmless, the prompt redrawn under each line.
- ``JsonConsole`` prints one JSON object per line for scripts and tests.

Both are called from the main thread, which also shows the node's events
(the socket thread queues them); each write happens whole under the
console's own lock.
"""

import contextlib
import functools
import json
import logging
import re
import shutil
import sys
import threading
import time
import unicodedata
import zlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, TextIO, Tuple, Union

from .commands import HELP
from .membership import PeerDown, PeerUp, Refused, display_name, valid_nick
from .delivery import Delivered, Undelivered
from .files import FileDone, FileFailed, FileOffered, FileProgress
from .meshmap import text_lines as map_lines
from .relay import MAX_PARTS, Display, Notice, Pong
from .traceroute import TraceResult
from .wire import Message

log = logging.getLogger(__name__)

PROMPT = "> "

MAX_COMBINING = 3  # combining marks kept after one character; more would pile up over other lines

# Never printed as they are: controls (Cc: C0, DEL, C1, which move the cursor or
# retitle the window), format characters (Cf: bidi marks, overrides and isolates,
# zero-width characters, BOM, soft hyphen, tag characters, interlinear annotation),
# line and paragraph separators (Zl, Zp), private use (Co), unassigned code points
# (Cn) and lone surrogates (Cs). Each could hide, reorder or fake text.
_UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs"))
_MARK_CATEGORIES = frozenset(("Mn", "Mc", "Me"))


def _ranges(points: List[int]) -> str:
    """Code points as the inside of a regex character class, one range per run."""
    out, i = [], 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        out.append(f"\\u{points[i]:04x}" if i == j else f"\\u{points[i]:04x}-\\u{points[j]:04x}")
        i = j + 1
    return "".join(out)


@functools.lru_cache(maxsize=None)
def _unsafe_pattern() -> "re.Pattern[str]":
    """Built on the first text that is not plain ASCII: the scan of the BMP takes
    about 20 ms, which a node that only ever shows ASCII never pays."""
    unsafe, marks = [], []
    for o in range(0x10000):
        category = unicodedata.category(chr(o))
        if category in _UNSAFE_CATEGORIES:
            unsafe.append(o)
        elif category in _MARK_CATEGORIES:
            marks.append(o)
    # One unsafe BMP character, or a run of combining marks and astral characters,
    # which _visible then looks at one by one (astral planes are mostly unassigned).
    return re.compile(f"(?P<bad>[{_ranges(unsafe)}])|[{_ranges(marks)}\\U00010000-\\U0010ffff]+")


def _escape(o: int) -> str:
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _visible(match: "re.Match[str]") -> str:
    text = match.group()
    if match.lastgroup == "bad":
        return _escape(ord(text))
    out, marks = [], 0  # the run follows a character that is not a mark
    for ch in text:
        category = unicodedata.category(ch)
        if category in _MARK_CATEGORIES:
            marks += 1
            out.append(ch if marks <= MAX_COMBINING else _escape(ord(ch)))
        else:
            marks = 0
            out.append(_escape(ord(ch)) if category in _UNSAFE_CATEGORIES else ch)
    return "".join(out)


def sanitize(text: str) -> str:
    """Text from the network, made safe to print: whatever could hide, move or fake
    text is shown as an escape (``\\x1b``, ``\\u202e``, ``\\U000e0041``), and
    combining marks beyond MAX_COMBINING after one character too."""
    if text.isascii() and text.isprintable():
        return text
    return _unsafe_pattern().sub(_visible, text)


def _char_width(ch: str) -> int:
    if ch < "\u0300":
        return 1
    if unicodedata.category(ch) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


_SGR = re.compile("(\x1b\\[[0-9;]*m)")  # our colour codes; network text has none once sanitized


def text_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: colour codes none, wide characters two."""
    if "\x1b" in text:
        text = _SGR.sub("", text)
    if text.isascii():
        return len(text)
    return sum(_char_width(ch) for ch in text)


def wrap(text: str, width: int, indent: int) -> str:
    """``text`` in rows of at most ``width`` columns; rows after the first start with
    ``indent`` spaces, so that they never look like the start of a message.

    A row is cut after its last space past the indent, else between characters
    (never before a zero-width mark); colour codes take no room."""
    if text.isascii() and (len(text) <= width or text_width(text) <= width):  # colour codes take no room
        return text
    out: List[str] = []
    col = 0
    space_at, space_col = -1, 0  # where in ``out`` the row may be cut, and the column there
    for k, piece in enumerate(_SGR.split(text)):
        if k % 2:  # a colour code
            out.append(piece)
            continue
        for ch in piece:
            w = _char_width(ch)
            if col + w > width and col > indent:
                if space_at >= 0:
                    out.insert(space_at, "\n" + " " * indent)
                    col = indent + col - space_col
                    space_at = -1
                if col + w > width:
                    out.append("\n" + " " * indent)
                    col = indent
            out.append(ch)
            col += w
            if ch == " " and col > indent:
                space_at, space_col = len(out), col
    return "".join(out)


def part_of(m: Message) -> Optional[Tuple[int, int]]:
    """``(i, n)`` if ``m`` says it is part i of n of a longer line; anything malformed is absent.

    Checked here, where it is shown: the extra fields from the network are
    otherwise relayed untouched."""
    part = m.extra.get("part") if m.extra else None
    if not isinstance(part, (list, tuple)) or len(part) != 2:
        return None
    i, n = part
    if type(i) is not int or type(n) is not int or not 1 <= i <= n <= MAX_PARTS:
        return None
    return i, n


def _encodable(text: str, encoding: Optional[str]) -> str:
    """``text`` with what ``encoding`` cannot write as backslash escapes (ASCII if unknown)."""
    try:
        return text.encode(encoding or "ascii", "backslashreplace").decode(encoding or "ascii")
    except (LookupError, UnicodeError):
        return text.encode("ascii", "backslashreplace").decode("ascii")


def nick_of(m: Message) -> str:
    """The nick ``m`` carries (its sender's, as it says), or "" if none or not a valid one."""
    nick = m.extra.get("nick") if m.extra else None
    return nick if valid_nick(nick) else ""


class Console:
    """Shared by both consoles: one lock, and a stream that may break under us."""

    def __init__(self, stream: TextIO, on_broken: Callable[[], None] = lambda: None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._on_broken = on_broken
        self.broken = False
        self._held = False  # inside batch(): written, flushed once at its end

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Show several events with one flush (one write to the terminal or pipe, not one each)."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self._write("")

    def _write(self, text: str) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                try:
                    self._stream.write(text)
                except UnicodeEncodeError:
                    # A lone surrogate, or a character the stream's encoding lacks (an
                    # ASCII or cp1252 stdout): shown as escapes, never a broken console.
                    self._stream.write(_encodable(text, getattr(self._stream, "encoding", None)))
                if not self._held:
                    self._stream.flush()
            except (OSError, ValueError) as e:  # closed or broken pipe
                self.broken = True
                log.debug("stdout is gone: %s", e)
                self._on_broken()

    def show(self, event: object) -> None:
        """An event from the node."""
        if isinstance(event, Display):
            self.chat(event.message, event.late, event.verified, event.sealed, event.encrypted)
        elif isinstance(event, (Delivered, Undelivered)):
            self.delivery(event)
        elif isinstance(event, Pong):
            self.pong(event)
        elif isinstance(event, Notice):
            self.notice(event.text)
        elif isinstance(event, (PeerUp, PeerDown)):
            self.peer_state(event)
        elif isinstance(event, Refused):
            self.notice(event.text)
        elif isinstance(event, TraceResult):
            self.trace(event)
        elif isinstance(event, (FileOffered, FileProgress, FileDone, FileFailed)):
            self.file_event(event)
        else:
            self.error(f"the node stopped: {event}")


# What json.dumps(obj) does with its defaults, without checking its arguments on every call.
_to_json = json.JSONEncoder().encode


class JsonConsole(Console):
    """One JSON object per line on stdout. ASCII-only, so safe in any terminal."""

    def peer_state(self, e: "Union[PeerUp, PeerDown]") -> None:
        self.emit("peer_up" if isinstance(e, PeerUp) else "peer_down", peer=e.label, nick=e.nick)

    def emit(self, event: str, _fields: Optional[Dict[str, object]] = None, **fields: object) -> None:
        """One event line; its fields as keywords, or as a dict made in their order (``chat``)."""
        self._write(_to_json({"event": event, **(fields if _fields is None else _fields)}) + "\n")

    def ready(self, label: str, identity: str = "") -> None:
        self.emit("ready", node=label, **({"fingerprint": identity.split(" (")[0]} if identity else {}))

    def chat(self, m: Message, late: bool = False, verified: Optional[bool] = None,
             sealed: Optional[bool] = None, encrypted: Optional[bool] = None) -> None:
        # The line for every message shown: one dict, made in its order, and the C encoder, once.
        line = {"mid": m.mid, "src": m.src, "nick": nick_of(m) if m.extra else "", "dst": m.dst,
                "body": m.body, "ts": m.ts, "ttl": m.ttl, "verified": bool(verified)}
        if m.extra:
            part = part_of(m)
            if part:
                line["part"] = list(part)
        if late:
            line["late"] = True
        if sealed is not None:  # a closed mesh: whether it came sealed under the network key
            line["sealed"] = sealed
        if m.dst:
            line["encrypted"] = bool(encrypted)
        self.emit("chat", line)

    def whoami(self, label: str, nick: str, fingerprint: Optional[str]) -> None:
        self.emit("whoami", node=label, nick=nick, fingerprint=fingerprint)

    def delivery(self, e: "Union[Delivered, Undelivered]") -> None:
        if isinstance(e, Delivered):
            self.emit("delivered", mid=e.mid, dst=e.dst, tries=e.tries, rtt_ms=e.rtt_ms)
        else:
            self.emit("undelivered", mid=e.mid, dst=e.dst, tries=e.tries, held=e.held)

    def history(self, rows: List[dict], replay: bool = False) -> None:
        if not replay:  # at start, history is for people; scripts have /history
            self.emit("history", messages=rows)

    def sent(self, messages: Iterable[Message], encrypted: Optional[bool] = None) -> None:
        """``encrypted``: for direct messages, sealed end to end (or held until they can be)."""
        for m in messages:
            part = part_of(m)
            extra: Dict[str, object] = {"part": list(part)} if part else {}
            if m.dst and encrypted is not None:
                extra["encrypted"] = encrypted
            self.emit("sent", mid=m.mid, dst=m.dst, body=m.body, **extra)

    def pinged(self, messages: Iterable[Message]) -> None:
        for m in messages:
            self.emit("ping", mid=m.mid, dst=m.dst)

    def pong(self, p: Pong) -> None:
        self.emit("pong", src=p.src, rtt_ms=round(p.rtt_ms, 3), mid=p.mid)

    def error(self, text: str) -> None:
        self.emit("error", error=text)

    def notice(self, text: str) -> None:
        self.emit("notice", text=text)

    def help(self) -> None:
        self.emit("notice", text=HELP)

    def stats(self, counters: dict) -> None:
        self.emit("stats", **counters)

    def peers(self, rows: List[dict]) -> None:
        self.emit("peers", peers=rows)

    def who(self, rows: List[dict]) -> None:
        self.emit("who", nodes=rows)

    def map(self, snapshot: dict) -> None:
        self.emit("map", **snapshot)

    def why(self, record: dict) -> None:
        self.emit("why", **record)

    def file_event(self, e: object) -> None:
        if isinstance(e, FileOffered):
            o = e.offer
            self.emit("file_offer", fid=o.fid, name=o.name, size=o.size, src=o.src, sha256=o.sha,
                      verified=bool(e.verified), fetching=e.fetching)
        elif isinstance(e, FileProgress):
            self.emit("file_progress", fid=e.fid, have=e.have, size=e.size, rate=round(e.rate))
        elif isinstance(e, FileDone):
            self.emit("file_done", fid=e.fid, name=e.name, path=e.path, size=e.size, sha256=e.sha)
        elif isinstance(e, FileFailed):
            self.emit("file_failed", fid=e.fid, reason=e.reason)

    def files(self, rows: List[dict]) -> None:
        self.emit("files", files=rows)

    def trace(self, r: TraceResult) -> None:
        self.emit("trace", target=r.target, mid=r.mid, complete=r.complete,
                  hops=[{"hop": h.hop, "label": h.label, "rtt_ms": h.rtt_ms} for h in r.hops])


# Sender colours: never the magenta of "(private)", the yellow of notices or the
# red of errors, nor their light variants, so a sender cannot pass for either.
_PALETTE = ("CYAN", "GREEN", "BLUE", "LIGHTCYAN_EX", "LIGHTGREEN_EX", "LIGHTBLUE_EX")


WHO_CACHE_MAX = 1024  # senders' names as shown, kept made


def terminal_columns() -> int:
    return shutil.get_terminal_size((80, 24)).columns


class _Plain:
    """Colour codes that are all empty, for pipes and NO_COLOR."""

    def __getattr__(self, name: str) -> str:
        return ""


class TerminalConsole(Console):
    """Lines for people. ``interactive`` redraws the prompt; ``color`` uses colorama.

    Every line is cut to the terminal's width here, continuation rows indented,
    so that a long body never wraps into something that looks like another
    sender's line; the prompt and what is being typed (``get_typed``) are
    cleared over as many rows as they take and drawn again under each line."""

    def __init__(
        self,
        stream: TextIO,
        color: bool,
        interactive: bool,
        on_broken: Callable[[], None] = lambda: None,
        get_typed: Callable[[], str] = lambda: "",
        columns: Callable[[], int] = terminal_columns,
    ) -> None:
        super().__init__(stream, on_broken)
        # A label to the name people know it by (nick#tag); the CLI sets it once the node runs.
        self.name_of: Callable[[str], str] = lambda label: label
        self.interactive = interactive
        self.reading = False  # the input thread sets this while it waits for a line
        self._get_typed = get_typed
        self._columns = columns
        if color:
            import colorama

            fix = getattr(colorama, "just_fix_windows_console", None)
            if fix is not None:
                fix()
            else:
                colorama.init()
            self._fore, self._style = colorama.Fore, colorama.Style
        else:
            self._fore = self._style = _Plain()
        self.label = ""
        self._progress_shown: Dict[str, float] = {}  # fid -> when its last progress line was shown
        # Interactive: one row per active transfer just above the prompt, redrawn in place; every
        # line printed goes above them (_line clears and redraws them with the prompt).
        self._status: Dict[str, str] = {}  # fid -> its progress text
        self._status_rows = 0  # rows of them on the screen now
        self._who_cache: Dict[Tuple[str, str], str] = {}

    def _color_of(self, label: str) -> str:
        return getattr(self._fore, _PALETTE[zlib.crc32(label.encode("utf-8", "replace")) % len(_PALETTE)])

    def _line(self, lead: str, body: str = "", replace_typed: str = "") -> None:
        """One line: ``lead`` (who, marks) then ``body``, wrapped under the body's start.

        ``replace_typed``: the line the user just entered, whose echo (prompt
        included) is on the rows above the cursor and is written over."""
        stamp = f"{self._style.DIM}{time.strftime('%H:%M:%S')}{self._style.RESET_ALL} "
        columns = max(20, self._columns())
        head = stamp + lead
        # One column spare: some terminals (Windows) wrap as soon as the last column is written.
        text = wrap(head + body, columns - 1, min(text_width(head), columns // 2))
        if not self.interactive:
            self._write(text + "\n")
            return
        typed = self._get_typed() if self.reading else ""
        if replace_typed:
            up = _rows_below_start(PROMPT + replace_typed, columns) + 1  # Enter moved down one more
        elif self.reading:
            up = _rows_below_start(PROMPT + typed, columns)
        else:
            up = 0
        self._write(self._redraw_below(up, text + "\n", typed, columns))

    def _redraw_below(self, up: int, text: str, typed: str, columns: int) -> str:
        """Up over the progress rows and the prompt, clear, ``text``, then progress rows and prompt again."""
        up += self._status_rows
        rows = list(self._status.values())
        if len(rows) > MAX_STATUS_ROWS:
            rows = rows[:MAX_STATUS_ROWS - 1] + [f"and {len(rows) - MAX_STATUS_ROWS + 1} more transfers (/files)"]
        status = "".join(fit(row, columns - 1) + "\n" for row in rows)
        self._status_rows = len(rows)
        tail = ""
        if self.reading:
            tail = PROMPT + typed
            if text_width(tail) % columns == 0:
                tail += " \r"  # as readline does: onto the next row, where it counts the cursor
        return (f"\x1b[{up}A" if up else "") + "\r\x1b[J" + text + status + tail

    def entered(self, typed: str) -> None:
        """A command was entered (no line of ours takes its echo's place): with progress rows on the
        screen, the echo is drawn again above them as an ordinary line, so the rows and the prompt
        stay under it and what is printed next lands below them, not over the echo."""
        if not self.interactive or not self._status_rows:
            return
        columns = max(20, self._columns())
        up = _rows_below_start(PROMPT + typed, columns) + 1  # Enter moved down one more
        now = self._get_typed() if self.reading else ""
        self._write(self._redraw_below(up, PROMPT + typed + "\n", now, columns))

    def leave(self) -> None:
        """Stopping: the progress rows and the prompt are wiped, so the shell's prompt comes on a
        clean row (a Ctrl-C must not leave a half-drawn transfer above it)."""
        if not self.interactive or not (self._status_rows or self.reading):
            return
        columns = max(20, self._columns())
        up = self._status_rows + (_rows_below_start(PROMPT + self._get_typed(), columns) if self.reading else 0)
        self._status.clear()
        self._status_rows = 0
        self._write((f"\x1b[{up}A" if up else "") + "\r\x1b[J")

    def _redraw_status(self) -> None:
        """The progress rows changed: draw them again in place, and the prompt under them."""
        columns = max(20, self._columns())
        typed = self._get_typed() if self.reading else ""
        up = _rows_below_start(PROMPT + typed, columns) if self.reading else 0
        self._write(self._redraw_below(up, "", typed, columns))

    def _who(self, label: str, nick: str = "") -> str:
        # The colour and the tag follow the label: two "alice"s differ in both. Made once per
        # sender and nick (a bounded cache: a line per message must not hash a label each time).
        who = self._who_cache.get((label, nick))
        if who is None:
            name = sanitize(display_name(label, nick))
            who = f"{self._color_of(label)}{self._style.BRIGHT}<{name}>{self._style.RESET_ALL}"
            if len(self._who_cache) >= WHO_CACHE_MAX:
                self._who_cache.clear()
            self._who_cache[(label, nick)] = who
        return who

    def _part(self, m: Message) -> str:
        part = part_of(m)
        return f"{self._style.DIM}({part[0]}/{part[1]}){self._style.RESET_ALL} " if part else ""

    def ready(self, label: str, identity: str = "") -> None:
        """``identity``: "FINGERPRINT (where its key is)", for a node that signs."""
        self.label = label
        if self.interactive:
            self.notice(f"meshchat node {label} is up. Type a line to send it; /help for commands.")
        else:
            self.notice(f"meshchat node {label} is up.")
        if identity:
            self.notice(f"your fingerprint: {identity}")

    def chat(self, m: Message, late: bool = False, verified: Optional[bool] = None,
             sealed: Optional[bool] = None, encrypted: Optional[bool] = None) -> None:
        body = sanitize(m.body)
        # Only a node that checks signatures can say a sender is unverified (a seed-design node, or a
        # signature stripped on the way): then the name is not proof of who wrote it.
        unverified = f"{self._fore.RED}(unverified){self._style.RESET_ALL} " if verified is False else ""
        # A late message (repaired, or caught up after a restart) says when it was written.
        when = f"{self._style.DIM}(late, sent {time.strftime('%H:%M:%S', time.localtime(m.ts))}){self._style.RESET_ALL} " \
            if late else ""
        if sealed is False:  # --network-key-optional let it in unsealed: anyone could have sent it
            when = f"{self._fore.RED}{self._style.BRIGHT}(not sealed){self._style.RESET_ALL} " + when
        if m.dst:
            mark = f"{self._fore.MAGENTA}{self._style.BRIGHT}(private{_sealed(encrypted)}){self._style.RESET_ALL}"
            self._line(f"{self._who(m.src, nick_of(m))} {unverified}{mark} {when}{self._part(m)}",
                       f"{self._fore.MAGENTA}{body}{self._style.RESET_ALL}")
        else:
            self._line(f"{self._who(m.src, nick_of(m))} {unverified}{when}{self._part(m)}", body)

    def whoami(self, label: str, nick: str, fingerprint: Optional[str]) -> None:
        fp = f"fingerprint {fingerprint}" if fingerprint else "no key (pip install 'meshchat[secure]' for one)"
        shown = display_name(label, nick)
        self.notice(f"you are {shown}{f' ({label})' if shown != label else ''}, {fp}")

    def delivery(self, e: "Union[Delivered, Undelivered]") -> None:
        to = sanitize(self.name_of(e.dst))
        if isinstance(e, Delivered):
            tries = f", {e.tries} tries" if e.tries > 1 else ""
            self._line(f"{self._fore.GREEN}\u2713 ", f"delivered to {to} ({e.rtt_ms:.0f} ms{tries})"
                       f"{self._style.RESET_ALL}")
        elif e.held:
            self.notice(f"not delivered to {to} yet ({e.tries} {'try' if e.tries == 1 else 'tries'}): "
                        "kept, and sent as soon as it can be (when it is heard from, or when its key comes)")
        else:
            self.error(f"gave up on a message to {to}: not delivered in time, or the outbox was full")

    def history(self, rows: List[dict], replay: bool = False) -> None:
        """Messages from history: dimmed, with their date, so they are not taken for new ones."""
        if not rows:
            if not replay:
                self.notice("no history yet")
            return
        if replay:
            self.notice(f"the last {len(rows)} message{'s' if len(rows) != 1 else ''}, from history:")
        for r in rows:
            when = time.strftime("%m-%d %H:%M", time.localtime(r["ts"]))
            name = self.name_of(r["src"])
            if name == r["src"] and valid_nick(r.get("nick")):  # the mesh does not know it yet: as it said
                name = display_name(r["src"], r["nick"])
            who = "you" if r["src"] == self.label else sanitize(name)
            if not r["dst"]:
                to = ""
            elif r["dst"] == self.label:
                to = " (private)"
            else:
                to = f" (private to {sanitize(self.name_of(r['dst']))})"
            self._line(f"{self._style.DIM}[{when}] <{who}>{to} ", f"{sanitize(r['body'])}{self._style.RESET_ALL}")

    def sent(self, messages: Iterable[Message], replace_typed: str = "", to: str = "",
             encrypted: Optional[bool] = None) -> None:
        """Our own messages; ``replace_typed`` is the typed line whose echo they replace; ``to``
        the name of a direct message's destination (nick#tag), if the mesh knows its nick;
        ``encrypted``: a direct one is sealed end to end (True) or in clear (False)."""
        for i, m in enumerate(messages):
            you = f"{self._style.BRIGHT}<you>{self._style.RESET_ALL}"
            body = sanitize(m.body)
            if m.dst:
                mark = (f"{self._fore.MAGENTA}{self._style.BRIGHT}(private to {sanitize(to or m.dst)}"
                        f"{_sealed(encrypted)}){self._style.RESET_ALL}")
                lead, text = f"{you} {mark} {self._part(m)}", f"{self._fore.MAGENTA}{body}{self._style.RESET_ALL}"
            else:
                lead, text = f"{you} {self._part(m)}", body
            self._line(lead, text, replace_typed=replace_typed if i == 0 else "")

    def pinged(self, messages: Iterable[Message]) -> None:
        for m in messages:
            self.notice(f"ping sent to {self.name_of(m.dst) if m.dst else 'every node'}")

    def pong(self, p: Pong) -> None:
        self.notice(f"pong from {self.name_of(p.src)}: {p.rtt_ms:.1f} ms")

    def peer_state(self, e: "Union[PeerUp, PeerDown]") -> None:
        name = sanitize(display_name(e.label, e.nick))
        where = f" ({sanitize(e.label)})" if e.nick else ""
        self.notice(f"neighbour {name}{where} is {'up' if isinstance(e, PeerUp) else 'down'}")

    def notice(self, text: str) -> None:
        self._line(f"{self._fore.YELLOW}* ", f"{sanitize(text)}{self._style.RESET_ALL}")

    def error(self, text: str) -> None:
        self._line(f"{self._fore.RED}{self._style.BRIGHT}! ", f"{sanitize(text)}{self._style.RESET_ALL}")

    def help(self) -> None:
        for line in HELP.splitlines():
            self._line("", line)

    def stats(self, c: dict) -> None:
        for line in stats_lines(c):
            self.notice(line)

    def peers(self, rows: List[dict]) -> None:
        for line in peer_lines(rows):
            self.notice(line)

    def who(self, rows: List[dict]) -> None:
        for line in who_lines(rows):
            self.notice(line)

    def map(self, snapshot: dict) -> None:
        for line in map_lines(snapshot):
            self._line("", sanitize(line))


    def why(self, record: dict) -> None:
        for line in why_lines(record, self.name_of):
            self.notice(line)

    def file_event(self, e: object) -> None:
        """Offers, the end of each transfer, and a progress line per transfer at most every
        TERMINAL_PROGRESS_S (a line, not a redraw: it must not fight the prompt and the chat)."""
        if isinstance(e, FileOffered):
            o = e.offer
            what = ("fetching it" if e.fetching else "/accept " + o.fid[:6] + " to fetch it")
            mine = o.src == getattr(self, "label", None)
            only = "" if mine or not o.dst else (" to you only, end-to-end encrypted" if o.key else
                                                 " to you only, not encrypted")
            self.notice(f"{'you offer' if mine else self.name_of(o.src) + ' offers'} {o.name!r} "
                        f"({human_bytes(o.size)}, id {o.fid[:6]}){only}" + ("" if mine else f": {what}"
                        + ("" if e.verified is not False else " (unverified sender)")))
        elif isinstance(e, FileProgress):
            # A row redrawn in place above the prompt (a few times a second), or a line now and then.
            last = self._progress_shown.get(e.fid, float("-inf"))
            now = time.monotonic()
            if e.have < e.size and now - last < (STATUS_REDRAW_S if self.interactive else TERMINAL_PROGRESS_S):
                return
            self._progress_shown[e.fid] = now
            if len(self._progress_shown) > 64:
                self._progress_shown.pop(next(iter(self._progress_shown)))
            if not self.interactive:
                self.notice(progress_text(e))
            elif e.have >= e.size:
                self._status.pop(e.fid, None)  # FileDone says the rest, as a line
                self._redraw_status()
            else:
                self._status[e.fid] = sanitize(progress_text(e))
                self._redraw_status()
        elif isinstance(e, FileDone):
            self._progress_shown.pop(e.fid, None)
            self._status.pop(e.fid, None)
            self.notice(f"{e.name!r} is complete and verified: {e.path}")
        elif isinstance(e, FileFailed):
            self._progress_shown.pop(e.fid, None)
            self._status.pop(e.fid, None)
            if e.reason == "cancelled":  # the user's own doing: said plainly, with the way back
                self.notice(f"file {e.name!r} ({e.fid[:6]}) cancelled; /accept {e.fid[:6]} fetches it again")
            else:
                self.error(f"file {e.name!r} ({e.fid[:6]}) failed: {e.reason}; /accept {e.fid[:6]} tries again")

    def files(self, rows: List[dict]) -> None:
        if not rows:
            self.notice("no files yet: /send PATH offers one")
        for r in rows:
            have = f"{100 * r['have'] // r['size']}%" if r["size"] else "100%"
            self.notice(f"{r['fid'][:6]}  {r['state']:<9} {have:>4}  {human_bytes(r['size']):>9}  {r['name']}"
                        + (f"  from {self.name_of(r['src'])}" if r["state"] not in ("own", "waiting") else "")
                        + (f"  for {self.name_of(r['dst'])}" if r.get("dst") else "")
                        + ("" if r.get("encrypted") is None else
                           "  (encrypted)" if r["encrypted"] else "  (not encrypted)")
                        + (f"  -> {r['path']}" if r["path"] else ""))

    def trace(self, r: TraceResult) -> None:
        for line in trace_lines(r, self.name_of):
            self.notice(line)


TERMINAL_PROGRESS_S = 1.0  # not interactive: a progress line at most this often per transfer
STATUS_REDRAW_S = 0.25  # interactive: its row redrawn in place at most this often
MAX_STATUS_ROWS = 4  # progress rows above the prompt; more transfers are counted in the last


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns (wide characters count two), so that it stays one row."""
    if text_width(text) <= width:
        return text
    out = ""
    for ch in text:
        if text_width(out + ch) > width - 3:
            break
        out += ch
    return out + "..."


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_text(e: FileProgress) -> str:
    """``photo.jpg [#####.....] 52% 1.2 MiB/s 3 s left``"""
    share = e.have / e.size if e.size else 1.0
    bar = "#" * int(share * 20) + "." * (20 - int(share * 20))
    if e.have == 0 and e.size:
        return f"{e.name} [{bar}] 0% waiting for a neighbour that has it"
    left = f", {e.left_s:.0f} s left" if e.left_s is not None and e.have < e.size else ""
    return f"{e.name} [{bar}] {int(share * 100)}% {human_bytes(e.rate)}/s{left}"


def _sealed(encrypted: Optional[bool]) -> str:
    """How a direct message travelled, for a node that can seal (None: this node cannot, says nothing)."""
    return "" if encrypted is None else ", encrypted" if encrypted else ", in clear"


def _rows_below_start(text: str, columns: int) -> int:
    """Rows from where ``text`` (the prompt and what is typed) starts down to the cursor after it.

    A row filled to the last column puts the cursor on the next one (readline
    does so, and _line does the same for its redraw)."""
    return text_width(text) // columns


STATS_COLUMNS = 68  # each /stats line, so that with the time and "* " it fits 80 columns


def _fold(line: str, limit: int = STATS_COLUMNS) -> List[str]:
    """``line`` cut after a comma, semicolon or colon into rows of at most ``limit`` characters."""
    rows = [""]
    for item in re.split(r"(?<=[,;:]) ", line):
        if rows[-1].strip() and len(rows[-1]) + 1 + len(item) > limit:
            rows.append("  " + item)
        else:
            rows[-1] += (" " if rows[-1] else "") + item
    return rows


def stats_lines(c: dict) -> List[str]:
    """The counters of ``/stats`` for people, a few short lines.

    Every datagram received is either handled or dropped; a handled message
    may be displayed, relayed, both, or neither (the node's own business,
    e.g. a PONG), so those three figures are not parts of a sum."""
    drops = {k[len("dropped_"):]: v for k, v in c.items() if k.startswith("dropped_")}
    reasons = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in drops.items() if v)
    late = f" ({c['relayed_late']} late)" if c.get("relayed_late") else ""
    lines = [f"received {c['received']}: handled {c['handled']}, dropped {sum(drops.values())}",
             f"handled: displayed {c['displayed']}, relayed {c['relayed']}{late}, neither {c['consumed']}; "
             "a message can be both"]
    if reasons:
        lines.append(f"dropped: {reasons}")
    lines.append(f"sent {c['sent']} datagrams; send errors {c['send_errors']}, receive errors {c['recv_errors']}")
    lines.append(f"seen ids {c['seen_size']}; receive buffer {c['rcvbuf_bytes'] // 1024} KiB")
    if "neighbours_up" in c:
        lines.append(f"neighbours up {c['neighbours_up']}; HELLOs sent {c.get('hello_sent', 0)}, "
                     f"received {c.get('hello_received', 0)}")
    if "delivered" in c:
        lines.append(f"direct: delivered {c['delivered']}, waiting {c['outbox']}, retries {c['retries']}, "
                     f"acks sent {c['acks_sent']}, held for others {c['relay_holding']}")
        lines.append(f"repair: repaired {c['repaired']}, served {c['served']}, asked {c['wants_sent']}, "
                     f"given up {c['gaps_given_up']}")
    if "history_written" in c:
        lines.append(f"history: written {c['history_written']}, not written {c['history_dropped']}")
    if "files_offered" in c:
        g = c.get
        lines.append(f"files: offered {g('files_offered', 0)}, done {g('files_done', 0)}, failed "
                     f"{g('files_failed', 0)}, carried {g('files_carried', 0)}; pieces received "
                     f"{g('file_pieces_received', 0)}, served {g('file_pieces_served', 0)}, timeouts "
                     f"{g('file_timeouts', 0)}")
        if "bulk_sent" in c:
            lines.append(f"bulk socket (file pieces): sent {g('bulk_sent', 0)}, received {g('bulk_received', 0)}, "
                         f"from strangers {g('bulk_dropped_stranger', 0)}")
    return [row for line in lines for row in _fold(line)]


def stats_text(c: dict) -> str:
    """``stats_lines`` as one text, a line each."""
    return "\n".join(stats_lines(c))


def table(header: List[str], rows: List[List[str]]) -> List[str]:
    """Rows of cells in aligned columns, two spaces apart, the header first; cells are
    sanitized here and measured in terminal columns (a nick may hold wide characters)."""
    cells = [[sanitize(c) for c in row] for row in [header] + rows]
    widths = [max(text_width(row[k]) for row in cells) for k in range(len(header))]
    return ["  ".join(c + " " * (widths[k] - text_width(c)) for k, c in enumerate(row)).rstrip()
            for row in cells]


def _ago(seconds: Optional[float], unit: str = " s ago") -> str:
    if seconds is None:
        return "never"
    if seconds < 0.05:
        return "now"
    return f"{seconds:.1f}{unit}" if seconds < 10 else f"{seconds:.0f}{unit}"


def peer_lines(rows: List[dict]) -> List[str]:
    """``/peers`` for people: a row per neighbour (``Node.neighbour_rows``), in columns that fit
    80 with the time and mark for a nick of six and an address of up to 17 characters.

    Rows with only the old keys (address, configured, last heard: a node
    without membership) get the old lines."""
    if not rows:
        return ["no neighbours yet"]
    if "state" not in rows[0]:
        lines = []
        for r in rows:
            heard = "never heard from" if r["last_heard_s"] is None else f"last heard {r['last_heard_s']:.1f} s ago"
            lines.append(f"{'peer' if r['configured'] else 'heard':5} {sanitize(r['addr'])}  {heard}")
        return lines
    body = []
    counted = "in" in rows[0]  # with tracing on: the flags here, the traffic in a second table
    for r in rows:
        where = r["addr"] if r["label"] == r["addr"] else f"{r['addr']} ({r['label']})"
        rtt = r["rtt_ms"]
        cells = [display_name(r["label"], r["nick"]) if r["nick"] else "-", where,
                 "peer" if r["configured"] else "found", r["state"], _ago(r["last_heard_s"], " s"),
                 "-" if rtt is None else f"{rtt:.1f} ms" if rtt < 10 else f"{rtt:.0f} ms",
                 "-" if r["loss"] is None else f"{r['loss']:.0%}"]
        if counted:
            cells.append(" ".join("!" + f for f in r["flags"]))
        body.append(cells)
    head = ["name", "address", "kind", "state", "heard", "rtt", "loss"]
    if not counted:
        return table(head, body)
    lines = table(head + ["flag"], body)
    traffic = []
    for r in rows:
        drops = r["drops"]
        top = max(drops, key=drops.get) if drops else ""
        total = sum(drops.values())
        traffic.append([r["addr"], str(r["in"]), str(r["out"]), str(r["dups"]),
                        "-" if r["dup_share"] is None else f"{r['dup_share']:.0%}",
                        f"{total} ({top.replace('_', ' ')}{', ...' if len(drops) > 1 else ''})" if total else "0"])
    return lines + table(["address", "in", "out", "dups", "dup share", "dropped"], traffic)


def why_lines(r: dict, name_of: Callable[[str], str] = lambda label: label) -> List[str]:
    """``/why`` for people: one message's story at this node (``Node.why``), a line per fact."""
    kind = r["kind"] + ("" if not r["dst"] else f" to {name_of(r['dst'])}")
    origin = "of ours" if r["own"] else f"from {name_of(r['src'])}"
    lines = [f"{r['mid']}: {kind} {origin}, {_ago(r['age_s'])}"]
    if r["own"]:
        to = ", ".join(name_of(a) for a in r["relayed_to"]) or "nobody (no neighbour took it)"
        lines.append(f"sent by us to {to}")
    elif r["first_from"] is not None:
        hops = "" if r["hops"] is None else f", {r['hops']} hop{'s' if r['hops'] != 1 else ''} from its origin"
        lines.append(f"first copy from {name_of(r['first_from'])} with ttl {r['ttl']}{hops}")
    if r["dropped"]:
        why = {"stale": "its time is too far from our clock (--max-skew)",
               "replay": "dated before ids we had to forget"}.get(r["dropped"], "")
        lines.append(f"dropped: {r['dropped']}" + (f": {why}" if why else ""))
    dups = r["duplicates"]
    if dups:
        shown = ", ".join(f"{name_of(d['from'])} +{d['after_ms']:g} ms" for d in dups)
        more = r["duplicates_total"] - len(dups)
        lines.append(f"duplicates: {r['duplicates_total']}: {shown}" + (f" and {more} more" if more > 0 else ""))
    elif not r["own"] and not r["dropped"]:
        lines.append("duplicates: none")
    if not r["own"] and not r["dropped"]:
        lines.append("relayed to " + ", ".join(name_of(a) for a in r["relayed_to"]) if r["relayed_to"]
                     else "not relayed (addressed to us, hops spent, or no other neighbour)")
        lines.append(("shown" + (" late (repaired or caught up)" if r["late"] else "")) if r["shown"]
                     else "not shown")
    if r["own"] and r["dst"] and r["kind"] == "CHAT":
        for t in r.get("retries", []):
            lines.append(f"retry {t['mid']} at +{t['after_ms']:g} ms to {', '.join(name_of(a) for a in t['to'])}")
        acked = r.get("acked")
        lines.append(f"acknowledged after {acked['tries']} tr{'ies' if acked['tries'] != 1 else 'y'}, "
                     f"{acked['rtt_ms']:g} ms after the last" if acked else "not acknowledged (yet)")
    return [row for line in lines for row in _fold(line)]


def trace_lines(r: TraceResult, name_of: Callable[[str], str] = lambda label: label) -> List[str]:
    """``/trace`` for people: a row per hop that answered, nearest first."""
    head = f"trace to {name_of(r.target)}: " + (
        f"{len(r.hops)} hop{'s' if len(r.hops) != 1 else ''}" if r.complete
        else "no answer from it; the hops that answered:" if r.hops else "no answer from any hop")
    body = [[str(h.hop), name_of(h.label), f"{h.rtt_ms:.1f} ms"] for h in r.hops]
    return [head] + (table(["hop", "node", "round trip"], body) if body else [])


def who_lines(rows: List[dict]) -> List[str]:
    """``/who`` for people: every node known in the mesh (``Node.who``), in columns, us first."""
    if not rows:
        return ["nobody known: this node has no membership"]
    body = [[display_name(r["label"], r["nick"]), r["label"], "?" if r["hops"] is None else str(r["hops"]),
             "-" if r["state"] == "you" else _ago(r["last_seen_s"]), r["state"]] for r in rows]
    others = len(rows) - 1
    head = f"{others} other node{'' if others == 1 else 's'} known in the mesh"
    return [head] + table(["name", "label", "hops", "last seen", "state"], body)


def readline_buffer() -> Callable[[], str]:
    """What the user has typed so far, where the readline module can tell us."""
    mod = sys.modules.get("readline")
    if mod is None:
        return lambda: ""
    return mod.get_line_buffer
