"""What the user types: a typed line to a command (pure, no I/O).

``parse_line`` never raises: a line it cannot take is a ``Bad`` with the one-line error to show. A
name after ``@``, ``/msg``, ``/ping``, ``/trace`` or ``/send`` is only checked for its form here; the
CLI resolves it (a nick through the node's membership, a host name to an address). What the user
sees is console.py.
"""

from typing import NamedTuple, Optional, Union

from .membership import MAX_NICK_CHARS, valid_nick
from .wire import MAX_MID_CHARS, WireError, parse_addr

MAX_LINE_BYTES = 64 * 1024

HELP = """\
Type a line to send it to everyone.
  @NAME text         send text to one node only (others relay it unseen);
                     NAME is a nick, nick#tag (when two share a nick) or HOST:PORT
  /msg NAME text     the same; sealed end to end when both nodes can (held until
                     NAME's key is known)
  /msg --plain NAME text   send it in clear, on purpose
  /nick NAME         the name others see you by
  /who               every node known in the mesh: name, hops away, last seen
  /ping [NAME]       round-trip time to one node, or to every node that answers
  /peers             neighbours: state, last heard, round-trip time, loss, traffic, drops
  /why [MID]         what this node did with a message (MID: a unique start of its id;
                     none: the last one shown): first copy, duplicates, relayed to, acks
  /trace NAME        the way to a node and back, hop by hop, with round-trip times
  /stats             what this node received, relayed and dropped
  /whoami            your label, nick and key fingerprint (compare it with others')
  /trust NAME        accept the new key NAME offered (after checking its fingerprint)
  /map [FILE.svg]    the mesh as this node knows it; with a file, as a picture
  /history [N]       the last N messages (20) shown or sent, kept on disk
  /send PATH         offer a file to everyone (they fetch it, from whoever has it)
  /send @NAME PATH   a file to one node only (end-to-end encrypted when both have keys)
  /send --plain @NAME PATH   the same, in clear, on purpose
  /files             offers seen, transfers moving and done, with their ids
  /accept ID         fetch an offer that waits (over --accept-files, or unverified)
  /cancel ID         stop fetching (or serving) a file
  /help              this text
  /quit              leave (so do Ctrl-C and Ctrl-D)
  //text             send a line that starts with /"""


class Say(NamedTuple):
    body: str
    dst: str = ""
    plain: bool = False  # /msg --plain: a direct message in clear, asked for explicitly


class Ping(NamedTuple):
    dst: str = ""


class Nick(NamedTuple):
    nick: str = ""  # empty: say which nick we have


class History(NamedTuple):
    count: int = 20


class Who(NamedTuple):
    pass


class Help(NamedTuple):
    pass


class Peers(NamedTuple):
    pass


class Stats(NamedTuple):
    pass


class Quit(NamedTuple):
    pass


class WhoAmI(NamedTuple):
    pass


class TrustCmd(NamedTuple):
    name: str
    fingerprint: str = ""  # the start of one, when several keys were offered


class Map(NamedTuple):
    path: str = ""  # empty: print it; else write an SVG there


class Why(NamedTuple):
    prefix: str = ""  # the start of a message id; empty: the last message shown


class TraceRoute(NamedTuple):
    dst: str


class Nothing(NamedTuple):
    pass


class SendFile(NamedTuple):
    path: str
    dst: str = ""
    plain: bool = False  # /send --plain @NAME PATH: a direct file in clear, asked for explicitly


class FilesCmd(NamedTuple):
    pass


class FileCmd(NamedTuple):
    what: str  # "accept" or "cancel"
    fid: str


class Bad(NamedTuple):
    error: str


Command = Union[Say, Ping, Nick, Who, History, Help, Peers, Stats, Quit, Why, TraceRoute, Nothing, Bad,
                WhoAmI, TrustCmd, Map, SendFile, FilesCmd, FileCmd]
MAX_HISTORY_SHOWN = 1000

_SIMPLE_COMMANDS = {"help": Help(), "peers": Peers(), "stats": Stats(), "who": Who(), "quit": Quit(),
                    "exit": Quit(), "whoami": WhoAmI(), "files": FilesCmd()}
NICK_RULE = f"1 to {MAX_NICK_CHARS} printable characters, no spaces and none of @ # : / \\"


def _check_name(text: str) -> Optional[str]:
    """Whether ``text`` can name a node: HOST:PORT (a nick never has a colon), nick or nick#tag."""
    if ":" in text:
        try:
            parse_addr(text)
        except WireError as e:
            return f"bad address: {e}; use HOST:PORT, for example @127.0.0.1:9002, or a nick"
        return None
    nick, hash_, tag = text.partition("#")
    if valid_nick(nick) and (not hash_ or (tag.isascii() and tag.isalnum())):
        return None
    return f"bad name {text!r}: use a nick, nick#tag or HOST:PORT; /who lists the nodes"


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
                error = _check_name(rest)
                if error:
                    return Bad(error)
            return Ping(rest)
        if word == "msg":
            if not rest:
                return Bad("/msg needs a name and a text: /msg NAME text")
            if rest == "--plain" or rest.startswith("--plain "):
                cmd = _addressed(rest[len("--plain"):].strip())
                return cmd._replace(plain=True) if isinstance(cmd, Say) else cmd
            return _addressed(rest)
        if word == "nick":
            if rest and not valid_nick(rest):
                return Bad(f"{rest!r} is not a nick: {NICK_RULE}")
            return Nick(rest)
        if word == "trust":
            if not rest:
                return Bad("/trust needs a name: /trust NAME (the notice of a changed key names it)")
            name, _, fingerprint = rest.partition(" ")
            fingerprint = fingerprint.strip()
            if fingerprint and not all(ch in "0123456789abcdefABCDEF " for ch in fingerprint):
                return Bad("/trust NAME [FINGERPRINT]: a fingerprint is hex digits, as the notice shows it")
            error = _check_name(name)
            return Bad(error) if error else TrustCmd(name, fingerprint)
        if word == "history":
            if not rest:
                return History()
            if not rest.isdigit() or not rest.isascii() or not 0 < int(rest[:6]) <= MAX_HISTORY_SHOWN:
                return Bad(f"/history takes a number of messages from 1 to {MAX_HISTORY_SHOWN}")
            return History(int(rest))
        if word == "map":
            if rest and not rest.lower().endswith(".svg"):
                return Bad("/map takes nothing, or the name of an .svg file to write: /map mesh.svg")
            return Map(rest)
        if word == "why":
            if rest and (len(rest) > MAX_MID_CHARS or not rest.isprintable() or " " in rest):
                return Bad(f"/why takes the start of a message id (at most {MAX_MID_CHARS} characters, no spaces)")
            return Why(rest)
        if word == "trace":
            if not rest:
                return Bad("/trace needs a name: /trace NAME")
            error = _check_name(rest)
            return Bad(error) if error else TraceRoute(rest)
        if word in ("send", "accept", "cancel"):
            return _file_command(word, rest)
        if word in _SIMPLE_COMMANDS:
            if not rest:
                return _SIMPLE_COMMANDS[word]
            return Bad(f"/{word} takes nothing after it; /help lists the commands")
        return Bad(f"unknown command /{word}; /help lists the commands")
    if line.startswith("@"):
        return _addressed(line[1:])
    return Say(line)


def _file_command(word: str, rest: str) -> Command:
    """/send PATH, /send @NAME PATH, /accept ID, /cancel ID. (``/send NAME PATH`` without the ``@``
    is told from a path with spaces when it runs: cli.py looks at the disk and the names it knows.)"""
    if word == "send":
        plain = rest == "--plain" or rest.startswith("--plain ")
        if plain:
            rest = rest[len("--plain"):].strip()
        if not rest:
            return Bad("/send needs a file: /send PATH")
        first, _, path = rest.partition(" ")
        if path.strip() and first[:1] == "@":
            error = _check_name(first[1:])
            return Bad(error) if error else SendFile(path.strip(), first[1:], plain)
        if plain:
            return Bad("--plain is for a file to one node: /send --plain @NAME PATH")
        return SendFile(rest)
    if not rest or " " in rest or len(rest) > 16 or not rest.isalnum():
        return Bad(f"/{word} needs a file id (what /files shows): /{word} ID")
    return FileCmd(word, rest.lower())


def _addressed(text: str) -> Command:
    """``NAME text`` (after ``@`` or ``/msg``) to a Say for NAME, as typed."""
    target, _, body = text.partition(" ")
    error = _check_name(target)
    if error:
        return Bad(error)
    if not body.strip():
        return Bad(f"nothing to send to {target}")
    return Say(body, target)
