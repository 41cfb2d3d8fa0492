import io
import json

import pytest

from meshchat.console import (HELP, MAX_LINE_BYTES, Bad, Help, JsonConsole, Nothing, Peers, Ping,
                              Quit, Say, Stats, TerminalConsole, parse_line, sanitize)
from meshchat.relay import Display, Notice, Pong
from meshchat.wire import Message


@pytest.mark.parametrize("line, command", [
    ("hello everyone!\n", Say("hello everyone!")),
    ("@127.0.0.1:9003 private message for node 3", Say("private message for node 3", "127.0.0.1:9003")),
    ("@localhost:9002 hi", Say("hi", "localhost:9002")),
    ("/ping", Ping()),
    ("/ping 127.0.0.1:9002", Ping("127.0.0.1:9002")),
    ("/peers", Peers()),
    ("/stats", Stats()),
    ("/help", Help()),
    ("/quit", Quit()),
    ("//not a command", Say("/not a command")),
    ("", Nothing()),
    ("   \r\n", Nothing()),
    ("what's up mesh?", Say("what's up mesh?")),
])
def test_parse_line(line, command):
    assert parse_line(line) == command


@pytest.mark.parametrize("line, error", [
    ("@127.0.0.1 hi", "HOST:PORT"),
    ("@127.0.0.1:99999 hi", "port"),
    ("@:9001 hi", "HOST:PORT"),
    ("@127.0.0.1:9002", "nothing to send"),
    ("@127.0.0.1:9002    ", "nothing to send"),
    ("/ping nowhere", "HOST:PORT"),
    ("/frobnicate", "unknown command /frobnicate"),
    ("/quit now", "unknown command"),
    ("x" * (MAX_LINE_BYTES + 1), "64 KiB"),
])
def test_bad_lines_get_one_clear_error(line, error):
    cmd = parse_line(line)
    assert isinstance(cmd, Bad) and error in cmd.error and "\n" not in cmd.error


@pytest.mark.parametrize("text, shown", [
    ("plain text ünïcode ☃", "plain text ünïcode ☃"),
    ("\x1b[2J\x1b]0;pwned\x07", "\\x1b[2J\\x1b]0;pwned\\x07"),
    ("line\r<alice> fake", "line\\x0d<alice> fake"),
    ("a\nb\tc\x08\x7f\x9b", "a\\x0ab\\x09c\\x08\\x7f\\x9b"),
    ("\u202eevil\u2066x\u2069", "\\u202eevil\\u2066x\\u2069"),
])
def test_sanitize_shows_control_characters_as_escapes(text, shown):
    assert sanitize(text) == shown


def chat(src="127.0.0.1:9002", dst="", body="hi"):
    return Message("m1", 1.0, 7, "CHAT", src, dst, body)


def test_plain_terminal_lines_have_no_colour_codes_and_are_safe():
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=False)
    con.show(Display(chat(body="\x1b[31mred")))
    con.show(Display(chat(dst="127.0.0.1:9001", body="secret")))
    con.show(Pong("127.0.0.1:9003", 1.5, "m9"))
    con.show(Notice("hello"))
    con.error("oops")
    text = out.getvalue()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].endswith("<127.0.0.1:9002> \\x1b[31mred")
    assert "(private)" in lines[1] and "secret" in lines[1]
    assert lines[2].endswith("* pong from 127.0.0.1:9003: 1.5 ms")
    assert lines[3].endswith("* hello") and lines[4].endswith("! oops")


def test_colour_is_stable_per_sender():
    out = io.StringIO()
    con = TerminalConsole(out, color=True, interactive=False)
    con.chat(chat(src="10.0.0.1:1"))
    con.chat(chat(src="10.0.0.1:1"))
    first, second = out.getvalue().splitlines()
    assert "\x1b[" in first and first[first.index("<") - 20:] == second[second.index("<") - 20:]


def test_interactive_line_redraws_the_prompt_and_what_was_typed():
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=True, get_typed=lambda: "half a sen")
    con.reading = True
    con.chat(chat(body="incoming"))
    text = out.getvalue()
    assert text.startswith("\r\x1b[2K") and text.endswith("\n> half a sen")


def test_json_console_writes_one_object_per_line():
    out = io.StringIO()
    con = JsonConsole(out)
    con.ready("127.0.0.1:9001")
    con.show(Display(chat(body="\x1b[2J")))
    con.sent([chat(src="127.0.0.1:9001", body="mine")])
    con.show(Pong("127.0.0.1:9003", 1.5, "m9"))
    con.error("bad")
    con.notice("note")
    con.stats({"received": 1})
    con.help()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["ready", "chat", "sent", "pong", "error", "notice", "stats",
                                            "notice"]
    assert events[1] == {"event": "chat", "mid": "m1", "src": "127.0.0.1:9002", "dst": "", "body": "\x1b[2J",
                         "ts": 1.0, "ttl": 7}
    assert events[3]["rtt_ms"] == 1.5 and events[7]["text"] == HELP
    assert "\x1b" not in out.getvalue()


def test_broken_stdout_is_reported_once_and_then_ignored():
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    calls = []
    con = JsonConsole(Broken(), on_broken=lambda: calls.append(1))
    con.notice("a")
    con.notice("b")
    assert con.broken and calls == [1]


def test_terminal_stats_name_each_drop_reason():
    from meshchat.relay import COUNTERS
    out = io.StringIO()
    counters = dict.fromkeys(COUNTERS, 0)
    counters.update(received=9, handled=5, displayed=4, relayed=3, consumed=1, dropped_duplicate=3,
                    dropped_rate=1, seen_size=5, rcvbuf_bytes=2048 * 1024)
    TerminalConsole(out, color=False, interactive=False).stats(counters)
    line = out.getvalue()
    assert "received 9: handled 5 (displayed 4, relayed 3, consumed 1), dropped 4 (duplicate 3, rate 1)" in line
    assert "seen ids 5" in line and "2048 KiB" in line
    counters.update(relayed_late=2)
    TerminalConsole(out, color=False, interactive=False).stats(counters)
    assert "relayed 3 (2 late)" in out.getvalue()


@pytest.mark.parametrize("encoding", ["utf-8", "ascii", "cp1252"])
@pytest.mark.parametrize("interactive", [False, True])
def test_a_string_the_stream_cannot_encode_is_written_as_escapes_not_a_broken_console(encoding, interactive):
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding, errors="strict", write_through=True)
    calls = []
    con = TerminalConsole(out, color=False, interactive=interactive, on_broken=lambda: calls.append(1))
    con.notice("lone \ud800 surrogate, é, ☃")
    con.show(Display(chat(src="127.0.0.1:9002", body="body \udfff here")))
    con.show(Pong("127.0.0.1:9003", 1.5, "m9"))
    con.notice("after")
    assert not con.broken and calls == []
    text = raw.getvalue().decode(encoding)
    assert "lone \\ud800 surrogate" in text and "\\udfff" in text and "pong from" in text and "after" in text
    # What the stream can write is written as it is.
    assert ("é" in text) == (encoding != "ascii") and ("☃" in text) == (encoding == "utf-8")


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_json_console_writes_any_string_to_any_stream(encoding):
    raw = io.BytesIO()
    con = JsonConsole(io.TextIOWrapper(raw, encoding=encoding, write_through=True))
    con.show(Display(chat(body="\ud800 é \U0001f600")))
    con.notice("\udfff")
    assert not con.broken
    events = [json.loads(line) for line in raw.getvalue().decode(encoding).splitlines()]
    assert events[0]["body"] == "\ud800 é \U0001f600" and events[1]["text"] == "\udfff"
