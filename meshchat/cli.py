"""The command line: arguments to a running node, and the main thread's loop.

The main thread owns the console: it takes items from one queue and handles
them in order. The ``meshchat-stdin`` thread puts the lines it reads with a
blocking ``readline`` (stdin cannot go in a selector on Windows); the node's
socket thread puts what there is to show, so that a terminal that does not
take output (paused with Ctrl-S, or a pipe nobody reads) never holds up the
relaying. ``main`` returns the exit status: 0 after a clean stop, 1 if the
node could not start or a worker thread died, 2 for bad arguments.
"""

import argparse
import logging
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterator, List, NamedTuple, Optional

from . import __version__, crypto
from .console import PROMPT, JsonConsole, TerminalConsole, terminal_columns, nick_of, part_of, readline_buffer
from .commands import (
    MAX_LINE_BYTES, Bad, FileCmd, FilesCmd, Help, History as HistoryCmd, Map, Nick, Nothing, Peers, Ping, Quit, Say,
    SendFile, Stats, TraceRoute, TrustCmd, Who, WhoAmI, Why, parse_line,
)
from . import meshmap
from .metrics import MetricsError, parse_bind
from .membership import MAX_MESH_CHARS, MAX_NICK_CHARS, MembershipConfig, display_name, valid_nick
from .node import Discovery, Failure, FileSharing, History, Node, Security, start_without_signals
from .store import StoreError
from .relay import PONG_INTERVAL_S, Display, Notice, RelayConfig
from .wire import Addr, WireError, format_addr, parse_addr

log = logging.getLogger("meshchat")

_EOF = object()  # end of input, or a reason to stop, in the main queue
MAX_PENDING_EVENTS = 2_000  # events waiting for the console beyond this are counted, not kept


class _Line(NamedTuple):
    """A line of input; ``done`` is set once it has been run (the prompt waits for it)."""

    text: str
    done: Optional[threading.Event]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
        # One line, naming the argument; the usage block is one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, high: Optional[float] = None, what: str = ""):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high) or value != value:
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {span}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="meshchat",
        description="A serverless chat: every node floods messages over UDP to its peers.",
        epilog="Example: meshchat --port 9001 --peers 127.0.0.1:9002 127.0.0.1:9003",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_number(int, 0, 65535, "a port"), default=None,
                   help=f"UDP port to bind (default {DEFAULT_PORT}, or the next free one after it; 0 picks any free one)")
    p.add_argument("--peers", nargs="*", default=[], metavar="HOST:PORT",
                   help="neighbours, space- or comma-separated")
    p.add_argument("--advertise", metavar="HOST",
                   help="host others reach this node at, for its label (needed with --host 0.0.0.0)")
    p.add_argument("--ttl", type=_ttl, default=0, metavar="N|auto",
                   help="hops a message of ours travels; auto (the default): as far as the farthest known "
                   "node, plus 2 (8 until the mesh is known)")
    p.add_argument("--seen-ttl", type=_number(float, 1.0, what="a number"), default=120.0,
                   metavar="SECONDS", help="how long a message id is remembered (default 120)")
    p.add_argument("--json", action="store_true", help="one JSON event per line on stdout, for scripts")
    p.add_argument("--headless", action="store_true", help="no input; relay until stopped")
    p.add_argument("--quiet", action="store_true",
                   help="show no messages, ours included, and no prompt; only the ready line, errors and "
                   "what commands answer: for relay-only nodes (/stats then counts nothing as displayed)")
    p.add_argument("--metrics", type=_metrics, default=None, metavar="HOST:PORT",
                   help="serve counters at http://HOST:PORT/metrics for Prometheus or curl (PORT or :PORT: "
                   "on 127.0.0.1; another host only when named; default off)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="logging on stderr (default warning)")
    members = p.add_argument_group("membership")
    members.add_argument("--nick", type=_nick, default=None, help="a name others see and can type after @")
    members.add_argument("--discover", dest="discover", action="store_true", default=None,
                         help="find nodes on the LAN by multicast beacons (the default without --peers)")
    members.add_argument("--no-discover", dest="discover", action="store_false",
                         help="do not beacon nor answer beacons")
    members.add_argument("--discover-group", type=_group, default=DISCOVERY_GROUP, metavar="GROUP:PORT",
                         help="multicast group and port of the beacons (default %s)" % format_addr(DISCOVERY_GROUP))
    members.add_argument("--discover-iface", metavar="ADDRESS",
                         help="beacon on the interface with this address only (default: the one --host names; "
                         "with --host 0.0.0.0, the default route's and loopback)")
    members.add_argument("--mesh", type=_mesh, default="meshchat", metavar="NAME",
                         help="meshes with other names on the same LAN never see each other (default meshchat)")
    members.add_argument("--max-peers", type=_number(int, 1, 4096, "an integer"), default=32, metavar="N",
                         help="most neighbours, configured ones included; only learned ones are refused past it "
                         "(default 32)")
    keep = p.add_argument_group("delivery and history")
    keep.add_argument("--data-dir", metavar="DIR",
                      help="where history, the outbox and held messages are kept, in a folder per node "
                      "(default: the user's data folder, e.g. ~/.local/share/meshchat)")
    keep.add_argument("--no-history", action="store_true",
                      help="keep nothing on disk (acks, retries and repair still work while the node runs)")
    keep.add_argument("--history-max", type=_number(int, 1, 10_000_000, "an integer"), default=100_000,
                      metavar="N", help="most messages kept; the oldest go first (default 100000)")
    keep.add_argument("--hold-hours", type=_number(float, 0.0, 24 * 365, "a number"), default=24.0,
                      metavar="H", help="how long undelivered direct messages are kept to send again (default 24)")
    keep.add_argument("--catch-up-hours", type=_number(float, 0.0, 24 * 365, "a number"), default=24.0,
                      metavar="H", help="after a restart, ask neighbours for what was missed up to this far back "
                      "(default 24; 0: never)")
    shared = p.add_argument_group("file sharing")
    shared.add_argument("--downloads", metavar="DIR",
                        help="where fetched files land (default: downloads in the node's data folder)")
    shared.add_argument("--accept-files", type=_size, default=16 << 20, metavar="SIZE",
                        help="fetch offers up to SIZE (e.g. 500K, 16M, 1G) from verified senders without "
                        "asking; larger ones wait for /accept (default 16M; 0: always ask)")
    shared.add_argument("--files-quota", type=_size, default=1 << 30, metavar="SIZE",
                        help="most disk the downloads folder may take; an offer that does not fit is refused "
                        "(default 1G)")
    shared.add_argument("--no-files", action="store_true", help="take part in no file sharing")
    p.add_argument("--lazy", action="store_true",
                   help="lazy push: neighbours that speak LAZY get a broadcast's payload on the links of a "
                   "shared tree and an announcement on the others, and ask for what they miss (fewer "
                   "datagrams, later under loss); the default is plain flooding")
    p.add_argument("--flood", action="store_true", help="plain flooding: every payload on every link (the default)")
    p.add_argument("--no-trace", action="store_true",
                   help="keep no per-message records (/why) nor per-neighbour counters (/peers shows "
                   "state, rtt and loss only); /trace still works")
    secure = p.add_argument_group("signatures (need: pip install 'meshchat[secure]')")
    secure.add_argument("--identity", metavar="FILE",
                        help="this node's key file (made on first start); default: identity.key in the data dir")
    secure.add_argument("--require-signed", action="store_true",
                        help="drop every message not signed by its origin's pinned key")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-ttl", type=_number(int, 1, what="an integer"), default=16,
                        help="lower a received ttl above this to it (default 16)")
    limits.add_argument("--max-datagram", type=_number(int, 64, 65535, "an integer"), default=8192,
                        metavar="BYTES", help="drop datagrams larger than this (default 8192)")
    limits.add_argument("--max-skew", type=_number(float, 1.0, what="a number"), default=None,
                        metavar="SECONDS", help="drop messages whose ts is this far from our clock "
                        "(default 60, or half of --seen-ttl if that is less; at most half of --seen-ttl)")
    limits.add_argument("--seen-max", type=_number(int, 1, what="an integer"), default=100_000,
                        metavar="IDS", help="most message ids remembered; the oldest go first (default 100000)")
    limits.add_argument("--rate-limit", type=_number(float, 0.0, what="a number"), default=200.0,
                        metavar="PER_S", help="datagrams per second taken from each neighbour "
                        "(default 200, burst twice that; 0 for no limit)")
    limits.add_argument("--rate-limit-total", type=_number(float, 0.0, what="a number"), default=None,
                        metavar="PER_S", help="datagrams per second taken from all senders together; "
                        "configured peers are held to their own limit only (default 10 x --rate-limit, "
                        "burst twice that; 0 for no total)")
    limits.add_argument("--peers-only", action="store_true",
                        help="drop datagrams from addresses that are not --peers")
    closed = p.add_argument_group("closed mesh (needs the secure extra: pip install 'meshchat[secure]')")
    closed.add_argument("--new-network-key", metavar="FILE", action=_NewNetworkKey,
                        help="write a fresh random network key to FILE (never over an existing file) and exit")
    closed.add_argument("--network-key", metavar="FILE",
                        help="seal every datagram with the key in FILE; take only datagrams sealed with it")
    closed.add_argument("--network-key-optional", action="store_true",
                        help="with --network-key: also take plaintext datagrams (shown as not sealed; nothing "
                        "is sent in answer); what this node sends is still sealed")
    p.add_argument("--version", action="version", version=f"meshchat {__version__}")
    return p


class _NewNetworkKey(argparse.Action):
    """--new-network-key FILE: like --version, it does its job and exits, whatever else is given."""

    def __call__(self, parser, namespace, path, option_string=None) -> None:
        try:
            crypto.write_network_key(path)
        except crypto.CryptoUnavailable as e:
            parser.exit(2, f"{parser.prog}: {e}\n")
        except FileExistsError:
            parser.exit(2, f"{parser.prog}: {path} already exists; a network key is never written over a file "
                        "(choose another name, or remove it first)\n")
        except OSError as e:
            parser.exit(2, f"{parser.prog}: cannot write {path}: {e.strerror or e}\n")
        print(f"wrote a new network key to {path}; copy it to each node of the mesh and start them "
              f"with --network-key {path}")
        parser.exit(0)


def _load_network_key(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--network-key FILE to the key itself, or exit 2 with one line saying what is wrong."""
    if args.network_key is None:
        if args.network_key_optional:
            parser.error("argument --network-key-optional: needs --network-key FILE")
        return
    try:
        args.network_key = crypto.load_network_key(args.network_key)
    except (crypto.CryptoUnavailable, crypto.NetworkKeyError) as e:
        parser.exit(2, f"{parser.prog}: {e}\n")


DISCOVERY_GROUP = ("239.255.77.77", 9977)
UNWRAPPED_COLUMNS = 1 << 20  # "columns" of a pipe or file: no line is ever wrapped
HISTORY_AT_START = 5  # messages from history a terminal shows when the node starts
DEFAULT_PORT = 9001
KEY_WAIT_S = 5.0  # at the end of piped input, how long a private message may wait for its key
DEFAULT_PORT_TRIES = 100  # without --port: 9001, else 9002, ... so that plain `meshchat` runs N times on one machine


def _ttl(text: str) -> int:
    if text == "auto":
        return 0
    return _number(int, 1, 255, "an integer or auto")(text)


def _metrics(text: str) -> Addr:
    try:
        host, port = parse_bind(text)
        return resolve_host(host), port
    except (ValueError, WireError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nick(text: str) -> str:
    if not valid_nick(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a nick: 1 to {MAX_NICK_CHARS} printable characters, "
                                         "no spaces and none of @ # : / \\")
    return text


def _mesh(text: str) -> str:
    if not 0 < len(text) <= MAX_MESH_CHARS or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a mesh name: 1 to {MAX_MESH_CHARS} printable characters")
    return text


def _group(text: str) -> Addr:
    try:
        host, port = parse_addr(text)
        packed = socket.inet_aton(host)
    except (WireError, OSError):
        raise argparse.ArgumentTypeError(f"{text!r} is not GROUP:PORT") from None
    if not 224 <= packed[0] <= 239:
        raise argparse.ArgumentTypeError(f"{host!r} is not a multicast address (224.0.0.0 to 239.255.255.255)")
    return host, port


def discovery_interfaces(args: argparse.Namespace) -> tuple:
    """The addresses of the interfaces to beacon on."""
    if args.discover_iface:
        return (args.discover_iface,)
    if args.host not in _WILDCARD_HOSTS:
        return (args.host,)
    found = [_guess_address(), *_interface_addresses(), "127.0.0.1"]
    return tuple(dict.fromkeys(found))


def _interface_addresses() -> List[str]:
    """Every interface's IPv4 address, where the OS tells it without a package (Linux); else none."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "if_nameindex"):
        return []
    import fcntl
    import struct

    siocgifaddr = 0x8915
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out.append(socket.inet_ntoa(fcntl.ioctl(probe.fileno(), siocgifaddr, req)[20:24]))
            except OSError:
                continue  # no IPv4 address, or down
    return out


def _size(text: str) -> int:
    """A size in bytes: digits with an optional K, M or G (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in ("K", "M", "G") else ""
    digits = t[:-1] if unit else t
    if not digits.isdigit() or not digits.isascii() or len(digits) > 12:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 0, 500K, 16M, 1G)")
    return int(digits) * units[unit]


def history_of(args: argparse.Namespace) -> History:
    return History(enabled=not args.no_history, data_dir=args.data_dir, max_messages=args.history_max,
                   hold_s=args.hold_hours * 3600.0, catch_up_s=args.catch_up_hours * 3600.0)


def open_node(args: argparse.Namespace, config: RelayConfig, on_event: Callable[[object], None],
              on_events: Optional[Callable[[List[object]], None]] = None) -> Node:
    """The node bound to --port; without --port, to the first free port from the default on
    (so that `meshchat` run in three terminals gives three nodes). OSError if none is free."""
    tries = 1 if args.port_chosen else DEFAULT_PORT_TRIES
    for i in range(tries):
        try:
            return Node(config, args.host, args.port, args.peers, on_event, advertise=args.advertise,
                        on_events=on_events,
                        membership=MembershipConfig(label="", mesh=args.mesh, nick=args.nick or "",
                                                    max_peers=args.max_peers),
                        discovery=Discovery(args.discover_group, discovery_interfaces(args)) if args.discover
                        else None, history=history_of(args),
                        security=Security(args.identity) if crypto.available() else None,
                        network_key=args.network_key, network_key_optional=args.network_key_optional,
                        metrics=args.metrics,
                        files=None if getattr(args, "no_files", True) else FileSharing(
                            args.downloads, args.accept_files, args.files_quota))
        except OSError as e:
            if not _in_use(e) or i == tries - 1 or args.port >= 65535:
                raise
            args.port += 1
    raise AssertionError("unreachable")


def _in_use(e: OSError) -> bool:
    import errno

    return e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1))


def resolve_host(host: str) -> str:
    """A host name or IPv4 address to an IPv4 address; raises WireError saying why not."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        if re.fullmatch(r"[0-9.]+", host):
            raise WireError(f"{host!r} is not an IPv4 address") from None
        raise WireError(f"cannot resolve {host!r}: {e}") from None
    return infos[0][4][0]


def resolve_peer(text: str) -> Addr:
    """``host:port`` to an IPv4 address tuple; host names are looked up once, here."""
    host, port = parse_addr(text)
    return resolve_host(host), port


def no_peers_hint(label: str, args: Optional[argparse.Namespace] = None) -> str:
    """What a node started without --peers is told (one line, on stderr)."""
    if args is not None and args.discover:
        return (f"meshchat: no --peers: looking for nodes of mesh {args.mesh!r} on the LAN "
                f"(group {format_addr(args.discover_group)}); others can also join with --peers {label}")
    return (f"meshchat: hint: no --peers and no discovery: this node can only be reached by nodes that list it "
            f"(start them with --peers {label})")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.port_chosen = args.port is not None
    _load_network_key(parser, args)
    if args.port is None:
        args.port = DEFAULT_PORT  # or the next free one, when the node binds
    if args.host not in _WILDCARD_HOSTS:
        # Bound by address, so that the label is the address others type after @ (names are resolved).
        try:
            args.host = resolve_host(args.host)
        except WireError as e:
            parser.error(f"argument --host: {e}")
    peers: List[Addr] = []
    for item in args.peers:
        for text in item.split(","):
            if text.strip():
                try:
                    peers.append(resolve_peer(text.strip()))
                except WireError as e:
                    parser.error(f"argument --peers: {e}")
    args.peers = peers
    if args.ttl and args.ttl > args.max_ttl:
        parser.error(f"argument --ttl: {args.ttl} is above --max-ttl {args.max_ttl}")
    if args.max_skew is None:
        args.max_skew = min(60.0, args.seen_ttl / 2)
    elif args.max_skew > args.seen_ttl / 2:
        parser.error(f"argument --max-skew: must be at most half of --seen-ttl ({args.seen_ttl / 2:g}), "
                     "so that a replayed message is always too old")
    if args.host in _WILDCARD_HOSTS and not args.advertise:
        args.advertise = _guess_address()
        if args.advertise.startswith("127."):
            print(f"meshchat: warning: --host {args.host} without --advertise: this node's label will be "
                  f"{args.advertise}:{args.port}, which other machines cannot reach; pass --advertise ADDRESS",
                  file=sys.stderr)
    if args.advertise:
        try:
            parse_addr(f"{args.advertise}:1")
        except WireError:
            parser.error(f"argument --advertise: {args.advertise!r} is not a host name or address")
    for addr in [a for a in args.peers if _is_self(a, args)]:
        print(f"meshchat: warning: --peers {format_addr(addr)} is this node itself; ignored", file=sys.stderr)
        args.peers.remove(addr)
    if args.discover and args.peers_only:
        parser.error("argument --discover: --peers-only takes no neighbours but --peers, so nothing to discover")
    if args.discover is None:
        args.discover = not args.peers and not args.peers_only
    if args.discover_iface:
        try:
            socket.inet_aton(args.discover_iface)
        except OSError:
            parser.error(f"argument --discover-iface: {args.discover_iface!r} is not an IPv4 address")
    for option, used in (("--identity", args.identity), ("--require-signed", args.require_signed)):
        if used:
            try:
                crypto.require(option)
            except crypto.CryptoUnavailable as e:
                parser.exit(2, f"meshchat: {e}\n")
    return args


_WILDCARD_HOSTS = ("0.0.0.0", "")


def _is_self(addr: Addr, args: argparse.Namespace) -> bool:
    """Whether a peer address is this node's own socket (which would send each message to itself)."""
    host, port = addr
    if port != args.port:
        return False
    if args.host not in _WILDCARD_HOSTS:
        return host == args.host
    return host.startswith("127.") or host == args.advertise


def _guess_address() -> str:
    """This machine's address on its default route, else what its name resolves to."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: connecting a UDP socket sends nothing
            return probe.getsockname()[0]
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def stdin_lines(read: Callable[[int], bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """Lines from a raw ``read``, each cut at ``limit + 1`` bytes so that a huge line costs no memory."""
    parts: List[bytes] = []
    size = 0
    while True:
        chunk = read(65536)
        if not chunk:
            break
        while chunk:
            head, newline, chunk = chunk.partition(b"\n")
            if size <= limit:
                parts.append(head[: limit + 1 - size])
                size += len(parts[-1])
            if newline:
                yield b"".join(parts)
                parts, size = [], 0
    if parts:
        yield b"".join(parts)


def _read_stdin(lines: "queue.Queue[object]", interactive: bool, console) -> None:
    """The meshchat-stdin thread: blocking reads, one line at a time, into the queue.

    Piped input is read with os.read on the descriptor, never through
    sys.stdin: a daemon thread blocked inside sys.stdin's buffer would hold
    its lock while the interpreter shuts down, which aborts the process.
    """
    try:
        if interactive:
            # "Reading" (the console redraws the prompt under what it prints) from the moment the
            # prompt is on the screen: readline says when, after printing it. Set before input()
            # instead, a line printed while readline starts would draw the prompt, then readline a
            # second one ("> > "). Without readline (Windows), before input(), as the next best.
            mod = sys.modules.get("readline")
            hook = getattr(mod, "set_pre_input_hook", None) if mod is not None else None
            if hook is not None:
                hook(lambda: setattr(console, "reading", True))
            while True:
                if hook is None:
                    console.reading = True
                try:
                    line = input(PROMPT)
                except EOFError:
                    break
                finally:
                    console.reading = False
                done = threading.Event()
                lines.put(_Line(line, done))
                done.wait()  # the prompt comes back after our own line is shown
        else:
            fd = sys.stdin.fileno()
            for raw in stdin_lines(lambda n: os.read(fd, n)):
                lines.put(_Line(raw.decode("utf-8", "replace"), None))
    except (OSError, ValueError) as e:
        log.debug("stdin is gone: %s", e)
    finally:
        lines.put(_EOF)


STORE_WAIT_S = 1.0  # longest a message waits to be in history before it is shown anyway


def _saved_marker(events: "queue.Queue[object]") -> Callable[[object], bool]:
    """After a commit, the events already queued (whose messages were saved before they were
    queued) need no commit of their own: remember them by identity."""
    with events.mutex:
        covered = {id(e) for e in events.queue}

    def saved(event: object) -> bool:
        if id(event) not in covered:
            return False
        covered.discard(id(event))  # once: a later object may reuse the id
        return True

    return saved


class _Batch(NamedTuple):
    """Events of one drain of the socket, for the main thread to show together."""
    events: List[object]


class _Stop(Exception):
    """Raised in the main thread by the first SIGINT or SIGTERM."""


class _StopOnce:
    """A signal handler that stops the main loop once: signals that follow (timeout(1)
    and process groups deliver SIGINT twice) must not interrupt the clean stop."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.fired:
            self.fired = True
            raise _Stop()


def _wait(get):
    """Block in ``get``; on Windows wake now and then, since Ctrl-C cannot interrupt a lock there."""
    if sys.platform != "win32":
        return get()
    while True:
        try:
            return get(timeout=0.5)
        except queue.Empty:
            continue


def _unquoted(path: str) -> str:
    """A path as a shell or a terminal's drag and drop gives it: in quotes, with a space after, or
    with its spaces escaped by a backslash (not on Windows, where a backslash separates folders)."""
    p = path.strip()
    if len(p) >= 2 and p[0] == p[-1] and p[0] in "'\"":
        p = p[1:-1]
    elif os.sep == "/" and "\\ " in p:
        p = p.replace("\\ ", " ")
    return p


def _a_file(path: str) -> Optional[str]:
    """``path`` as typed if that names something on disk, else unquoted if that does, else None."""
    for p in (path, _unquoted(path)):
        if p and os.path.exists(os.path.expanduser(p)):
            return p
    return None


def _send_to_name(cmd: SendFile, node: Node) -> SendFile:
    """/send's path as the user meant it: quotes and escaped spaces taken off when the path as typed
    is not on disk; and ``/send NAME PATH`` typed without the ``@`` is a direct file when the line
    as a whole is no file but its first word names a node and the rest is one."""
    found = _a_file(cmd.path)
    if cmd.dst or found is not None:
        return cmd._replace(path=found or cmd.path)
    first, _, rest = cmd.path.strip().partition(" ")
    rest = _a_file(rest.strip()) if rest.strip() else None
    if rest is None or node.membership is None or not os.path.isfile(os.path.expanduser(rest)):
        return cmd
    label, _ = node.resolve(first)
    return cmd._replace(path=rest, dst=first) if label is not None else cmd


def _resolved(cmd: object, node: Node) -> object:
    """A Say or Ping to a typed name made one to a label. ``host:port`` becomes
    ``address:port``, as --peers do (labels are addresses); anything else is a
    nick or nick#tag, which the node's membership knows or not. A name that does
    not resolve, or names several nodes, is an error, and nothing is sent."""
    if isinstance(cmd, SendFile):
        cmd = _send_to_name(cmd, node)
    if not isinstance(cmd, (Say, Ping, TraceRoute, SendFile)) or not cmd.dst:
        return cmd
    if ":" in cmd.dst:  # a nick never has one
        try:
            return cmd._replace(dst=format_addr(resolve_peer(cmd.dst)))
        except WireError as e:
            return Bad(f"{e}; nothing was sent")
    if node.membership is None:
        return Bad(f"{cmd.dst!r}: this node knows no nicks; use HOST:PORT; nothing was sent")
    label, error = node.resolve(cmd.dst)
    if label is None:
        if re.fullmatch(r"[0-9.]+|localhost", cmd.dst):
            error += "; an address needs its port: HOST:PORT"
        if isinstance(cmd, TraceRoute):  # worded as when a label cannot be traced
            return Bad(f"cannot trace {cmd.dst}: {error}")
        return Bad(f"{error}; nothing was sent")
    return cmd._replace(dst=label)


def shown_nick(event: Display, nick_of_label: Callable[[str], str]) -> Display:
    """``event`` with the sender's nick in its extra fields: the one it carries, else the one
    the mesh knows its sender by (a message that crossed a seed-design node has lost it)."""
    m = event.message
    if nick_of(m):
        return event
    nick = nick_of_label(m.src)
    if not valid_nick(nick):
        return event
    return event._replace(message=m._replace(extra=dict(m.extra or {}, nick=nick)))


def peer_rows(node: Node) -> List[dict]:
    """/peers: each neighbour's state, last heard, rtt and loss; without membership, the relay's
    own table (address, configured, last heard), whose keys every row keeps."""
    if node.membership is not None:
        return node.neighbour_rows()
    return [{"addr": addr, "configured": configured, "last_heard_s": None if ago is None else round(ago, 1)}
            for addr, configured, ago in node.peer_table()]


def run_command(cmd: object, node: Node, console, typed: str = "", echo: bool = True) -> bool:
    """Run one console command; False when it asks to quit.

    ``typed``: the line as entered at the prompt, whose echo our own lines
    replace; ``echo`` False (--quiet) shows none of our own lines."""
    cmd = _resolved(cmd, node)
    if typed and not isinstance(cmd, Say) and isinstance(console, TerminalConsole):
        console.entered(typed)  # its echo stays a line of its own, above any progress rows
    if isinstance(cmd, Say):
        messages = node.say(cmd.body, cmd.dst, plain=cmd.plain)
        # Sealed end to end (or held until it can be) unless asked plain; None: this node cannot seal.
        encrypted = (not cmd.plain) if node.encrypts and cmd.dst else None
        if echo and isinstance(console, TerminalConsole):
            to = display_name(cmd.dst, node.nick_of(cmd.dst)) if cmd.dst else ""
            console.sent(messages, replace_typed=typed, to=to, encrypted=encrypted)
        elif echo:
            console.sent(messages, encrypted=encrypted)
        if cmd.plain and cmd.dst and node.encrypts:
            console.notice("sent in clear, as asked (--plain): every node on the way can read it")
    elif isinstance(cmd, Ping):
        last = node.last_roll_call
        console.pinged(node.ping(cmd.dst))
        if not cmd.dst and last is not None and time.monotonic() - last < PONG_INTERVAL_S:
            console.notice(f"a node answers one roll call from us every {PONG_INTERVAL_S:g} s: "
                           "those that answered the last one may stay silent")
    elif isinstance(cmd, Bad):
        console.error(cmd.error)
    elif isinstance(cmd, Help):
        console.help()
    elif isinstance(cmd, Nick):
        if node.membership is None:
            console.error("this node has no membership, so no nick")
        elif cmd.nick:
            node.set_nick(cmd.nick)
            console.notice(f"you are now {display_name(node.label, cmd.nick)}; the mesh is told")
        elif node.membership.nick:  # one attribute read: only this thread ever sets it
            console.notice(f"you are {display_name(node.label, node.membership.nick)}")
        else:
            console.notice("you have no nick: /nick NAME sets one")
    elif isinstance(cmd, HistoryCmd):
        if node.store is None:
            console.error("no history is kept: this node runs with --no-history")
        else:
            console.history(node.history(cmd.count))
    elif isinstance(cmd, Who):
        console.who(node.who())
    elif isinstance(cmd, Peers):
        console.peers(peer_rows(node))
    elif isinstance(cmd, Stats):
        console.stats(node.stats())
    elif isinstance(cmd, WhoAmI):
        ident = node.identity
        console.whoami(node.label, node.membership.nick if node.membership is not None else "",
                       ident.fingerprint if ident is not None else None)
    elif isinstance(cmd, TrustCmd):
        console_trust(cmd.name, node, console, cmd.fingerprint)
    elif isinstance(cmd, Map):
        if not cmd.path:
            console.map(node.mesh_map())
        else:
            snapshot = node.mesh_map()
            try:  # the user's own file, written where they asked: the main thread, like the console
                with open(cmd.path, "w", encoding="utf-8") as f:
                    f.write(meshmap.svg(snapshot))
            except OSError as e:
                console.error(f"cannot write {cmd.path}: {e.strerror or e}")
            else:
                console.notice(f"map of {len(snapshot['nodes'])} nodes written to {cmd.path}")
    elif isinstance(cmd, SendFile):
        error = node.send_file(cmd.path, cmd.dst, cmd.plain)
        if error:
            console.error(error)
        elif echo and isinstance(console, TerminalConsole):
            console.notice(f"hashing {cmd.path}; the offer goes when that is done")
    elif isinstance(cmd, FilesCmd):
        console.files(node.file_rows())
    elif isinstance(cmd, FileCmd):
        text = node.accept_file(cmd.fid) if cmd.what == "accept" else node.cancel_file(cmd.fid)
        if text and (cmd.what == "accept" or "no transfer" in text):
            console.error(text)
        elif text:
            console.notice(text)
    elif isinstance(cmd, Why):
        record, error = node.why(cmd.prefix)
        if record is None:
            console.error(error)
        else:
            console.why(record)
    elif isinstance(cmd, TraceRoute):
        mid, error = node.trace_route(cmd.dst)
        if mid is None:
            console.error(f"cannot trace {cmd.dst}: {error}")
        else:
            console.notice(f"tracing the way to {display_name(cmd.dst, node.nick_of(cmd.dst))}; the hops follow "
                           "when it answers (or within 10 s)")
    elif isinstance(cmd, Quit):
        return False
    else:
        assert isinstance(cmd, Nothing)
    return True


def console_trust(name: str, node: Node, console, fingerprint: str = "") -> None:
    """/trust NAME: accept the newest key NAME offered (a nick, nick#tag or HOST:PORT)."""
    if node.trust is None:
        try:
            crypto.require("/trust")
        except crypto.CryptoUnavailable as e:
            console.error(str(e))
            return
        console.error("this node does not check signatures")
        return
    if ":" in name:
        try:
            label = format_addr(resolve_peer(name))
        except WireError as e:
            console.error(str(e))
            return
    else:
        label, error = node.resolve(name) if node.membership is not None else (None, f"{name!r} is unknown")
        if label is None:
            # A node whose key changed is not shown, so its nick may be unknown: its label always works.
            console.error(f"{error}; /trust takes a nick or the HOST:PORT the notice named")
            return
    console.notice(node.trust_key(label, fingerprint))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="meshchat: %(levelname)s: %(message)s")
    lines: "queue.Queue[object]" = queue.Queue()
    restore_terminal: Callable[[], None] = lambda: None
    stop_reading = lambda: lines.put(_EOF)  # noqa: E731
    interactive = (not args.json and not args.headless and not args.quiet
                   and sys.stdin.isatty() and sys.stdout.isatty())  # --quiet: no prompt
    if args.json:
        console = JsonConsole(sys.stdout, on_broken=stop_reading)
    else:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        if interactive:
            restore_terminal = _terminal_restorer()
            try:
                import readline  # noqa: F401  # line editing, and a prompt we can redraw
            except ImportError:
                pass
        # Lines are wrapped (continuation rows indented) for a terminal only: a log keeps them whole.
        columns = terminal_columns if sys.stdout.isatty() else (lambda: UNWRAPPED_COLUMNS)
        console = TerminalConsole(sys.stdout, color=color, interactive=interactive,
                                  on_broken=stop_reading, get_typed=readline_buffer(), columns=columns)

    unshown = [0]  # events dropped while the console was not keeping up
    pending = [0]  # events handed to the main thread and not shown yet (batches count each of theirs)

    def kept(event: object) -> object:
        if isinstance(event, Display) and event.message.extra:
            # Unknown fields are relayed, never shown (but a valid "part" and "nick"): do not keep them waiting.
            part, nick = part_of(event.message), nick_of(event.message)
            kept = {"part": part} if part else {}
            if nick:
                kept["nick"] = nick
            event = event._replace(message=event.message._replace(extra=kept))
        return event

    def on_event(event: object) -> None:  # on the socket thread: never blocks on the console
        if isinstance(event, Failure):
            lines.put(event)
        elif args.quiet:
            pass
        elif pending[0] < MAX_PENDING_EVENTS:
            pending[0] += 1
            lines.put(kept(event))
        else:
            unshown[0] += 1

    def on_events(events: List[object]) -> None:
        """One drain of the socket's events, in history already: one hand-over, one wake-up."""
        if args.quiet:
            return
        room = MAX_PENDING_EVENTS - pending[0]
        if room < len(events):
            unshown[0] += len(events) - max(room, 0)
            events = events[:max(room, 0)]
        if events:
            pending[0] += len(events)
            lines.put(_Batch([kept(e) for e in events]))

    config = RelayConfig(label="", ttl=args.ttl, seen_ttl_s=args.seen_ttl, seen_max=args.seen_max,
                         max_ttl=args.max_ttl, max_skew_s=args.max_skew, max_datagram=args.max_datagram,
                         rate_limit=args.rate_limit, rate_limit_total=args.rate_limit_total,
                         peers_only=args.peers_only, display=not args.quiet,
                         require_signed=args.require_signed, trace=not args.no_trace,
                         flood=not args.lazy)
    first = args.port
    try:
        node = open_node(args, config, on_event, on_events)
    except (StoreError, crypto.IdentityError, MetricsError) as e:
        print(f"meshchat: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if _in_use(e):
            if args.port_chosen:
                print(f"meshchat: port {args.port} on {args.host} is already in use", file=sys.stderr)
            else:
                print(f"meshchat: ports {first} to {args.port} on {args.host} are all in use; pass --port",
                      file=sys.stderr)
        elif args.discover and e.errno is None:
            print(f"meshchat: {e}; use --no-discover and --peers, or --discover-iface ADDRESS", file=sys.stderr)
        else:
            print(f"meshchat: cannot bind {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1

    stop_once = _StopOnce()
    try:
        _take_signals(stop_once)
        node.start()
        identity = ""
        if node.identity is not None:
            where = node.identity_where or "in memory for this run only: --no-history without --identity FILE"
            identity = f"{node.identity.fingerprint} (key {where})"
        console.ready(node.label, identity)
        if node.metrics is not None:
            console.notice(f"metrics at {node.metrics.url}")
        for warning in [*(node.store.warnings if node.store is not None else ()), node.identity_warning]:
            if warning:
                print(f"meshchat: warning: {warning}", file=sys.stderr)
        if isinstance(console, TerminalConsole):
            console.name_of = lambda label: display_name(label, node.nick_of(label))
            if node.store is not None and not args.quiet:
                console.history(node.history(HISTORY_AT_START), replay=True)
        waiting = node.stats().get("outbox", 0)
        if waiting and not args.quiet:
            console.notice(f"{waiting} direct message{'s' if waiting > 1 else ''} from before the restart "
                           "not delivered yet: kept, and sent again when their destination is heard from")
        if not args.peers:
            print(no_peers_hint(node.label, args), file=sys.stderr)
        if not args.headless:
            reader = threading.Thread(target=_read_stdin, args=(lines, interactive, console),
                                      name="meshchat-stdin", daemon=True)
            start_without_signals(reader)
        saved_through: Callable[[object], bool] = lambda event: False
        while True:
            item = _wait(lines.get)
            if item is _EOF:
                # Piped input ended: a private message still waiting for its destination's key gets a
                # moment to go sealed (a key request and its answer), rather than the next run.
                if not node.wait_for_keys(KEY_WAIT_S) and not args.quiet:
                    console.notice("a private message still waits for its destination's key: kept in the "
                                   "outbox" + ("" if node.store is not None else " of this run only, so lost"))
                break
            if isinstance(item, _Line):
                typed = item.text if item.done is not None else ""
                if not run_command(parse_line(item.text), node, console, typed=typed, echo=not args.quiet):
                    break  # leave the input thread waiting, not inside readline
                if item.done is not None:
                    item.done.set()
                continue
            if isinstance(item, _Batch):
                # Already in history (the store's writer handed them on after its commit).
                pending[0] -= len(item.events)
                with console.batch():  # written together, flushed once
                    for event in item.events:
                        console.show(shown_nick(event, node.nick_of) if isinstance(event, Display) else event)
                if unshown[0]:
                    missed, unshown[0] = unshown[0], 0
                    console.show(Notice(f"{missed} events were not shown: the output was not being read"))
                continue
            if not isinstance(item, Failure):
                pending[0] -= 1
            if isinstance(item, Display):
                if node.store is not None and not saved_through(item):
                    # What is shown is in history first, so that a restart never shows it again;
                    # one commit covers every message already queued behind it (taken before the
                    # commit: what is queued during it may have been saved after it).
                    queued = _saved_marker(lines)
                    node.store.flush(STORE_WAIT_S)
                    saved_through = queued
                item = shown_nick(item, node.nick_of)
            console.show(item)
            if isinstance(item, Failure):
                break
            if unshown[0]:
                missed, unshown[0] = unshown[0], 0
                console.show(Notice(f"{missed} events were not shown: the output was not being read"))
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        # From here on a Ctrl-C or SIGTERM must not cut the clean stop short; on POSIX
        # it stays pending, blocked, until the process has exited.
        stop_once.fired = True
        _hold_signals()
        node.stop()
        if isinstance(console, TerminalConsole):
            console.leave()
        restore_terminal()
        _quiet_exit(console)
    return 1 if node.failure else 0


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _take_signals(handler: Callable[[int, object], None]) -> None:
    """SIGINT and SIGTERM stop the node, unless whoever started us chose to ignore them.

    Only in the main thread, where Python runs handlers: ``main`` owns the
    process's signals from here to its exit, and does not hand them back."""
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, handler)


def _hold_signals() -> None:
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, set(_SIGNALS))


def _terminal_restorer() -> Callable[[], None]:
    """Undo on exit what readline did to the terminal: the stdin thread may still be inside it."""
    try:
        import termios
    except ImportError:  # Windows: the console keeps its own modes
        return lambda: None
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def restore() -> None:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            sys.stdout.write("\n")
            sys.stdout.flush()
        except (OSError, ValueError, termios.error):
            pass

    return restore


def _quiet_exit(console) -> None:
    """After a broken stdout, keep the interpreter's final flush from printing a traceback."""
    if console.broken:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
