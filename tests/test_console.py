import io
import json
import random
import re
import unicodedata

import colorama
import pytest

from meshchat.console import JsonConsole, TerminalConsole, peer_lines, sanitize, who_lines
from meshchat.commands import HELP, MAX_LINE_BYTES, Bad, Help, Nick, Nothing, Peers, Ping, Quit, Say, Stats, Who, parse_line
from meshchat.membership import display_name, tag_of
from meshchat.relay import Display, Notice, Pong
from meshchat.wire import Message

UNSAFE = ("Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs")


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
    # Names are only checked for their form here; the CLI resolves them (or refuses them).
    ("@alice hi there", Say("hi there", "alice")),
    ("@alice#k3f9 hi", Say("hi", "alice#k3f9")),
    ("@127.0.0.1 hi", Say("hi", "127.0.0.1")),
    ("/msg alice hello there", Say("hello there", "alice")),
    ("/msg 127.0.0.1:9002 hi", Say("hi", "127.0.0.1:9002")),
    ("/ping alice", Ping("alice")),
    ("/ping bob#ab12", Ping("bob#ab12")),
    ("/nick bob", Nick("bob")),
    ("/nick  ünï ", Nick("ünï")),
    ("/nick", Nick()),
    ("/who", Who()),
])
def test_parse_line(line, command):
    assert parse_line(line) == command


@pytest.mark.parametrize("line, error", [
    ("@127.0.0.1:99999 hi", "port"),
    ("@:9001 hi", "HOST:PORT"),
    ("@al:ice hi", "HOST:PORT"),
    ("@127.0.0.1:9002", "nothing to send"),
    ("@127.0.0.1:9002    ", "nothing to send"),
    ("@alice", "nothing to send"),
    ("@ hi", "bad name"),
    ("@alice#k-3 hi", "bad name"),
    ("@al/ice hi", "bad name"),
    ("/msg", "/msg NAME text"),
    ("/msg alice   ", "nothing to send"),
    ("/msg a\\b hi", "bad name"),
    ("/ping al/ice", "bad name"),
    ("/ping ::1", "HOST:PORT"),
    ("/nick bob smith", "not a nick"),
    ("/nick a@b", "not a nick"),
    ("/nick a#b", "not a nick"),
    ("/nick " + "x" * 33, "not a nick"),
    ("/nick \x1b[2J", "not a nick"),
    ("/who is there", "takes nothing after it"),
    ("/frobnicate", "unknown command /frobnicate"),
    ("/quit now", "takes nothing after it"),
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
    ("lone \ud800 surrogate \udfff", "lone \\ud800 surrogate \\udfff"),
    ("zero\u200bwidth\u200c\u200d\u2060\ufeff", "zero\\u200bwidth\\u200c\\u200d\\u2060\\ufeff"),
    ("\u200emark\u200f\u061c\u2067isolate", "\\u200emark\\u200f\\u061c\\u2067isolate"),
    ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    ("tag\U000e0041\U000e007f", "tag\\U000e0041\\U000e007f"),
    ("\ufff9ruby\ufffaanno\ufffb", "\\ufff9ruby\\ufffaanno\\ufffb"),
    ("private \ue000 \U000f0000 \U0010fffd", "private \\ue000 \\U000f0000 \\U0010fffd"),
    ("unassigned \u0378 \U0010ffff", "unassigned \\u0378 \\U0010ffff"),
    ("soft\xadhyphen", "soft\\xadhyphen"),
    ("z" + "\u0301" * 6 + "!", "z\u0301\u0301\u0301" + "\\u0301" * 3 + "!"),
    ("e\u0301 \u05e9\u05c1\u05b8\u0591 \u0915\u094d\u0937\u093f 1\ufe0f\u20e3 \U0001f44d\U0001f3fd \u65e5\u672c",
     "e\u0301 \u05e9\u05c1\u05b8\u0591 \u0915\u094d\u0937\u093f 1\ufe0f\u20e3 \U0001f44d\U0001f3fd \u65e5\u672c"),
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
    assert text.startswith("\r\x1b[J") and text.endswith("\n> half a sen")


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
    assert events[1] == {"event": "chat", "mid": "m1", "src": "127.0.0.1:9002", "nick": "", "dst": "",
                         "body": "\x1b[2J", "ts": 1.0, "ttl": 7, "verified": False}
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
    assert "* received 9: handled 5, dropped 4\n" in line and "* dropped: duplicate 3, rate 1\n" in line
    assert "* handled: displayed 4, relayed 3, neither 1; a message can be both\n" in line
    assert "seen ids 5" in line and "2048 KiB" in line
    counters.update(relayed_late=2)
    TerminalConsole(out, color=False, interactive=False).stats(counters)
    assert "relayed 3 (2 late)" in out.getvalue()


def escape(o):
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def test_every_code_point_of_the_unsafe_categories_is_escaped_and_every_other_kept():
    # Each BMP code point after a base letter (so that a lone mark is allowed); then
    # the astral planes in one run, where a fourth mark in a row is escaped too.
    text = "".join("a" + chr(o) for o in range(0x10000)) + "a" + "".join(map(chr, range(0x10000, 0x110000)))
    expected, marks = [], 0
    for o in range(0x110000):
        category = unicodedata.category(chr(o))
        marks = marks + 1 if category[0] == "M" and o >= 0x10000 else 0
        kept = category not in UNSAFE and marks <= 3
        expected.append(("a" if o < 0x10000 else "") + (chr(o) if kept else escape(o)))
    assert sanitize(text) == "".join(expected[:0x10000]) + "a" + "".join(expected[0x10000:])


def test_sanitized_text_never_holds_an_unsafe_character_nor_more_than_three_marks():
    rng = random.Random(8)
    pool = [chr(o) for o in (0x41, 0x20, 0x0301, 0x0489, 0x0903, 0x200d, 0x202e, 0xd800, 0xdc00, 0xe000,
                             0xfeff, 0x2028, 0x65e5, 0x1f600, 0xe0041, 0x10ffff, 0x1b, 0x9b)]
    marks = re.compile("[\u0300-\u036f\u0489\u0903]{4}")
    for _ in range(2000):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 40)))
        shown = sanitize(text)
        shown.encode("utf-8")  # no surrogate is left to break the terminal's encoding
        assert not any(unicodedata.category(ch) in UNSAFE for ch in shown), repr(text)
        assert not marks.search(shown), repr(text)


def test_plain_ascii_is_returned_as_it_is():
    text = "hello, mesh! <bob> [1/2] ~"
    assert sanitize(text) is text


def lines_of(con_out: str):
    return con_out.getvalue().split("\n")[:-1]


def test_a_long_body_wraps_under_its_own_start_and_never_looks_like_another_line():
    from meshchat.console import text_width
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=False, columns=lambda: 60)
    body = "spam " * 5 + "12:00:00 <127.0.0.1:9003> forged " + "日本語のテキスト" * 4 + "x" * 50
    con.chat(chat(body=body))
    rows = lines_of(out)
    assert len(rows) > 3
    indent = len("12:00:00 <127.0.0.1:9002> ")
    assert re.match(r"\d\d:\d\d:\d\d <127\.0\.0\.1:9002> spam", rows[0])
    for row in rows:
        assert text_width(row) <= 59  # one column spare
    for row in rows[1:]:
        assert row.startswith(" " * indent) and row[indent] != " "
    assert "".join(row[indent:] for row in rows).replace(" ", "") == body.replace(" ", "")


def test_colour_codes_take_no_room_when_wrapping():
    plain, coloured = io.StringIO(), io.StringIO()
    for out, color in ((plain, False), (coloured, True)):
        con = TerminalConsole(out, color=color, interactive=False, columns=lambda: 30)
        con.chat(chat(dst="127.0.0.1:9001", body="private words " * 6))
        con.notice("a notice that is long enough to wrap over two rows")
    strip = re.compile("\x1b\\[[0-9;]*m")
    assert strip.sub("", coloured.getvalue()) == plain.getvalue()
    assert len(lines_of(plain)) >= 5


def test_a_label_longer_than_half_the_width_still_leaves_room_for_the_body():
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=False, columns=lambda: 30)
    con.chat(chat(src="a" * 40 + ":9002", body="b" * 40))
    rows = lines_of(out)
    assert all(len(r) <= 29 for r in rows) and all(r.startswith(" " * 15) for r in rows[1:])


def interactive(typed="", columns=20):
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=True, get_typed=lambda: typed, columns=lambda: columns)
    return out, con


@pytest.mark.parametrize("typed, up", [
    ("", ""),
    ("x" * 17, ""),  # "> " and 17 characters: 19 columns, one row
    ("x" * 30, "\x1b[1A"),  # 32 columns: two rows, the cursor on the second
    ("x" * 60, "\x1b[3A"),  # 62 columns: four rows
    ("日本" * 8, "\x1b[1A"),  # 16 wide characters are 32 columns
])
def test_typed_text_over_several_rows_is_cleared_and_drawn_again(typed, up):
    out, con = interactive(typed)
    con.reading = True
    con.chat(chat(body="incoming"))
    text = out.getvalue()
    assert text.startswith(up + "\r\x1b[J") and text.endswith("\n> " + typed)


def test_typed_text_filling_its_last_row_puts_the_cursor_on_the_next_as_readline_does():
    out, con = interactive("x" * 18)  # "> " and 18: exactly 20 columns
    con.reading = True
    con.chat(chat(body="incoming"))
    text = out.getvalue()
    assert text.startswith("\x1b[1A\r\x1b[J") and text.endswith("\n> " + "x" * 18 + " \r")


@pytest.mark.parametrize("typed, up", [("short", "\x1b[1A"), ("y" * 30, "\x1b[2A"), ("y" * 50, "\x1b[3A")])
def test_the_echo_of_an_entered_line_is_replaced_over_all_its_rows(typed, up):
    out, con = interactive()
    con.sent([chat(src="127.0.0.1:9001", body=typed)], replace_typed=typed)
    assert out.getvalue().startswith(up + "\r\x1b[J")
    assert "\x1b[" not in out.getvalue()[len(up) + 4:], "only the first line replaces the echo"


def test_no_sender_colour_is_that_of_private_marks_notices_or_errors():
    from meshchat.console import _PALETTE
    fore = colorama.Fore
    taken = {fore.MAGENTA, fore.LIGHTMAGENTA_EX, fore.YELLOW, fore.LIGHTYELLOW_EX, fore.RED, fore.LIGHTRED_EX}
    assert not {getattr(fore, name) for name in _PALETTE} & taken
    con = TerminalConsole(io.StringIO(), color=True, interactive=False)
    used = {con._color_of(f"10.0.{i // 250}.{i % 250}:{9000 + i}") for i in range(500)}
    assert used == {getattr(fore, name) for name in _PALETTE} and not used & taken


def test_stats_are_a_few_short_lines_whose_figures_do_not_pretend_to_add_up():
    from meshchat.console import stats_lines
    from meshchat.relay import COUNTERS
    counters = {name: 12_345_678 for name in COUNTERS}
    counters.update(dropped_some_future_reason=7, seen_size=100_000, rcvbuf_bytes=2048 * 1024)
    lines = stats_lines(counters)
    reasons = sum(1 for name in counters if name.startswith("dropped_"))
    assert len(lines) <= 5 + reasons // 2 and all(len(line) <= 68 for line in lines)
    out = io.StringIO()
    TerminalConsole(out, color=False, interactive=False, columns=lambda: 80).stats(counters)
    assert len(lines_of(out)) == len(lines), "each fits a row of 80 columns with its time and mark"
    assert "both" in "".join(lines) and "(displayed" not in "".join(lines)


@pytest.mark.parametrize("part, shown", [
    ([2, 4], (2, 4)),
    ([1, 1], (1, 1)),
    ([1000, 1000], (1000, 1000)),
    ([0, 4], None),
    ([5, 4], None),
    ([1, 1001], None),
    ([True, 2], None),
    ([1.0, 2], None),
    ([1, 2, 3], None),
    ([1], None),
    ("1/4", None),
    ({"i": 1, "n": 2}, None),
    (None, None),
    ([-1, 10**40], None),
])
def test_a_part_mark_is_checked_where_it_is_shown(part, shown):
    from meshchat.console import part_of
    m = chat()._replace(extra={"part": part, "other": 1})
    assert part_of(m) == shown
    out, jout = io.StringIO(), io.StringIO()
    TerminalConsole(out, color=False, interactive=False).chat(m)
    JsonConsole(jout).chat(m)
    event = json.loads(jout.getvalue())
    if shown:
        assert f"<127.0.0.1:9002> ({shown[0]}/{shown[1]}) hi" in out.getvalue() and event["part"] == list(shown)
    else:
        assert "<127.0.0.1:9002> hi" in out.getvalue() and "part" not in event
    assert "other" not in event


def test_our_own_parts_are_marked_in_the_terminal_and_in_json():
    mine = [chat(src="127.0.0.1:9001", body=b)._replace(extra={"part": [i + 1, 2]}) for i, b in enumerate("ab")]
    out, jout = io.StringIO(), io.StringIO()
    TerminalConsole(out, color=False, interactive=False).sent(mine)
    JsonConsole(jout).sent(mine)
    rows = lines_of(out)
    assert rows[0].endswith("<you> (1/2) a") and rows[1].endswith("<you> (2/2) b")
    assert [json.loads(line)["part"] for line in lines_of(jout)] == [[1, 2], [2, 2]]


def test_notices_and_errors_are_sanitized_too():
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=False)
    con.notice("clock of \x1b[2Jx\u202e")
    con.error("bad \u2028 thing")
    assert "\x1b" not in out.getvalue() and "\\x1b[2Jx\\u202e" in out.getvalue() and "\\u2028" in out.getvalue()


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


def test_senders_are_shown_by_nick_and_tag_so_two_alices_differ():
    one, two = "10.0.0.1:9001", "10.0.0.2:9001"
    out, jout = io.StringIO(), io.StringIO()
    con, jcon = TerminalConsole(out, color=False, interactive=False), JsonConsole(jout)
    for src, dst in ((one, ""), (two, ""), (one, "10.0.0.3:9001")):
        m = chat(src=src, dst=dst)._replace(extra={"nick": "alice"})
        con.chat(m)
        jcon.chat(m)
    rows = lines_of(out)
    assert tag_of(one) != tag_of(two)
    assert rows[0].endswith(f"<alice#{tag_of(one)}> hi") and rows[1].endswith(f"<alice#{tag_of(two)}> hi")
    assert rows[2].endswith(f"<alice#{tag_of(one)}> (private) hi")
    events = [json.loads(line) for line in lines_of(jout)]
    assert [(e["src"], e["nick"]) for e in events] == [(one, "alice"), (two, "alice"), (one, "alice")]


@pytest.mark.parametrize("nick", ["", "bad nick", "a@b", "x" * 33, 7, ["alice"], None, "\u202ealice"])
def test_a_missing_or_invalid_nick_falls_back_to_the_label(nick):
    m = chat()._replace(extra={"nick": nick})
    out, jout = io.StringIO(), io.StringIO()
    TerminalConsole(out, color=False, interactive=False).chat(m)
    JsonConsole(jout).chat(m)
    assert out.getvalue().endswith("<127.0.0.1:9002> hi\n")
    assert json.loads(jout.getvalue())["nick"] == ""


WHO = [
    {"label": "127.0.0.1:9001", "nick": "me", "hops": 0, "last_seen_s": 0.0, "state": "you"},
    {"label": "127.0.0.1:9002", "nick": "alice", "hops": 1, "last_seen_s": 0.4, "state": "neighbour up"},
    {"label": "127.0.0.1:9003", "nick": "", "hops": None, "last_seen_s": 12.25, "state": "alive"},
    {"label": "127.0.0.1:9004", "nick": "日本", "hops": 3, "last_seen_s": None, "state": "neighbour unknown"},
]


def test_who_is_an_aligned_table_in_the_terminal_and_the_rows_in_json():
    out, jout = io.StringIO(), io.StringIO()
    TerminalConsole(out, color=False, interactive=False, columns=lambda: 100).who(WHO)
    JsonConsole(jout).who(WHO)
    rows = [row.split(" * ", 1)[1] for row in lines_of(out)]
    assert rows[0] == "3 other nodes known in the mesh"
    assert rows[1].split() == ["name", "label", "hops", "last", "seen", "state"]
    assert rows[2].split() == [display_name("127.0.0.1:9001", "me"), "127.0.0.1:9001", "0", "-", "you"]
    assert rows[3].split() == [f"alice#{tag_of('127.0.0.1:9002')}", "127.0.0.1:9002", "1", "0.4", "s", "ago",
                               "neighbour", "up"]
    assert rows[4].split() == ["127.0.0.1:9003", "127.0.0.1:9003", "?", "12", "s", "ago", "alive"]
    assert rows[5].split()[:4] == [f"日本#{tag_of('127.0.0.1:9004')}", "127.0.0.1:9004", "3", "never"]
    from meshchat.console import text_width
    starts = {text_width(row[:row.index("127.0.0.1", 1)]) for row in rows[2:]}
    assert len(starts) == 1, "the label column starts at one place, wide characters counted twice"
    assert json.loads(jout.getvalue()) == {"event": "who", "nodes": WHO}


PEERS = [
    {"addr": "127.0.0.1:9002", "label": "127.0.0.1:9002", "nick": "alice", "configured": True, "state": "up",
     "last_heard_s": 0.3, "rtt_ms": 0.42, "loss": 0.0},
    {"addr": "127.0.0.1:9003", "label": "127.0.0.1:9003", "nick": "", "configured": True, "state": "legacy",
     "last_heard_s": 4.0, "rtt_ms": None, "loss": None},
    {"addr": "192.168.1.5:9004", "label": "lab.lan:9004", "nick": "bob", "configured": False, "state": "down",
     "last_heard_s": 21.5, "rtt_ms": None, "loss": 0.25},
]


def test_peers_show_state_last_heard_rtt_and_loss_in_columns():
    out, jout = io.StringIO(), io.StringIO()
    TerminalConsole(out, color=False, interactive=False, columns=lambda: 120).peers(PEERS)
    JsonConsole(jout).peers(PEERS)
    rows = [row.split(" * ", 1)[1] for row in lines_of(out)]
    assert rows[0].split() == ["name", "address", "kind", "state", "heard", "rtt", "loss"]
    assert rows[1].split() == [f"alice#{tag_of('127.0.0.1:9002')}", "127.0.0.1:9002", "peer", "up", "0.3", "s",
                               "0.4", "ms", "0%"]
    assert rows[2].split() == ["-", "127.0.0.1:9003", "peer", "legacy", "4.0", "s", "-", "-"]
    assert rows[3].split() == [f"bob#{tag_of('lab.lan:9004')}", "192.168.1.5:9004", "(lab.lan:9004)", "found",
                               "down", "22", "s", "-", "25%"]
    assert len({row.index("peer") if "peer" in row else row.index("found") for row in rows[1:]}) == 1
    assert json.loads(jout.getvalue())["peers"] == PEERS


def test_peers_and_who_of_a_small_mesh_fit_80_columns_a_row_each():
    rows = [dict(PEERS[0], addr=f"192.168.1.{i}:9001", label=f"192.168.1.{i}:9001", nick="alice1",
                 configured=False, state="unknown", last_heard_s=100.25, rtt_ms=1234.5, loss=0.125)
            for i in range(10, 13)]
    who = [dict(WHO[1], label=r["label"], nick="alice1", state="neighbour unknown", last_seen_s=100.25) for r in rows]
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=False, columns=lambda: 80)
    con.peers(rows)
    con.who(who)
    assert len(lines_of(out)) == 1 + len(rows) + 2 + len(who), "no row wrapped"


def test_peers_without_membership_keep_the_old_lines_and_an_empty_table_says_so():
    old = [{"addr": "127.0.0.1:9002", "configured": True, "last_heard_s": None},
           {"addr": "127.0.0.1:9005", "configured": False, "last_heard_s": 2.0}]
    assert peer_lines(old) == ["peer  127.0.0.1:9002  never heard from", "heard 127.0.0.1:9005  last heard 2.0 s ago"]
    assert peer_lines([]) == ["no neighbours yet"]
    assert who_lines([]) == ["nobody known: this node has no membership"]


def test_a_nick_from_the_network_is_made_harmless_in_tables():
    rows = [dict(WHO[1], nick="a\u0301\u0301\u0301\u0301\u0301")]
    assert all("\\u0301" in line for line in who_lines(rows)[2:])


def test_help_names_the_new_commands():
    for command in ("/nick NAME", "/who", "/msg NAME text", "@NAME text", "nick#tag"):
        assert command in HELP


class _CountingStream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


@pytest.mark.parametrize("make", [lambda s: JsonConsole(s), lambda s: TerminalConsole(s, color=False, interactive=False)])
def test_a_batch_of_events_is_written_with_one_flush(make):
    stream = _CountingStream()
    console = make(stream)
    msgs = [Message("m%d" % i, 1.0, 3, "CHAT", "1.2.3.4:5", "", "hello %d" % i) for i in range(5)]
    with console.batch():
        for m in msgs:
            console.show(Display(m))
    assert stream.flushes == 1 and all("hello %d" % i in stream.getvalue() for i in range(5))
    console.show(Display(msgs[0]))
    assert stream.flushes == 2  # outside a batch, each event is flushed as it is written


# -- files: /send, /accept, /cancel parsed; progress rows redrawn in place above the prompt ----------

from meshchat.console import progress_text  # noqa: E402
from meshchat.commands import FileCmd, SendFile  # noqa: E402
from meshchat.files import FileDone, FileProgress  # noqa: E402


@pytest.mark.parametrize("line, command", [
    ("/send photo.jpg", SendFile("photo.jpg")),
    ("/send My Photos/summer day.jpg", SendFile("My Photos/summer day.jpg")),  # spaces are the path's
    ("/send @alice notes.txt", SendFile("notes.txt", "alice")),
    ("/send @bob#ab12 a b.txt", SendFile("a b.txt", "bob#ab12")),
    ("/send @127.0.0.1:9002 x", SendFile("x", "127.0.0.1:9002")),
    ("/accept 3f9a2c", FileCmd("accept", "3f9a2c")),
    ("/accept 3F9A2C", FileCmd("accept", "3f9a2c")),
    ("/cancel 0123456789abcdef", FileCmd("cancel", "0123456789abcdef")),
])
def test_file_commands_parse(line, command):
    assert parse_line(line) == command


@pytest.mark.parametrize("line, error", [
    ("/send", "/send PATH"),
    ("/send   ", "/send PATH"),
    ("/send @al/ice x.txt", "bad name"),
    ("/accept", "/accept ID"),
    ("/accept two words", "/accept ID"),
    ("/accept ../x", "/accept ID"),
    ("/cancel " + "a" * 17, "/cancel ID"),
])
def test_bad_file_commands_get_one_clear_error(line, error):
    cmd = parse_line(line)
    assert isinstance(cmd, Bad) and error in cmd.error and "\n" not in cmd.error


def progress(have: int, fid: str = "f1", name: str = "photo.jpg") -> FileProgress:
    return FileProgress(fid, name, have, 1000, 250.0, (1000 - have) / 250.0)


def test_progress_text_says_percent_rate_and_time_left():
    assert progress_text(progress(500)) == "photo.jpg [##########..........] 50% 250 B/s, 2 s left"
    assert progress_text(progress(1000)).endswith("100% 250 B/s")
    assert progress_text(progress(0)) == "photo.jpg [....................] 0% waiting for a neighbour that has it"


def test_a_progress_row_is_redrawn_in_place_above_the_prompt_and_lines_go_above_it():
    out, con = interactive("half", columns=80)
    con.reading = True
    con.file_event(progress(100))
    first = out.getvalue()
    # No row of it yet: clear from the prompt's row, the progress row, the prompt and what is typed.
    assert first == "\r\x1b[J" + progress_text(progress(100)) + "\n> half"
    out.truncate(0), out.seek(0)
    con._progress_shown["f1"] = float("-inf")  # as if a quarter second had gone by
    con.file_event(progress(500))
    assert out.getvalue() == "\x1b[1A\r\x1b[J" + progress_text(progress(500)) + "\n> half"  # in place
    out.truncate(0), out.seek(0)
    con.chat(chat(body="incoming"))
    text = out.getvalue()
    # The chat line goes where the progress row was, and the row and the prompt come back under it.
    assert text.startswith("\x1b[1A\r\x1b[J") and text.endswith("incoming\n" + progress_text(progress(500)) + "\n> half")
    out.truncate(0), out.seek(0)
    con.file_event(FileDone("f1", "photo.jpg", "/d/photo.jpg", 1000, "ab"))
    text = out.getvalue()
    assert text.startswith("\x1b[1A\r\x1b[J") and text.endswith("/d/photo.jpg\n> half")  # the row is gone


def test_progress_rows_are_redrawn_a_few_times_a_second_at_most_and_fit_one_row():
    out, con = interactive()
    con.file_event(progress(100, name="x" * 200))
    drawn = out.getvalue()
    con.file_event(progress(200, name="x" * 200))  # at once: not drawn again
    assert out.getvalue() == drawn
    row = drawn.split("\r\x1b[J", 1)[1].split("\n")[0]
    assert len(row) <= 19 and row.endswith("...")


def test_not_interactive_progress_is_a_line_now_and_then():
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=False)
    con.file_event(progress(100))
    con.file_event(progress(200))
    assert out.getvalue().count("photo.jpg [") == 1 and "\x1b[" not in out.getvalue()


def test_history_names_a_sender_by_the_nick_its_message_carried_until_the_mesh_knows_it():
    out = io.StringIO()
    con = TerminalConsole(out, color=False, interactive=False)
    con.label = "127.0.0.1:9001"
    rows = [{"mid": "m1", "ts": 1.0, "src": "127.0.0.1:9002", "dst": "", "kind": "CHAT", "body": "hi",
             "late": False, "nick": "bob"}]
    con.history(rows, replay=True)
    assert display_name("127.0.0.1:9002", "bob") in out.getvalue() and "the last 1 message," in out.getvalue()


def test_a_cancelled_file_is_a_notice_with_the_way_back_and_a_failed_one_an_error_with_it():
    from meshchat.files import FileFailed

    out = io.StringIO()
    c = TerminalConsole(out, color=False, interactive=False)
    c.show(FileFailed("0123456789abcdef", "c.bin", "cancelled"))
    c.show(FileFailed("fedcba9876543210", "d.bin", "stalled"))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("* file 'c.bin' (012345) cancelled; /accept 012345 fetches it again")
    assert lines[1].endswith("! file 'd.bin' (fedcba) failed: stalled; /accept fedcba tries again")


def test_a_direct_files_offer_says_at_its_destination_that_it_is_for_it_only_and_how_it_came():
    from meshchat.files import FileOffered

    from test_files import make_offer

    out = io.StringIO()
    c = TerminalConsole(out, color=False, interactive=False, columns=lambda: 200)
    c.label = "127.0.0.1:9002"
    offer, _ = make_offer(b"x" * 100, src="127.0.0.1:9001", dst="127.0.0.1:9002")
    c.show(FileOffered(offer._replace(key="ab" * 32), True, True))
    c.show(FileOffered(offer, True, True))
    c.show(FileOffered(offer._replace(dst=""), True, True))
    lines = out.getvalue().splitlines()
    assert "to you only, end-to-end encrypted: fetching it" in lines[0]
    assert "to you only, not encrypted: fetching it" in lines[1]
    assert "to you only" not in lines[2]


def test_leaving_wipes_the_progress_rows_and_the_prompt():
    out, con = interactive("half", columns=80)
    con.reading = True
    con.file_event(progress(100))
    out.truncate(0), out.seek(0)
    con.leave()
    assert out.getvalue() == "\x1b[1A\r\x1b[J"  # up over the row (the prompt is on the cursor's row), wipe
    out.truncate(0), out.seek(0)
    con.reading = False
    con.leave()
    assert out.getvalue() == "", "nothing drawn: nothing to wipe"


def test_a_command_entered_under_a_progress_row_keeps_its_echo_above_the_row():
    out, con = interactive("", columns=80)
    con.file_event(progress(100))
    out.truncate(0), out.seek(0)
    con.entered("/cancel f1")
    # From the row Enter moved to: up over the echo and the progress row; the echo, then the row again.
    assert out.getvalue() == "\x1b[2A\r\x1b[J> /cancel f1\n" + progress_text(progress(100)) + "\n"
    out.truncate(0), out.seek(0)
    con.file_event(FileDone("f1", "photo.jpg", "/d/photo.jpg", 1000, "ab"))
    assert out.getvalue().startswith("\x1b[1A\r\x1b[J"), "then only the row is gone over, not the echo"


def test_stats_show_file_sharing_and_its_bulk_socket_when_the_node_shares_files():
    from meshchat.console import stats_lines
    from meshchat.relay import COUNTERS
    counters = {name: 0 for name in COUNTERS}
    counters.update(seen_size=0, rcvbuf_bytes=0)
    assert not any(line.startswith(("files:", "bulk")) for line in stats_lines(counters))
    counters.update(files_offered=2, files_done=1, file_pieces_received=6783, bulk_sent=5, bulk_received=6791)
    text = " ".join(stats_lines(counters))
    assert "files: offered 2, done 1" in text and "pieces received 6783" in text
    assert "bulk socket (file pieces): sent 5, received 6791" in text
    assert all(len(line) <= 68 for line in stats_lines(counters))
