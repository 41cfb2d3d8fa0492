"""``--metrics``: the node's counters over HTTP, in the Prometheus text exposition format (0.0.4).

Two parts:
- ``exposition`` (pure): /stats and the neighbour rows to exposition text.
  Node-wide counters are ``meshchat_<name>_total`` (drops one family,
  ``meshchat_dropped_total{reason=...}``), levels are gauges, and each
  neighbour gets its series under a ``neighbour`` label, so the number of
  series is bounded by the neighbour table (``--max-peers``). A neighbour row
  may carry more figures (per-neighbour counters from trace.py): a number
  becomes a gauge ``meshchat_neighbour_<key>``, a dict of numbers a counter
  family ``meshchat_neighbour_<key>_total{kind=...}``.
- ``MetricsServer``: a tiny HTTP/1.0 server on its own thread
  (``meshchat-metrics``, the node's only optional thread). It handles one
  request at a time, each bounded in size (``MAX_REQUEST_BYTES``) and time
  (``REQUEST_TIMEOUT_S``), and only reads snapshots the node takes under its
  lock, so no client, however slow or hostile, can hold up the relaying
  thread. A malformed request gets a 4xx and the connection is closed.
"""

import json
import logging
import math
import re
import selectors
import socket
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .wire import Addr

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192  # request line and headers; more is 431
REQUEST_TIMEOUT_S = 2.0  # a whole request, read and answered; a slower client is cut off (408)
LINGER_S = 0.5  # after an error reply, what the client still sends is read (and dropped) this long at most
DRAIN_MAX_BYTES = 64 * 1024
LISTEN_BACKLOG = 8  # connections waiting while one is served; the kernel refuses the rest
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATHS = ("/metrics", "/map.json")

# Figures of /stats that are levels, not counts since the start.
GAUGES = {
    "seen_size": "message ids remembered now",
    "rcvbuf_bytes": "the UDP socket's receive buffer",
    "neighbours_up": "neighbours up now",
    "outbox": "direct messages of ours waiting for an ack",
    "relay_holding": "direct messages held for other nodes",
}
HELP = {
    "received": "datagrams received", "handled": "datagrams handled (not dropped)",
    "displayed": "messages shown", "relayed": "messages relayed", "relayed_late": "messages relayed late",
    "consumed": "messages handled but neither shown nor relayed", "sent": "datagrams sent",
    "send_errors": "failed sends", "recv_errors": "failed receives",
    "held": "direct messages of ours put in the outbox to be sent again later",
}


class MetricsError(Exception):
    """The metrics server cannot start (its one-line message says why)."""


def _name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


def _label_value(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _value(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Families:
    """Metric families in the order first seen, each with its HELP, TYPE and samples."""

    def __init__(self) -> None:
        self._order: List[str] = []
        self._meta: Dict[str, Tuple[str, str]] = {}
        self._samples: Dict[str, List[str]] = {}

    def add(self, name: str, kind: str, help_text: str, value: float,
            labels: Iterable[Tuple[str, object]] = ()) -> None:
        if name not in self._meta:
            self._order.append(name)
            self._meta[name] = (kind, help_text)
            self._samples[name] = []
        pairs = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels)
        self._samples[name].append(f"{name}{{{pairs}}} {_value(value)}" if pairs else f"{name} {_value(value)}")

    def text(self) -> str:
        out = []
        for name in self._order:
            kind, help_text = self._meta[name]
            out.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(self._samples[name])
        return "\n".join(out) + "\n"


_NEIGHBOUR_KNOWN = {"addr", "label", "nick", "configured", "state", "last_heard_s", "rtt_ms", "loss"}


# Per-neighbour figures that only grow (trace.py's counters): counters, named as Prometheus expects.
NEIGHBOUR_COUNTERS = {"in": "datagrams_in", "out": "datagrams_out", "dups": "duplicates_in"}


def exposition(stats: Dict[str, float], neighbours: List[dict], label: str = "", version: str = "",
               nodes_known: Optional[int] = None, requests: Optional[Dict[int, int]] = None) -> str:
    """The exposition text of one snapshot (pure)."""
    f = _Families()
    f.add("meshchat_info", "gauge", "this node: its label and version", 1, (("label", label), ("version", version)))
    for key in sorted(stats):
        value = stats[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith("dropped_"):
            f.add("meshchat_dropped_total", "counter", "datagrams dropped, by reason", value,
                  (("reason", key[len("dropped_"):]),))
        elif key in GAUGES:
            f.add(f"meshchat_{_name(key)}", "gauge", GAUGES[key], value)
        else:
            f.add(f"meshchat_{_name(key)}_total", "counter", HELP.get(key, key.replace("_", " ")), value)
    if nodes_known is not None:
        f.add("meshchat_nodes_known", "gauge", "other nodes known in the mesh (/who)", nodes_known)
    for row in neighbours:
        who = (("neighbour", row.get("label") or row.get("addr", "")),)
        state = row.get("state")
        if state is not None:
            f.add("meshchat_neighbour_up", "gauge", "1 if the neighbour is up", 1 if state == "up" else 0, who)
        f.add("meshchat_neighbour_configured", "gauge", "1 if the neighbour is in --peers",
              1 if row.get("configured") else 0, who)
        if row.get("last_heard_s") is not None:
            f.add("meshchat_neighbour_last_heard_seconds", "gauge", "seconds since the neighbour was last heard",
                  row["last_heard_s"], who)
        if row.get("rtt_ms") is not None:
            f.add("meshchat_neighbour_rtt_seconds", "gauge", "smoothed round-trip time of HELLOs",
                  row["rtt_ms"] / 1000.0, who)
        if row.get("loss") is not None:
            f.add("meshchat_neighbour_loss_ratio", "gauge", "share of the neighbour's HELLOs that did not arrive",
                  row["loss"], who)
        for key in sorted(k for k in row if k not in _NEIGHBOUR_KNOWN):
            value = row[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key in NEIGHBOUR_COUNTERS:
                    f.add(f"meshchat_neighbour_{_name(NEIGHBOUR_COUNTERS[key])}_total", "counter",
                          f"per neighbour: {NEIGHBOUR_COUNTERS[key].replace('_', ' ')}", value, who)
                else:
                    f.add(f"meshchat_neighbour_{_name(key)}", "gauge", f"per neighbour: {key}", value, who)
            elif isinstance(value, dict):
                for sub in sorted(value):
                    if isinstance(value[sub], (int, float)) and not isinstance(value[sub], bool):
                        f.add(f"meshchat_neighbour_{_name(key)}_total", "counter", f"per neighbour: {key}",
                              value[sub], who + (("kind", sub),))
    for code in sorted(requests or {}):
        f.add("meshchat_metrics_requests_total", "counter", "HTTP requests to this endpoint, by status",
              requests[code], (("code", code),))  # type: ignore[index]
    return f.text()


def parse_bind(text: str) -> Addr:
    """``PORT``, ``:PORT`` (both on 127.0.0.1) or ``HOST:PORT``; ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError(f"{text!r} is not PORT, :PORT or HOST:PORT")
    return (host or "127.0.0.1", int(port))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def parse_request(head: bytes) -> Tuple[int, str, str]:
    """(status, method, path) of a request's head (request line and headers): 200 if it can be served."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return 400, "", ""
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not re.fullmatch(r"HTTP/1\.[01]", parts[2]) or not parts[1].startswith("/"):
        return 400, "", ""
    method, target = parts[0], parts[1]
    for line in lines[1:]:
        if not line:
            break
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return 400, method, ""
        name, value = name.lower(), value.strip()
        if name == "transfer-encoding" or (name == "content-length" and value != "0"):
            return 413, method, ""  # we take no bodies
    if method not in ("GET", "HEAD"):
        return 405, method, ""
    path = target.split("?", 1)[0]
    if path not in PATHS:
        return 404, method, path
    return 200, method, path


class MetricsServer:
    """The HTTP server; ``pages`` maps a path to a function giving (content type, body) for it.

    ``serve`` is the thread's body: it returns once ``stopping`` is set and ``wake`` called."""

    def __init__(self, addr: Addr, pages: Dict[str, Callable[[], Tuple[str, bytes]]],
                 stopping: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self._pages = pages
        self._stopping = stopping
        self._clock = clock
        self.requests: Dict[int, int] = {}
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.bind(addr)
            self._sock.listen(LISTEN_BACKLOG)
            self._sock.setblocking(False)
        except OSError as e:
            self._sock.close()
            import errno

            if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
                raise MetricsError(f"metrics port {addr[0]}:{addr[1]} is already in use") from None
            raise MetricsError(f"cannot serve metrics on {addr[0]}:{addr[1]}: {e.strerror or e}") from None
        self.addr: Addr = self._sock.getsockname()[:2]
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, "listen")
        self._selector.register(self._waker_r, selectors.EVENT_READ, "wake")
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.addr[0]}:{self.addr[1]}/metrics"

    def wake(self) -> None:
        try:
            self._waker_w.send(b"\0")
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        for s in (self._sock, self._waker_r, self._waker_w):
            s.close()

    def serve(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select():
                if key.data == "listen" and not self._stopping.is_set():
                    try:
                        conn, _addr = self._sock.accept()
                    except (BlockingIOError, InterruptedError, ConnectionError):
                        continue
                    with conn:
                        self._handle(conn)

    def _count(self, code: int) -> None:
        if code in self.requests or len(self.requests) < len(_REASONS):
            self.requests[code] = self.requests.get(code, 0) + 1

    def _wait(self, conn: socket.socket, event: int, deadline: float) -> bool:
        """Until ``conn`` is ready for ``event``; False on the deadline or when the node stops."""
        with selectors.DefaultSelector() as sel:
            sel.register(conn, event)
            sel.register(self._waker_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                left = deadline - self._clock()
                if left <= 0:
                    return False
                for key, _ in sel.select(left):
                    if key.fileobj is conn:
                        return True
                if self._stopping.is_set():
                    return False
        return False

    def _handle(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        deadline = self._clock() + REQUEST_TIMEOUT_S
        head = b""
        code = 0
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            if len(head) > MAX_REQUEST_BYTES:
                code = 431
                break
            if not self._wait(conn, selectors.EVENT_READ, deadline):
                if not self._stopping.is_set():
                    self._count(408)
                    self._reply(conn, 408, "", deadline + 0.5)
                return
            try:
                chunk = conn.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not chunk:
                if not head:
                    return  # connected and left: nothing to answer
                code = 400
                break
            head += chunk
        method, path = "", ""
        if not code:
            code, method, path = parse_request(head.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0])
        self._count(code)
        ctype, body = "text/plain; charset=utf-8", f"{code} {_REASONS[code]}\n".encode()
        if code == 200:
            try:
                ctype, body = self._pages[path]()
            except Exception as e:  # a bug in a page must not take the server (or the node) down
                log.error("metrics page %s failed: %r", path, e, exc_info=True)
                code, body = 500, b"500 Internal Server Error\n"
        self._reply(conn, code, ctype, deadline, body, head_only=method == "HEAD")
        if code != 200:
            self._drain(conn, min(deadline, self._clock() + LINGER_S))

    def _drain(self, conn: socket.socket, deadline: float) -> None:
        """Read what the client still sends before closing: closing with unread input resets the
        connection, and the client may lose our reply (a lingering close, as web servers do)."""
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            return
        left = DRAIN_MAX_BYTES
        while left > 0 and self._wait(conn, selectors.EVENT_READ, deadline):
            try:
                chunk = conn.recv(min(left, 16384))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not chunk:
                return
            left -= len(chunk)

    def _reply(self, conn: socket.socket, code: int, ctype: str, deadline: float, body: bytes = b"",
               head_only: bool = False) -> None:
        if not body:
            body = f"{code} {_REASONS[code]}\n".encode()
            ctype = "text/plain; charset=utf-8"
        extra = "Allow: GET, HEAD\r\n" if code == 405 else ""
        data = (f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: close\r\n\r\n").encode() + (b"" if head_only else body)
        while data:
            if not self._wait(conn, selectors.EVENT_WRITE, deadline):
                return
            try:
                sent = conn.send(data)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            data = data[sent:]


def json_page(value: object) -> Tuple[str, bytes]:
    return "application/json", json.dumps(value, sort_keys=True).encode()
