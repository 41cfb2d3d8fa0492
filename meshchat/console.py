"""What the user types and what the user sees.

- ``parse_line`` turns a typed line into a command; pure, no I/O.
- ``TerminalConsole`` prints for people: colour per sender, a timestamp,
  text from the network made harmless, the prompt redrawn under each line.
- ``JsonConsole`` prints one JSON object per line for scripts and tests.

Both are called from the main thread, which also shows the node's events
(the socket thread queues them); each write happens whole under the
console's own lock.
"""

import json
import logging
import re
import sys
import threading
import time
import zlib
from typing import Callable, Iterable, List, NamedTuple, Optional, TextIO, Union

from .relay import Display, Notice, Pong
from .wire import Message, WireError, parse_addr

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
PROMPT = "> "

HELP = """\
Type a line to send it to everyone.
  @HOST:PORT text    send text to one node only (others relay it unseen)
  /ping [HOST:PORT]  round-trip time to one node, or to every node that answers
  /peers             configured peers and everyone heard from
  /stats             what this node received, relayed and dropped
  /help              this text
  /quit              leave (so do Ctrl-C and Ctrl-D)
  //text             send a line that starts with /"""


class Say(NamedTuple):
    body: str
    dst: str = ""


class Ping(NamedTuple):
    dst: str = ""


class Help(NamedTuple):
    pass


class Peers(NamedTuple):
    pass


class Stats(NamedTuple):
    pass


class Quit(NamedTuple):
    pass


class Nothing(NamedTuple):
    pass


class Bad(NamedTuple):
    error: str


Command = Union[Say, Ping, Help, Peers, Stats, Quit, Nothing, Bad]

_SIMPLE_COMMANDS = {"help": Help(), "peers": Peers(), "stats": Stats(), "quit": Quit(), "exit": Quit()}


def _check_addr(text: str) -> Optional[str]:
    try:
        parse_addr(text)
    except WireError as e:
        return f"bad address: {e}; use HOST:PORT, for example @127.0.0.1:9002"
    return None


def parse_line(line: str) -> Command:
    """One typed line to one command. Never raises."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return Nothing()
    if len(line.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
        return Bad(f"line is over {MAX_LINE_BYTES // 1024} KiB; nothing was sent")
    if line.startswith("//"):
        return Say(line[1:])
    if line.startswith("/"):
        word, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if word == "ping":
            if rest:
                error = _check_addr(rest)
                if error:
                    return Bad(error)
            return Ping(rest)
        if word in _SIMPLE_COMMANDS and not rest:
            return _SIMPLE_COMMANDS[word]
        return Bad(f"unknown command /{word}; /help lists the commands")
    if line.startswith("@"):
        target, _, body = line[1:].partition(" ")
        error = _check_addr(target)
        if error:
            return Bad(error)
        if not body.strip():
            return Bad(f"nothing to send to {target}")
        return Say(body, target)
    return Say(line)


# C0 and C1 controls, DEL, and the bidirectional overrides and isolates: each
# could move the cursor, retitle the window or fake a line from someone else.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: "re.Match[str]") -> str:
    o = ord(match.group())
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def sanitize(text: str) -> str:
    """Text from the network, made safe to print: control characters shown as escapes."""
    return _UNSAFE.sub(_visible, text)


def _encodable(text: str, encoding: Optional[str]) -> str:
    """``text`` with what ``encoding`` cannot write as backslash escapes (ASCII if unknown)."""
    try:
        return text.encode(encoding or "ascii", "backslashreplace").decode(encoding or "ascii")
    except (LookupError, UnicodeError):
        return text.encode("ascii", "backslashreplace").decode("ascii")


class Console:
    """Shared by both consoles: one lock, and a stream that may break under us."""

    def __init__(self, stream: TextIO, on_broken: Callable[[], None] = lambda: None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._on_broken = on_broken
        self.broken = False

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
                self._stream.flush()
            except (OSError, ValueError) as e:  # closed or broken pipe
                self.broken = True
                log.debug("stdout is gone: %s", e)
                self._on_broken()

    def show(self, event: object) -> None:
        """An event from the node."""
        if isinstance(event, Display):
            self.chat(event.message)
        elif isinstance(event, Pong):
            self.pong(event)
        elif isinstance(event, Notice):
            self.notice(event.text)
        else:
            self.error(f"the node stopped: {event}")


class JsonConsole(Console):
    """One JSON object per line on stdout. ASCII-only, so safe in any terminal."""

    def emit(self, event: str, **fields: object) -> None:
        self._write(json.dumps({"event": event, **fields}) + "\n")

    def ready(self, label: str) -> None:
        self.emit("ready", node=label)

    def chat(self, m: Message) -> None:
        self.emit("chat", mid=m.mid, src=m.src, dst=m.dst, body=m.body, ts=m.ts, ttl=m.ttl)

    def sent(self, messages: Iterable[Message]) -> None:
        for m in messages:
            self.emit("sent", mid=m.mid, dst=m.dst, body=m.body)

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

    def peers(self, rows: list) -> None:
        self.emit("peers", peers=[{"addr": a, "configured": c, "last_heard_s": s} for a, c, s in rows])


_PALETTE = ("CYAN", "GREEN", "YELLOW", "BLUE", "MAGENTA", "LIGHTCYAN_EX", "LIGHTGREEN_EX",
            "LIGHTYELLOW_EX", "LIGHTBLUE_EX", "LIGHTMAGENTA_EX")


class _Plain:
    """Colour codes that are all empty, for pipes and NO_COLOR."""

    def __getattr__(self, name: str) -> str:
        return ""


class TerminalConsole(Console):
    """Lines for people. ``interactive`` redraws the prompt; ``color`` uses colorama."""

    def __init__(
        self,
        stream: TextIO,
        color: bool,
        interactive: bool,
        on_broken: Callable[[], None] = lambda: None,
        get_typed: Callable[[], str] = lambda: "",
    ) -> None:
        super().__init__(stream, on_broken)
        self.interactive = interactive
        self.reading = False  # the input thread sets this while it waits for a line
        self._get_typed = get_typed
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

    def _color_of(self, label: str) -> str:
        return getattr(self._fore, _PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)])

    def _line(self, text: str, replace_typed: bool = False) -> None:
        stamp = f"{self._style.DIM}{time.strftime('%H:%M:%S')}{self._style.RESET_ALL} "
        if not self.interactive:
            self._write(stamp + text + "\n")
            return
        # Up a line over the echo of what was typed, or to the start of the prompt line.
        head = "\x1b[1A\r\x1b[2K" if replace_typed else "\r\x1b[2K"
        tail = PROMPT + self._get_typed() if self.reading else ""
        self._write(head + stamp + text + "\n" + tail)

    def _who(self, label: str) -> str:
        return f"{self._color_of(label)}{self._style.BRIGHT}<{sanitize(label)}>{self._style.RESET_ALL}"

    def ready(self, label: str) -> None:
        self.label = label
        if self.interactive:
            self.notice(f"meshchat node {label} is up. Type a line to send it; /help for commands.")
        else:
            self.notice(f"meshchat node {label} is up.")

    def chat(self, m: Message) -> None:
        body = sanitize(m.body)
        if m.dst:
            mark = f"{self._fore.MAGENTA}{self._style.BRIGHT}(private){self._style.RESET_ALL}"
            self._line(f"{self._who(m.src)} {mark} {self._fore.MAGENTA}{body}{self._style.RESET_ALL}")
        else:
            self._line(f"{self._who(m.src)} {body}")

    def sent(self, messages: Iterable[Message], replace_typed: bool = False) -> None:
        for i, m in enumerate(messages):
            you = f"{self._style.BRIGHT}<you>{self._style.RESET_ALL}"
            body = sanitize(m.body)
            if m.dst:
                mark = f"{self._fore.MAGENTA}{self._style.BRIGHT}(private to {m.dst}){self._style.RESET_ALL}"
                text = f"{you} {mark} {self._fore.MAGENTA}{body}{self._style.RESET_ALL}"
            else:
                text = f"{you} {body}"
            self._line(text, replace_typed=replace_typed and i == 0)

    def pinged(self, messages: Iterable[Message]) -> None:
        for m in messages:
            self.notice(f"ping sent to {m.dst or 'every node'}")

    def pong(self, p: Pong) -> None:
        self.notice(f"pong from {sanitize(p.src)}: {p.rtt_ms:.1f} ms")

    def notice(self, text: str) -> None:
        self._line(f"{self._fore.YELLOW}* {text}{self._style.RESET_ALL}")

    def error(self, text: str) -> None:
        self._line(f"{self._fore.RED}{self._style.BRIGHT}! {text}{self._style.RESET_ALL}")

    def help(self) -> None:
        for line in HELP.splitlines():
            self._line(line)

    def stats(self, c: dict) -> None:
        self.notice(stats_text(c))

    def peers(self, rows: list) -> None:
        for line in peer_lines(rows):
            self.notice(line)


def stats_text(c: dict) -> str:
    """The counters of ``/stats`` as one line for people."""
    drops = {k[len("dropped_"):]: v for k, v in c.items() if k.startswith("dropped_")}
    why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in drops.items() if v)
    late = f" ({c['relayed_late']} late)" if c.get("relayed_late") else ""
    return (
        f"received {c['received']}: handled {c['handled']} (displayed {c['displayed']}, "
        f"relayed {c['relayed']}{late}, consumed {c['consumed']}), dropped {sum(drops.values())}"
        f"{' (' + why + ')' if why else ''}; sent {c['sent']}, send errors {c['send_errors']}, "
        f"receive errors {c['recv_errors']}; seen ids {c['seen_size']}; "
        f"receive buffer {c['rcvbuf_bytes'] // 1024} KiB"
    )


def peer_lines(rows: list) -> List[str]:
    """``/peers`` for people: (address, configured, seconds since heard or None) a line each."""
    if not rows:
        return ["no peers configured and nobody heard from yet"]
    lines = []
    for addr, configured, ago in rows:
        heard = "never heard from" if ago is None else f"last heard {ago:.1f} s ago"
        kind = "peer" if configured else "heard"
        lines.append(f"{kind:5} {sanitize(addr)}  {heard}")
    return lines


def readline_buffer() -> Callable[[], str]:
    """What the user has typed so far, where the readline module can tell us."""
    mod = sys.modules.get("readline")
    if mod is None:
        return lambda: ""
    return mod.get_line_buffer
