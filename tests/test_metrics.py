"""--metrics: the exposition text (pure), the request parser (pure), and the HTTP server on a real node:
counters that match /stats, 4xx for bad requests, and relaying that no client can hold up."""

import os
import queue
import re
import socket
import subprocess
import sys
import time

import pytest

from meshchat.membership import MembershipConfig, PeerUp
from meshchat.metrics import (MAX_REQUEST_BYTES, REQUEST_TIMEOUT_S, MetricsError, exposition, parse_bind,
                              parse_request)
from meshchat.node import Node
from meshchat.relay import Display, RelayConfig

TIMEOUT_S = 5.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_exposition(text: str) -> dict:
    """Text format 0.0.4 to {(name, ((label, value), ...)): float}; asserts every family has HELP and TYPE
    before its samples, counters end in _total, and every line is well formed."""
    assert text.endswith("\n")
    types, helps, samples = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ")[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in types, line
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"malformed line {line!r}"
        name, labels, value = m.groups()
        assert name in types and name in helps, f"{name} has no TYPE or HELP before it"
        if types[name] == "counter":
            assert name.endswith("_total"), name
        pairs = []
        if labels:
            rest = labels
            while rest:
                lm = _LABEL.match(rest)
                assert lm, f"malformed labels {labels!r}"
                raw = lm.group(2)
                pairs.append((lm.group(1), re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), raw)))
                rest = rest[lm.end():]
        key = (name, tuple(pairs))
        assert key not in samples, f"series given twice: {key}"
        samples[key] = float(value)
    return samples


# -- pure ----------------------------------------------------------------------------------------------


def test_exposition_types_names_and_label_escaping():
    stats = {"received": 5, "handled": 4, "dropped_stale": 1, "dropped_rate": 0, "seen_size": 3, "sent": 7}
    rows = [{"addr": "127.0.0.1:2", "label": 'we"ird\\nick\nx', "nick": "", "configured": True, "state": "up",
             "last_heard_s": 0.5, "rtt_ms": 2.5, "loss": 0.25,
             "dups": 3, "drops": {"stale": 2, "rate": 1}, "flag": True}]
    s = parse_exposition(exposition(stats, rows, label="127.0.0.1:1", version="9", nodes_known=4,
                                    requests={200: 2}))
    who = (("neighbour", 'we"ird\\nick\nx'),)
    assert s[("meshchat_received_total", ())] == 5 and s[("meshchat_sent_total", ())] == 7
    assert s[("meshchat_dropped_total", (("reason", "stale"),))] == 1
    assert s[("meshchat_dropped_total", (("reason", "rate"),))] == 0
    assert s[("meshchat_seen_size", ())] == 3 and s[("meshchat_nodes_known", ())] == 4
    assert s[("meshchat_info", (("label", "127.0.0.1:1"), ("version", "9")))] == 1
    assert s[("meshchat_neighbour_up", who)] == 1 and s[("meshchat_neighbour_rtt_seconds", who)] == 0.0025
    assert s[("meshchat_neighbour_loss_ratio", who)] == 0.25
    # Figures a row may grow plug in: trace.py's counters as counters, other numbers as gauges, dicts as
    # counter families.
    assert s[("meshchat_neighbour_duplicates_in_total", who)] == 3
    assert s[("meshchat_neighbour_drops_total", who + (("kind", "stale"),))] == 2
    assert not any(name == "meshchat_neighbour_flag" for name, _ in s)
    assert s[("meshchat_metrics_requests_total", (("code", "200"),))] == 2


def test_exposition_of_a_down_neighbour_has_no_unknown_figures():
    rows = [{"label": "127.0.0.1:2", "configured": False, "state": "down", "last_heard_s": None, "rtt_ms": None,
             "loss": None}]
    s = parse_exposition(exposition({}, rows))
    assert s == {("meshchat_info", (("label", ""), ("version", ""))): 1,
                 ("meshchat_neighbour_up", (("neighbour", "127.0.0.1:2"),)): 0,
                 ("meshchat_neighbour_configured", (("neighbour", "127.0.0.1:2"),)): 0}


@pytest.mark.parametrize("head,code", [
    (b"GET /metrics HTTP/1.1\r\nHost: x", 200),
    (b"GET /metrics?x=1 HTTP/1.0", 200),
    (b"HEAD /map.json HTTP/1.0", 200),
    (b"GET / HTTP/1.0", 404),
    (b"GET /metricsx HTTP/1.0", 404),
    (b"POST /metrics HTTP/1.0", 405),
    (b"GET /metrics HTTP/1.0\r\nContent-Length: 5", 413),
    (b"GET /metrics HTTP/1.0\r\nTransfer-Encoding: chunked", 413),
    (b"GET /metrics HTTP/1.0\r\nContent-Length: 0", 200),
    (b"GET /metrics", 400),
    (b"GET /metrics HTTP/2.0", 400),
    (b"GET metrics HTTP/1.0", 400),
    (b"\xff\xfe", 400),
    (b"GET /metrics HTTP/1.0\r\nno colon here", 400),
    (b"GET /metrics HTTP/1.0\r\n : x", 400),
    (b"", 400),
])
def test_request_heads_get_their_status(head, code):
    assert parse_request(head)[0] == code


def test_bind_addresses():
    assert parse_bind("9100") == ("127.0.0.1", 9100)
    assert parse_bind(":9100") == ("127.0.0.1", 9100)
    assert parse_bind("0.0.0.0:9100") == ("0.0.0.0", 9100)
    for bad in ("", "x", "1:x", "1:99999", ":", "1:-1", "1:\u0661"):
        with pytest.raises(ValueError):
            parse_bind(bad)


# -- a real node --------------------------------------------------------------------------------------


class Line:
    """Three nodes in a line, a - m - c, with --metrics on m (the one in the middle relays a to c)."""

    def __init__(self):
        self.events = {k: queue.Queue() for k in "amc"}
        self.nodes = {}
        try:
            for k in "amc":
                self.nodes[k] = Node(RelayConfig(label=""), on_event=self.events[k].put,
                                     membership=MembershipConfig(label="", nick=k),
                                     metrics=("127.0.0.1", 0) if k == "m" else None)
            a, m, c = (self.nodes[k] for k in "amc")
            for x, y in ((a, m), (m, c)):
                x.add_peer(y.addr)
                y.add_peer(x.addr)
            for n in self.nodes.values():
                n.start()
            self.next("m", PeerUp)
            self.next("m", PeerUp)
        except BaseException:
            self.stop()
            raise
        self.port = m.metrics.addr[1]

    def next(self, k, kind, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events[k].get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no {kind.__name__} at {k} in time") from None
            if isinstance(event, kind):
                return event

    def relays(self, body):
        """a says ``body``; c shows it (through m)."""
        self.nodes["a"].say(body)
        while self.next("c", Display).message.body != body:
            pass

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT_S)
        return s

    def request(self, data: bytes) -> bytes:
        with self.connect() as s:
            s.sendall(data)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk

    def stop(self):
        for n in self.nodes.values():
            n.stop()


@pytest.fixture
def line():
    mesh = Line()
    yield mesh
    mesh.stop()


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_get_metrics_is_exposition_text_whose_counters_match_stats(line):
    line.relays("hello")
    before = line.nodes["m"].stats()
    response = line.request(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
    after = line.nodes["m"].stats()
    head, _, body = response.partition(b"\r\n\r\n")
    assert _status(response) == 200 and b"text/plain; version=0.0.4" in head
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) == len(body)
    s = parse_exposition(body.decode("utf-8"))
    compared = 0
    for key, value in before.items():
        if key.startswith("dropped_"):
            got = s[("meshchat_dropped_total", (("reason", key[8:]),))]
        elif ("meshchat_%s_total" % key, ()) in s:
            got = s[("meshchat_%s_total" % key, ())]
        else:
            got = s[("meshchat_%s" % key, ())]
        lo, hi = min(value, after[key]), max(value, after[key])  # HELLOs may arrive while we ask
        assert lo <= got <= hi, (key, before[key], got, after[key])
        compared += 1
    assert compared == len(before) and s[("meshchat_relayed_total", ())] >= 1
    assert s[("meshchat_nodes_known", ())] == 2
    for k in "ac":
        who = (("neighbour", line.nodes[k].label),)
        assert s[("meshchat_neighbour_up", who)] == 1 and s[("meshchat_neighbour_configured", who)] == 1
    assert len([key for key in s if key[0] == "meshchat_neighbour_up"]) == 2


def test_map_json_lists_what_the_node_knows(line):
    import json

    response = line.request(b"GET /map.json HTTP/1.0\r\n\r\n")
    snap = json.loads(response.partition(b"\r\n\r\n")[2])
    assert snap["label"] == line.nodes["m"].label
    assert {r["label"] for r in snap["nodes"]} == {n.label for n in line.nodes.values()}


@pytest.mark.parametrize("request_bytes,code", [
    (b"BREW /metrics HTTP/1.0\r\n\r\n", 405),
    (b"GET /secret HTTP/1.0\r\n\r\n", 404),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS spoken to plain HTTP
    (b"GET /metrics HTTP/1.0\r\nContent-Length: 100000\r\n\r\n", 413),
    (b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (2 * MAX_REQUEST_BYTES), 431),
    (b"GET /metrics HTTP/1.0\r\n", 400),  # then the client closes its side: an unfinished request
])
def test_a_bad_request_gets_a_4xx_and_the_node_keeps_relaying(line, request_bytes, code):
    with line.connect() as s:
        s.sendall(request_bytes)
        s.shutdown(socket.SHUT_WR)
        response = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            response += chunk
    assert _status(response) == code, response[:200]
    line.relays(f"after {code}")
    # And the server still answers.
    assert _status(line.request(b"GET /metrics HTTP/1.0\r\n\r\n")) == 200


def test_a_slow_client_holds_up_neither_relaying_nor_for_long_the_next_client(line):
    slow = line.connect()
    try:
        slow.sendall(b"GET /met")  # and nothing more
        for i in range(5):
            line.relays(f"while a client dawdles {i}")
        started = time.monotonic()
        assert _status(line.request(b"GET /metrics HTTP/1.0\r\n\r\n")) == 200
        assert time.monotonic() - started < REQUEST_TIMEOUT_S + 2.0
        slow.settimeout(TIMEOUT_S)
        assert _status(slow.recv(4096)) == 408  # it was cut off at its deadline
    finally:
        slow.close()


def test_a_metrics_port_in_use_is_one_line_at_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"metrics port 127.0.0.1:{port} is already in use"):
            Node(RelayConfig(label=""), metrics=("127.0.0.1", port))
        done = subprocess.run([sys.executable, "-m", "meshchat", "--no-discover", "--no-history", "--port", "0",
                               "--headless", "--metrics", str(port)], capture_output=True, text=True,
                              timeout=30, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"meshchat: metrics port 127.0.0.1:{port} is already in use"]


def test_metrics_is_off_by_default_and_binds_loopback_for_a_bare_port():
    from meshchat.cli import parse_args

    assert parse_args(["--no-discover"]).metrics is None
    assert parse_args(["--no-discover", "--metrics", "9100"]).metrics == ("127.0.0.1", 9100)
    assert parse_args(["--no-discover", "--metrics", ":9100"]).metrics == ("127.0.0.1", 9100)


def test_a_meshchat_process_with_metrics_says_where_and_serves_its_counters_and_map(tmp_path):
    import json
    import urllib.request

    from procs import Proc

    with Proc("--port", "0", "--json", "--no-history", "--metrics", "0", "--nick", "m") as p:
        label = p.ready()
        url = p.event("notice")["text"].split("metrics at ", 1)[1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            assert r.status == 200
            s = parse_exposition(r.read().decode("utf-8"))
        assert ("meshchat_info", (("label", label), ("version", __import__("meshchat").__version__))) in s
        with urllib.request.urlopen(url.replace("/metrics", "/map.json"), timeout=TIMEOUT_S) as r:
            assert json.loads(r.read())["nodes"][0]["label"] == label
        svg = tmp_path / "m.svg"
        p.send(f"/map {svg}")
        assert "written to" in p.event("notice")["text"]
        p.send("/quit")
        assert p.wait() == 0
    assert svg.read_text().startswith("<svg")
