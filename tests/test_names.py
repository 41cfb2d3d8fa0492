"""Names at the console: /nick, /who, /msg and @nick, senders shown by nick#tag, /peers with liveness.

Real nodes on loopback in this process (``Cluster``), driven through the CLI's
own ``run_command`` with a JSON or terminal console writing to a string; and
real ``meshchat`` processes for what the CLI does between the node and the
console (which extra fields of a message it keeps for showing).
"""

import io
import json

from meshchat.cli import run_command, shown_nick
from meshchat.console import JsonConsole, TerminalConsole
from meshchat.commands import parse_line
from meshchat.membership import MembershipConfig, display_name, tag_of
from meshchat.relay import Display, Pong
from meshchat.wire import Message

from nodes import Cluster
from ports import free_ports
from procs import Proc

FAST = MembershipConfig(label="", hello_max_s=0.4)


class Screen:
    """A console writing to a string, and what it has said so far."""

    def __init__(self, json_mode: bool = True) -> None:
        self.out = io.StringIO()
        self.console = (JsonConsole(self.out) if json_mode
                        else TerminalConsole(self.out, color=False, interactive=False, columns=lambda: 160))
        self._read = 0

    def type(self, line: str, node) -> list:
        """Run one typed line on ``node``; the JSON events (or terminal rows) it printed."""
        assert run_command(parse_line(line), node, self.console)
        text = self.out.getvalue()[self._read:]
        self._read += len(text)
        rows = text.splitlines()
        return [json.loads(row) for row in rows] if isinstance(self.console, JsonConsole) else rows


def test_nick_then_who_on_another_node():
    with Cluster(2, [(1, 2)], membership=FAST) as c:
        one, two = Screen(), Screen(json_mode=False)
        [said] = one.type("/nick alice", c[1].node)
        assert said == {"event": "notice", "text": f"you are now {display_name(c[1].label, 'alice')}; the mesh is told"}
        c.wait_until(lambda: any(r["nick"] == "alice" for r in c[2].node.who()))
        rows = two.type("/who", c[2].node)
        line = next(r for r in rows if c[1].label in r)
        assert f"alice#{tag_of(c[1].label)}" in line and " 1 " in line and "neighbour up" in line
        [who] = Screen().type("/who", c[2].node)
        assert who["event"] == "who"
        me, alice = who["nodes"]
        assert me["label"] == c[2].label and me["state"] == "you"
        assert (alice["label"], alice["nick"], alice["hops"], alice["state"]) == (c[1].label, "alice", 1, "neighbour up")
        assert set(alice) == {"label", "nick", "hops", "last_seen_s", "state"}
        assert one.type("/nick", c[1].node)[0]["text"] == f"you are {display_name(c[1].label, 'alice')}"


def test_at_nick_and_msg_reach_that_node_only_and_ping_by_nick_is_answered():
    with Cluster(3, [(1, 2), (2, 3)], membership=FAST) as c:
        Screen().type("/nick carol", c[3].node)
        c.wait_until(lambda: c[1].node.resolve("carol")[0] == c[3].label)
        screen = Screen()
        [sent] = screen.type("@carol over two hops", c[1].node)
        assert (sent["event"], sent["dst"]) == ("sent", c[3].label)
        got = c[3].next(Display).message
        assert (got.body, got.dst) == ("over two hops", c[3].label)
        [sent] = screen.type(f"/msg carol#{tag_of(c[3].label)} and by tag", c[1].node)
        assert sent["dst"] == c[3].label
        c[3].wait_for_body("and by tag")
        [mine] = Screen(json_mode=False).type("@carol and on the screen", c[1].node)
        assert mine.endswith(f"<you> (private to carol#{tag_of(c[3].label)}) and on the screen")
        [ping] = screen.type("/ping carol", c[1].node)
        assert ping["dst"] == c[3].label
        assert c[1].next(Pong).src == c[3].label
        c[1].node.say("marker")
        assert c[2].next(Display).message.body == "marker", "the middle node showed neither direct message"


def test_an_ambiguous_nick_is_refused_and_nothing_is_sent():
    with Cluster(3, [(1, 2), (1, 3)], membership=FAST) as c:
        for i in (2, 3):
            c[i].node.set_nick("alice")
        c.wait_until(lambda: "ambiguous" in c[1].node.resolve("alice")[1])
        screen = Screen()
        for line in ("@alice are you the one?", "/msg alice or you?", "/ping alice"):
            [error] = screen.type(line, c[1].node)
            assert error["event"] == "error" and "ambiguous" in error["error"] and "nothing was sent" in error["error"]
            for i in (2, 3):
                assert display_name(c[i].label, "alice") in error["error"], "the error names the choices"
        [sent] = screen.type(f"@alice#{tag_of(c[2].label)} only you", c[1].node)
        assert sent["dst"] == c[2].label
        c[1].node.say("marker")
        assert [c[2].next(Display).message.body for _ in range(2)] == ["only you", "marker"]
        assert c[3].next(Display).message.body == "marker", "nothing of the refused lines reached the other alice"
        assert not [e for p in (c[1], c[2], c[3]) for e in p.pending() if isinstance(e, Pong)]


def test_unknown_names_are_refused_with_a_hint_and_nothing_is_sent():
    with Cluster(2, [(1, 2)], membership=FAST) as c:
        screen = Screen()
        errors = [screen.type(line, c[1].node) for line in ("@nobody hi", "/msg nobody#ab12 hi", "/ping nobody",
                                                             "@127.0.0.1 hi")]
        assert all(len(e) == 1 and e[0]["event"] == "error" for e in errors)
        texts = [e[0]["error"] for e in errors]
        assert all("nothing was sent" in t and "\n" not in t for t in texts)
        assert "'nobody'" in texts[0] and "/who" in texts[0] and "'nobody#ab12'" in texts[1]
        assert "HOST:PORT" in texts[3], "an address without its port is told what is missing"
        c[1].node.say("marker")
        assert c[2].next(Display).message.body == "marker"


def test_peers_show_each_neighbours_state_last_heard_rtt_and_loss():
    with Cluster(2, [(1, 2)], membership=FAST) as c:
        c.wait_until(lambda: any(r["rtt_ms"] is not None for r in c[1].node.neighbour_rows()))
        [peers] = Screen().type("/peers", c[1].node)
        [row] = peers["peers"]
        assert row["addr"] == c[2].label and row["configured"] is True and row["last_heard_s"] >= 0
        assert row["state"] == "up" and row["rtt_ms"] >= 0 and "loss" in row and row["label"] == c[2].label
        header, line, traffic_header, traffic = Screen(json_mode=False).type("/peers", c[1].node)
        assert header.split()[2:] == ["name", "address", "kind", "state", "heard", "rtt", "loss", "flag"]
        assert c[2].label in line and " up " in line and " ms " in line
        assert traffic_header.split()[2:] == ["address", "in", "out", "dups", "dup", "share", "dropped"]
        assert traffic.split()[2] == c[2].label and int(traffic.split()[3]) > 0  # HELLOs came in


def test_peers_of_a_node_without_membership_keep_the_old_rows():
    with Cluster(2, [(1, 2)]) as c:
        [peers] = Screen().type("/peers", c[1].node)
        assert peers["peers"] == [{"addr": c[2].label, "configured": True, "last_heard_s": None}]
        [error] = Screen().type("@alice hi", c[1].node)
        assert "knows no nicks" in error["error"] and "nothing was sent" in error["error"]


def test_a_message_without_a_nick_is_shown_with_the_one_the_mesh_knows():
    plain = Display(Message("m1", 1.0, 7, "CHAT", "127.0.0.1:9002", "", "hi"))
    known = {"127.0.0.1:9002": "bob"}.get
    assert shown_nick(plain, lambda label: known(label, "")).message.extra == {"nick": "bob"}
    assert shown_nick(plain, lambda label: "") is plain
    said = Display(plain.message._replace(extra={"nick": "robert", "part": (1, 2)}))
    assert shown_nick(said, lambda label: known(label, "")) is said, "the message's own word comes first"


def _line_with(proc: Proc, text: str) -> str:
    return proc.line(lambda line: text in line, f"line with {text!r}")


def test_a_sender_is_shown_as_nick_and_tag_in_the_terminal_and_by_nick_in_json():
    a, b, t = free_ports(3)
    with Proc("--port", str(b), "--json", "--peers", f"127.0.0.1:{a}") as json_side, \
            Proc("--port", str(t), "--headless", "--peers", f"127.0.0.1:{a}") as terminal_side:
        json_side.ready()
        _line_with(terminal_side, "is up")
        with Proc("--port", str(a), "--json", "--nick", "alice", "--peers", f"127.0.0.1:{b}",
                  f"127.0.0.1:{t}") as alice:
            label = alice.ready()
            alice.send("hello from alice")
            chat = json_side.event("chat")
            assert (chat["src"], chat["nick"], chat["body"]) == (label, "alice", "hello from alice")
            line = _line_with(terminal_side, "hello from alice")
            assert line.rstrip("\n").endswith(f"<alice#{tag_of(label)}> hello from alice")
            json_side.send(f"@alice#{tag_of(label)} hi alice")
            assert json_side.event("sent")["dst"] == label
            assert alice.event("chat")["body"] == "hi alice"
