"""meshchat.jsonview: every --json event shown exactly as the terminal console shows it, and any
other (unknown, or malformed) as one readable line."""

import inspect
import io
import json
import re

import pytest

from meshchat import console as consolemod
from meshchat.console import JsonConsole, TerminalConsole
from meshchat.delivery import Delivered, Undelivered
from meshchat.files import FileDone, FileFailed, FileOffered, FileProgress, Offer
from meshchat.jsonview import JsonView, _SHOW
from meshchat.membership import PeerDown, PeerUp, display_name
from meshchat.relay import Pong
from meshchat.traceroute import TraceHop, TraceResult
from meshchat.wire import Message

from test_membership import Net, WALL, label

ME, BOB = label(1), label(2)


def names(lbl: str) -> str:
    return display_name(lbl, {ME: "ann", BOB: "bob"}.get(lbl, ""))


def _mesh() -> Net:
    net = Net(3, configured=[(1, 2), (2, 1), (2, 3), (3, 2)])
    for i, nick in ((1, "ann"), (2, "bob"), (3, "cy")):
        net.ms[i].nick = nick
    net.advance(5.0)
    return net


def _calls():
    """(method name, args) for every JsonConsole method that writes an event, with realistic values."""
    net = _mesh()
    m1 = net.ms[1]
    chat = Message("m1", WALL, 5, "CHAT", BOB, "", "hello \x1b[31mall", {"nick": "bob", "part": [1, 2]})
    private = Message("m2", WALL, 5, "CHAT", BOB, ME, "psst", {"nick": "bob"})
    offer = Offer("f" * 64, "photo.jpg", 3 << 20, "ab" * 32, "", 0, BOB)
    stats = {"received": 9, "handled": 8, "dropped_stale": 1, "displayed": 3, "relayed": 4, "consumed": 1,
             "sent": 12, "send_errors": 0, "recv_errors": 0, "seen_size": 8, "rcvbuf_bytes": 65536}
    why = {"mid": "m1", "kind": "CHAT", "dst": "", "own": False, "src": BOB, "age_s": 1.5,
           "first_from": BOB, "ttl": 4, "hops": 1, "dropped": "", "late": False, "shown": True,
           "duplicates": [{"from": label(3), "after_ms": 2.5}], "duplicates_total": 1, "relayed_to": [label(3)]}
    return [
        ("chat", (chat, False, True, None, None)),
        ("chat", (private, True, True, None, True)),
        ("chat", (private, False, False, False, False)),
        ("sent", ([private._replace(src=ME, dst=BOB)], True)),
        ("sent", ([chat._replace(src=ME)], None)),
        ("pinged", ([Message("p1", WALL, 5, "PING", ME, BOB, "")],)),
        ("pong", (Pong(BOB, 4.321, "p1"),)),
        ("delivery", (Delivered("m3", BOB, 1, 4.3),)),
        ("delivery", (Delivered("m3", BOB, 3, 40.0),)),
        ("delivery", (Undelivered("m4", BOB, 2, True),)),
        ("delivery", (Undelivered("m4", BOB, 5, False),)),
        ("notice", ("two\nlines",)),
        ("error", ("bad \x07 thing",)),
        ("help", ()),
        ("stats", (stats,)),
        ("peers", (m1.peer_rows(net.now),)),
        ("peers", ([],)),
        ("who", (m1.who(net.now),)),
        ("map", (m1.mesh_map(net.now),)),
        ("why", (why,)),
        ("why", (dict(why, own=True, dst=BOB, retries=[{"mid": "r1", "after_ms": 500.0, "to": [BOB]}],
                      acked={"tries": 2, "rtt_ms": 3.0}),)),
        ("trace", (TraceResult(label(3), "t1", (TraceHop(1, BOB, 1.25), TraceHop(2, label(3), 2.5)), True),)),
        ("trace", (TraceResult(label(3), "t1", (), False),)),
        ("history", ([{"ts": WALL, "src": BOB, "dst": ME, "body": "old"}, {"ts": WALL, "src": ME, "dst": "",
                                                                             "body": "mine"}],)),
        ("history", ([],)),
        ("whoami", (ME, "ann", "1234 5678 9abc def0")),
        ("files", ([{"fid": "f" * 64, "state": "fetching", "have": 1 << 20, "size": 3 << 20, "name": "photo.jpg",
                     "src": BOB, "path": ""}],)),
        ("file_event", (FileOffered(offer, True, False),)),
        ("file_event", (FileProgress(offer.fid, "photo.jpg", 1 << 20, 3 << 20, 1 << 20, 2.0),)),
        ("file_event", (FileDone(offer.fid, "photo.jpg", "/tmp/photo.jpg", 3 << 20, "ab" * 32),)),
        ("file_event", (FileFailed(offer.fid, "photo.jpg", "the sender went away"),)),
        ("peer_state", (PeerUp(BOB, ("10.0.0.2", 9000), "bob"),)),
        ("peer_state", (PeerDown(BOB, ("10.0.0.2", 9000), ""),)),
    ]


def _terminal() -> "tuple[TerminalConsole, io.StringIO]":
    out = io.StringIO()
    t = TerminalConsole(out, color=False, interactive=False, columns=lambda: 10_000)
    t.name_of = names
    t.label = ME
    return t, out


def test_every_event_reads_as_the_terminal_console_shows_it():
    terminal, shown = _terminal()
    view = JsonView(names)
    assert view.lines({"event": "ready", "node": ME, "fingerprint": "1234 5678 9abc def0"})  # a node that signs
    for method, args in _calls():
        out = io.StringIO()
        getattr(JsonConsole(out), method)(*args)
        got = [line for raw in out.getvalue().splitlines() for line in view.lines(json.loads(raw))]
        shown.seek(0)
        shown.truncate()
        if method == "sent":  # the terminal's own signature: the name of the destination, as the CLI gives it
            dst = args[0][0].dst
            terminal.sent(args[0], to=names(dst) if dst else "", encrypted=args[1])
        else:
            getattr(terminal, method)(*args)
        want = [line[len("HH:MM:SS "):] for line in shown.getvalue().splitlines()]
        if method == "notice":  # the terminal escapes a newline in one notice; we show its lines
            want = ["* two", "* lines"]
        assert got == want, (method, args)
        assert not any("{'" in line or "\x1b" in line or "\x07" in line for line in got)


def test_the_marks_people_rely_on():
    view = JsonView(names)
    view.lines({"event": "ready", "node": ME, "fingerprint": "1234 5678 9abc def0"})
    out = io.StringIO()
    j = JsonConsole(out)
    j.chat(Message("m2", WALL, 5, "CHAT", BOB, ME, "psst", {"nick": "bob"}), False, True, None, True)
    j.sent([Message("m5", WALL, 5, "CHAT", ME, BOB, "hi", {})], encrypted=False)
    j.delivery(Delivered("m5", BOB, 1, 4.3))
    got = [line for raw in out.getvalue().splitlines() for line in view.lines(json.loads(raw))]
    assert got == [f"<{names(BOB)}> (private, encrypted) psst", f"<you> (private to {names(BOB)}, in clear) hi",
                   f"\u2713 delivered to {names(BOB)} (4 ms)"]


def test_a_node_that_cannot_sign_marks_nobody_unverified_and_no_line_encrypted_or_in_clear():
    view = JsonView(names)
    view.lines({"event": "ready", "node": ME})  # no fingerprint: no key
    out = io.StringIO()
    JsonConsole(out).chat(Message("m2", WALL, 5, "CHAT", BOB, ME, "psst", {"nick": "bob"}))
    assert view.lines(json.loads(out.getvalue())) == [f"<{names(BOB)}> (private) psst"]


def test_every_event_the_json_console_writes_is_known():
    source = inspect.getsource(JsonConsole)
    written = set(re.findall(r'emit\(\s*"(\w+)"', source)) | set(re.findall(r'"(peer_\w+)"', source))
    assert written >= {"chat", "sent", "why", "map", "trace", "file_offer", "peer_up", "peer_down"}
    assert written <= set(_SHOW), written - set(_SHOW)


@pytest.mark.parametrize("event", [
    {"event": "brand_new", "n": 3, "hops": [{"hop": 1, "label": "x"}], "why": "it\x1b[2J"},
    {"event": "trace", "target": "x", "hops": "not a list"},
    {"event": "chat", "mid": "m", "src": "a:1"},
    {"event": "delivered", "mid": "m", "dst": "a:1", "tries": "two", "rtt_ms": None},
    {"no": "event"},
])
def test_an_unknown_or_malformed_event_is_one_readable_line(event):
    [line] = JsonView().lines(event)
    assert line.startswith("* ") and "{'" not in line and "\x1b" not in line
    if event.get("event") == "brand_new":
        assert line == '* brand_new: n 3, hops [{"hop":1,"label":"x"}], why it\\x1b[2J'
