"""The command line: arguments, exit statuses, and real processes starting and stopping."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from meshchat import __version__
from meshchat.cli import parse_args, stdin_lines

from ports import free_ports
from procs import Proc, run


@pytest.mark.parametrize("argv, names", [
    (["--peers", "127.0.0.1"], "--peers"),
    (["--peers", "127.0.0.1:0"], "--peers"),
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--port", "nine"], "--port"),
    (["--ttl", "0"], "--ttl"),
    (["--ttl", "20"], "--ttl"),
    (["--seen-ttl", "60", "--max-skew", "31"], "--max-skew"),
    (["--rate-limit", "-1"], "--rate-limit"),
    (["--rate-limit-total", "lots"], "--rate-limit-total"),
    (["--advertise", "bad host"], "--advertise"),
    (["--peers", "no-such-host.invalid:9001"], "--peers"),
    (["--host", "nonsense.invalid"], "--host"),
    (["--host", "999.1.1.1"], "--host"),
    (["--bogus"], "--bogus"),
])
def test_bad_arguments_exit_2_with_one_line_naming_them(argv, names, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err and "Traceback" not in err


def test_peers_take_spaces_and_commas_and_resolve_names():
    args = parse_args(["--peers", "127.0.0.1:9002,localhost:9003", "127.0.0.1:9004"])
    assert args.peers == [("127.0.0.1", 9002), ("127.0.0.1", 9003), ("127.0.0.1", 9004)]


def test_host_names_are_bound_by_address_so_labels_are_addresses():
    assert parse_args(["--host", "localhost"]).host == "127.0.0.1"
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


def test_a_peer_that_is_this_node_itself_is_dropped_with_one_warning(capsys):
    args = parse_args(["--port", "9001", "--peers", "127.0.0.1:9001", "localhost:9002", "localhost:9001"])
    assert args.peers == [("127.0.0.1", 9002)]
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("itself") == 2 and "127.0.0.1:9001" in err
    assert parse_args(["--host", "0.0.0.0", "--port", "9001", "--peers", "127.0.0.1:9001"]).peers == []
    assert "itself" in capsys.readouterr().err
    assert parse_args(["--port", "9001", "--peers", "127.0.0.1:9002"]).peers == [("127.0.0.1", 9002)]
    assert "itself" not in capsys.readouterr().err


def test_a_node_without_peers_gets_a_one_line_hint_and_one_with_peers_does_not():
    alone = run("--port", "0", "--json", input="")
    label = json.loads(alone.stdout.splitlines()[0])["node"]
    assert alone.returncode == 0 and alone.stderr.count("\n") == 1
    assert "no --peers" in alone.stderr and f"--peers {label}" in alone.stderr
    with_peer = run("--port", "0", "--json", "--peers", "127.0.0.1:9", input="")
    assert with_peer.returncode == 0 and with_peer.stderr == ""


def test_host_names_after_at_and_ping_are_resolved_and_bad_ones_send_nothing():
    [back] = free_ports(1)  # the listener's PONG goes to its peers only
    with Proc("--port", "0", "--json", "--headless", "--peers", f"127.0.0.1:{back}") as listener:
        port = listener.ready().rsplit(":", 1)[1]
        with Proc("--port", str(back), "--json", "--peers", f"127.0.0.1:{port}") as sender:
            sender.ready()
            sender.send(f"@localhost:{port} hi by name")
            assert sender.event("sent")["dst"] == f"127.0.0.1:{port}"
            chat = listener.event("chat")
            assert chat["body"] == "hi by name" and chat["dst"] == f"127.0.0.1:{port}"
            sender.send(f"/ping localhost:{port}")
            assert sender.event("ping")["dst"] == f"127.0.0.1:{port}"
            assert sender.event("pong")["src"] == f"127.0.0.1:{port}"
            sender.send("@no-such-host.invalid:9 lost")
            sender.send("/ping no-such-host.invalid:9")
            sender.popen.stdin.close()
            assert sender.wait() == 0
            errors = sender.rest()
            assert [e["event"] for e in errors] == ["error", "error"]
            assert all("cannot resolve" in e["error"] and "nothing was sent" in e["error"] for e in errors)


def test_defaults_follow_the_seed_with_an_adaptive_ttl_and_discovery_without_peers():
    args = parse_args([])
    assert (args.host, args.port, args.ttl, args.seen_ttl, args.discover) == ("127.0.0.1", 9001, 0, 120.0, True)
    assert parse_args(["--ttl", "5"]).ttl == 5 and parse_args(["--ttl", "auto"]).ttl == 0
    assert parse_args(["--peers", "127.0.0.1:9002"]).discover is False
    assert parse_args(["--peers", "127.0.0.1:9002", "--discover"]).discover is True


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_node_started_with_sigint_ignored_keeps_ignoring_it():
    # As "meshchat --headless &" from a script: the shell sets SIGINT to be ignored.
    with Proc("--port", "0", "--json", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) as node:
        node.ready()
        node.popen.send_signal(signal.SIGINT)
        node.send("/stats")
        assert node.event("stats")["received"] == 0, "still running"
        node.popen.send_signal(signal.SIGTERM)
        assert node.wait() == 0


def test_a_shorter_seen_ttl_alone_lowers_the_default_max_skew():
    assert parse_args([]).max_skew == 60.0
    assert parse_args(["--seen-ttl", "60"]).max_skew == 30.0
    assert parse_args(["--seen-ttl", "60", "--max-skew", "10"]).max_skew == 10.0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_signal_during_the_stop_changes_nothing():
    # timeout(1) and process groups deliver SIGINT twice; the stop must stay clean.
    with Proc("--port", "0", "--json", "--headless") as node:
        node.ready()
        node.popen.send_signal(signal.SIGINT)
        node.popen.send_signal(signal.SIGINT)
        node.popen.send_signal(signal.SIGTERM)
        assert node.wait() == 0
        assert "Traceback" not in node.stderr()


def test_wildcard_host_gets_a_reachable_label():
    args = parse_args(["--host", "0.0.0.0"])
    assert args.advertise and args.advertise != "0.0.0.0"
    assert parse_args(["--host", "0.0.0.0", "--advertise", "chat.lan"]).advertise == "chat.lan"


def test_version_and_help():
    assert run("--version").stdout.strip() == f"meshchat {__version__}"
    help_text = run("--help").stdout
    for flag in ("--peers", "--ttl", "--seen-ttl", "--json", "--headless", "--advertise", "--max-datagram",
                 "--rate-limit", "--rate-limit-total", "--peers-only", "--seen-max", "--max-skew", "--max-ttl"):
        assert flag in help_text


def test_port_in_use_exits_1_with_one_line():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        result = run("--port", str(taken.getsockname()[1]), "--headless")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "already in use" in result.stderr


def test_piped_lines_are_sent_before_end_of_input_stops_the_node():
    with Proc("--port", "0", "--json", "--headless") as listener:
        port = listener.ready().rsplit(":", 1)[1]
        sender = run("--port", "0", "--json", "--peers", f"127.0.0.1:{port}",
                     input="hi\n@127.0.0.1:%s just you\n" % port)
        assert sender.returncode == 0, sender.stderr
        assert listener.event("chat")["body"] == "hi"
        private = listener.event("chat")
        assert private["body"] == "just you" and private["dst"] == f"127.0.0.1:{port}"


def test_json_mode_reports_every_command_as_events():
    result = run("--port", "0", "--json", input="/stats\n/peers\n/help\n@bad hi\n/ping\nhello\n/quit\nnot sent\n")
    assert result.returncode == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["ready", "stats", "peers", "notice", "error", "ping", "sent"]
    assert events[1]["received"] == 0 and events[-1]["body"] == "hello"


def test_a_second_roll_call_soon_after_says_why_some_may_not_answer():
    result = run("--port", "0", "--json", input="/ping\n/ping 127.0.0.1:9\n/ping\n")
    kinds = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert kinds == ["ready", "ping", "ping", "ping", "notice"]
    assert "roll call" in json.loads(result.stdout.splitlines()[-1])["text"]


def test_plain_output_to_a_pipe_has_no_colour():
    result = run("--port", "0", input="hello\n/stats\n")
    assert result.returncode == 0 and "\x1b" not in result.stdout and "<you> hello" in result.stdout


def test_bad_stdin_bytes_and_a_huge_line_are_survived():
    huge = b"x" * 10_000_000
    result = subprocess.run([sys.executable, "-m", "meshchat", "--no-discover", "--no-history", "--port", "0", "--json"],
                            input=b"\xff\xfe bad utf-8\n\x00nul\n" + huge + b"\nafter\n",
                            capture_output=True, timeout=30)
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["ready", "sent", "sent", "error", "sent"]
    assert events[1]["body"] == "\ufffd\ufffd bad utf-8" and events[2]["body"] == "\x00nul"
    assert "64 KiB" in events[3]["error"] and events[4]["body"] == "after"


@pytest.mark.parametrize("chunks, lines", [
    ([b"a\nb", b"c\n", b"d"], [b"a", b"bc", b"d"]),
    ([b"\n\n"], [b"", b""]),
    ([b"x" * 10, b"y" * 10, b"\nz\n"], [b"x" * 6, b"z"]),
])
def test_stdin_lines_splits_and_caps_lines(chunks, lines):
    feed = iter(chunks + [b""])
    assert list(stdin_lines(lambda n: next(feed), limit=5)) == lines


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_a_node_cleanly(sig):
    with Proc("--port", "0", "--json", "--headless") as node:
        node.ready()
        node.popen.send_signal(sig)
        assert node.wait() == 0
        assert "Traceback" not in node.stderr()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_stops_a_node_that_is_waiting_for_input():
    with Proc("--port", "0", "--json") as node:
        node.ready()
        node.popen.send_signal(signal.SIGINT)
        assert node.wait() == 0
        assert "Traceback" not in node.stderr()


def test_quit_command_stops_the_node():
    with Proc("--port", "0", "--json") as node:
        node.ready()
        node.send("/quit")
        assert node.wait() == 0


def test_stdout_closed_early_stops_the_node_cleanly():
    proc = subprocess.Popen([sys.executable, "-m", "meshchat", "--no-discover", "--no-history", "--port", "0", "--json"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.readline()
        proc.stdout.close()
        proc.stdin.write(b"/stats\n" * 50)
        proc.stdin.flush()
        assert proc.wait(10) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stderr.close()


def test_quiet_relay_shows_nothing_but_still_relays():
    with Proc("--port", "0", "--json", "--headless") as listener:
        port = listener.ready().rsplit(":", 1)[1]
        with Proc("--port", "0", "--json", "--quiet", "--peers", f"127.0.0.1:{port}") as relay:
            relay_port = relay.ready().rsplit(":", 1)[1]
            sender = run("--port", "0", "--json", "--peers", f"127.0.0.1:{relay_port}", input="through\n")
            assert sender.returncode == 0
            assert listener.event("chat")["body"] == "through"
            relay.send("/stats")
            stats = relay.event("stats")
            assert stats["displayed"] == 0 and stats["relayed"] == 1, "nothing shown, nothing counted as shown"
            relay.send("from the relay")
            assert listener.event("chat")["body"] == "from the relay"
            relay.popen.stdin.close()
            assert relay.wait() == 0
            assert relay.rest() == [], "the relay printed nothing after ready, not even its own line"


def test_quiet_terminal_output_has_no_echo_of_our_own_lines():
    result = run("--port", "0", "--quiet", input="hello\n/stats\n")
    assert result.returncode == 0 and "<you>" not in result.stdout and "received 0" in result.stdout


@contextlib.contextmanager
def _in_a_terminal(*args: str):
    """A meshchat process whose stdin and stdout are a pseudo-terminal: (its master end, the process)."""
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "meshchat", "--no-discover", "--no-history", "--port", "0", *args],
                            stdin=slave, stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    try:
        yield master, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def _screen(master: int, out: bytes = b"", until=None) -> bytes:
    """What the terminal was sent: until ``until(out)`` holds, or (None) until the process has gone."""
    import select
    while until is None or not until(out):
        ready, _, _ = select.select([master], [], [], 10.0)
        assert ready, f"nothing more within 10 s: {out!r}"
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not data:
            break
        out += data
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_quiet_in_a_terminal_shows_no_prompt():
    with _in_a_terminal("--quiet") as (master, proc):
        os.write(master, b"hello\n/stats\n/quit\n")
        out = _screen(master)
        assert proc.wait(10) == 0
    assert b"received 0" in out and b"> " not in out and b"<you>" not in out


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_notice_printed_as_the_prompt_first_appears_leaves_one_prompt_not_two():
    with Proc("--port", "0", "--json", "--headless") as peer:  # up at once: its notice races the prompt
        with _in_a_terminal("--peers", peer.ready()) as (master, proc):
            out = _screen(master, until=lambda shown: b"neighbour" in shown)
            os.write(master, b"/quit\n")
            out = _screen(master, out)
            assert proc.wait(10) == 0
    assert b"> >" not in out and b">  >" not in out, out


def test_the_parts_of_a_long_line_are_marked_in_json_at_both_ends():
    with Proc("--port", "0", "--json", "--headless") as listener:
        port = listener.ready().rsplit(":", 1)[1]
        sender = run("--port", "0", "--json", "--peers", f"127.0.0.1:{port}", input="z" * 3000 + "\n")
        sent = [e for e in map(json.loads, sender.stdout.splitlines()) if e["event"] == "sent"]
        assert [e["part"] for e in sent] == [[1, 3], [2, 3], [3, 3]]
        got = [listener.event("chat") for _ in range(3)]
        assert sorted(e["part"] for e in got) == [[1, 3], [2, 3], [3, 3]]


def test_output_nobody_reads_does_not_stop_the_relaying():
    # A paused terminal (Ctrl-S) or an unread pipe must not silence a branch of the mesh.
    src, sink = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    proc = None
    try:
        for s in (src, sink):
            s.bind(("127.0.0.1", 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a batch fits (Windows: 64 KiB)
        sink.settimeout(10.0)
        peers = [f"127.0.0.1:{s.getsockname()[1]}" for s in (src, sink)]
        proc = subprocess.Popen([sys.executable, "-m", "meshchat", "--no-discover", "--no-history", "--port", "0", "--json", "--headless",
                                 "--rate-limit", "0", "--peers", *peers],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        port = int(json.loads(proc.stdout.readline())["node"].rsplit(":", 1)[1])
        label = "127.0.0.1:%d" % src.getsockname()[1]
        body = "x" * 400  # 2,000 chat events: far more than a pipe holds
        for batch in range(20):
            for i in range(100):
                mid = "b%d-%d" % (batch, i)
                src.sendto(json.dumps({"mid": mid, "ts": time.time(), "ttl": 8, "kind": "CHAT", "src": label,
                                       "dst": "", "body": body}, separators=(",", ":")).encode(),
                           ("127.0.0.1", port))
            for _ in range(100):
                sink.recvfrom(65535)  # socket.timeout fails the test: the relay stalled
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        src.close()
        sink.close()


def test_without_port_a_node_takes_the_next_free_port_and_with_port_it_refuses():
    from meshchat.cli import open_node
    from meshchat.relay import RelayConfig

    base = free_ports(3)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", base))
        args = parse_args(["--no-discover"])
        args.port = base  # as if it were the default
        node = open_node(args, RelayConfig(label=""), lambda e: None)
        try:
            assert node.addr[1] == base + 1 and args.port == base + 1
        finally:
            node.stop()
        chosen = parse_args(["--no-discover", "--port", str(base)])
        with pytest.raises(OSError):
            open_node(chosen, RelayConfig(label=""), lambda e: None)


def test_a_console_writing_to_a_pipe_keeps_each_message_on_one_line():
    with Proc("--port", "0") as node:
        ready = node.lines.get(timeout=10)
        port = int(ready.rsplit(":", 1)[1].split(".")[0].split()[0])
        body = "word " * 60
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            msg = {"mid": "long-1", "ts": time.time(), "ttl": 3, "kind": "CHAT", "src": "127.0.0.1:9",
                   "dst": "", "body": body}
            s.sendto(json.dumps(msg).encode(), ("127.0.0.1", port))
            deadline = time.monotonic() + 10
            while True:
                line = node.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
                if "word" in line:
                    break
        assert body.strip() in line, "a log or a pipe gets whole lines, not rows of 80 columns"


def test_send_name_path_without_the_at_is_a_direct_file_only_when_the_disk_and_the_names_say_so(
        tmp_path, monkeypatch):
    from meshchat.cli import _send_to_name
    from meshchat.commands import SendFile, parse_line

    class Known:  # what _send_to_name asks of a node: its membership, and names to labels
        membership = object()

        def resolve(self, name):
            return ("127.0.0.1:9002", "") if name == "bob" else (None, f"no node named {name!r}")

    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "bob notes.txt").write_bytes(b"y")
    notes = str(tmp_path / "notes.txt")
    cmd = parse_line(f"/send bob {notes}")
    assert cmd == SendFile(f"bob {notes}")  # the parser cannot tell: it looks at no disk
    assert _send_to_name(cmd, Known()) == SendFile(notes, "bob")
    assert _send_to_name(SendFile(f"alice {notes}"), Known()) == SendFile(f"alice {notes}"), "not a name"
    assert _send_to_name(SendFile(f"bob {notes}.gone"), Known()) == SendFile(f"bob {notes}.gone"), "not a file"
    monkeypatch.chdir(tmp_path)  # a file whose name starts with a nick and a space is that file, to all
    assert _send_to_name(SendFile("bob notes.txt"), Known()) == SendFile("bob notes.txt")
    # Quoted, or dragged into the terminal (quotes and a space after), or with an escaped space.
    spaced = str(tmp_path / "bob notes.txt")
    escaped = (spaced.replace(" ", "\\ "),) if os.sep == "/" else ()  # a backslash is a separator on Windows
    for typed in (f'"{spaced}"', f"'{spaced}' ") + escaped:
        assert _send_to_name(SendFile(typed), Known()) == SendFile(spaced), typed
        assert _send_to_name(SendFile(f"bob {typed}"), Known()) == SendFile(spaced, "bob"), typed
        assert _send_to_name(SendFile(typed, "bob"), Known()) == SendFile(spaced, "bob"), typed
    assert _send_to_name(SendFile('"nothing here"'), Known()) == SendFile('"nothing here"'), "its error names it"
