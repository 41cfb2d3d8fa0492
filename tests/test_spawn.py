"""scripts/spawn_local_mesh.py: topologies, --print, and a real piped run."""

import os
import re
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from meshchat import crypto
from meshchat.membership import display_name

from meshsim import connected
from ports import free_port_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "spawn_local_mesh.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from spawn_local_mesh import neighbours  # noqa: E402


@pytest.mark.parametrize("topology, n, degrees", [
    ("full", 4, [3, 3, 3, 3]),
    ("ring", 5, [2] * 5),
    ("line", 4, [1, 2, 2, 1]),
    ("star", 4, [3, 1, 1, 1]),
])
def test_topologies(topology, n, degrees):
    links = neighbours(n, topology)
    assert [len(x) for x in links] == degrees and connected(links)
    assert all(a in links[b] for a in range(n) for b in links[a]), "links go both ways"


def test_random_topology_is_seeded_connected_and_near_the_degree():
    a, b = neighbours(30, "random", degree=4, seed=7), neighbours(30, "random", degree=4, seed=7)
    assert a == b and connected(a)
    assert neighbours(30, "random", degree=4, seed=8) != a
    assert sum(len(x) for x in a) / 30 >= 3.5


def spawn(*args, input=None, timeout=60):
    return subprocess.run([sys.executable, SCRIPT, *args], input=input, capture_output=True, text=True,
                          timeout=timeout)


def test_print_gives_one_command_per_node():
    out = spawn("-n", "3", "--topology", "line", "--base-port", "20001", "--print").stdout.splitlines()
    assert out == ["meshchat --port 20001 --nick n1 --peers 127.0.0.1:20002",
                   "meshchat --port 20002 --nick n2 --peers 127.0.0.1:20001 127.0.0.1:20003",
                   "meshchat --port 20003 --nick n3 --peers 127.0.0.1:20002"]


def test_print_with_discover_names_no_peers_and_a_mesh_of_the_demos_own():
    out = spawn("-n", "2", "--discover", "--nick-prefix", "bot", "--base-port", "20001", "--print").stdout
    assert out.splitlines() == ["meshchat --port 20001 --nick bot1 --discover --mesh demo-20001",
                                "meshchat --port 20002 --nick bot2 --discover --mesh demo-20001"]


@pytest.mark.parametrize("args, says", [
    (["--discover", "--topology", "ring"], "--discover: not with --topology"),
    (["--discover", "--degree", "3"], "--discover: not with --degree"),
    (["--nick-prefix", "a b"], "--nick-prefix: 'a b1' is not a nick"),
    (["-n", "10", "--nick-prefix", "x" * 31], "is not a nick"),
])
def test_discover_with_a_topology_or_a_bad_nick_prefix_is_refused(args, says):
    result = spawn(*args, "--print")
    assert result.returncode == 2 and says in result.stderr and one_line(result.stderr)


def test_bad_arguments_exit_2():
    result = spawn("-n", "0", "--print")
    assert result.returncode == 2 and "--nodes" in result.stderr


def test_piped_lines_reach_the_whole_mesh_then_everything_stops():
    for attempt in range(3):  # the ports were free a moment ago; another program may take one
        base = free_port_run(3)
        result = spawn("-n", "3", "--topology", "line", "--base-port", str(base),
                       input=f"hello all\n3: from three\n{base + 1}: @127.0.0.1:{base} psst\n2: @n3 by nick\n")
        if result.returncode != 1:
            break
    assert result.returncode == 0, result.stderr
    out = result.stdout
    n1, n2, n3 = (display_name(f"127.0.0.1:{base + i}", f"n{i + 1}") for i in range(3))
    assert f"[node 1 127.0.0.1:{base}] ready: {n1}" in out
    assert f"[node 2 127.0.0.1:{base + 1}] <{n1}> hello all" in out
    assert f"[node 3 127.0.0.1:{base + 2}] <{n1}> hello all" in out
    assert f"[node 1 127.0.0.1:{base}] <{n3}> from three" in out
    sealed = ", encrypted" if crypto.available() else ""  # as the terminal says it, at both ends
    assert f"[node 1 127.0.0.1:{base}] <{n2}> (private{sealed}) psst" in out
    assert f"[node 2 127.0.0.1:{base + 1}] <you> (private to {n1}{sealed}) psst" in out
    assert f"[node 3 127.0.0.1:{base + 2}] <{n2}> (private{sealed}) by nick" in out
    assert out.count("psst") == 2 and out.count("by nick") == 2, "shown at its target and as sent, nowhere else"
    assert "\x1b" not in out


def test_discover_nodes_find_each_other_and_chat_and_the_tables_read_well():
    rng = random.Random(time.monotonic_ns())
    group = "239.255.%d.%d:%d" % (rng.randrange(256), rng.randrange(1, 255), free_port_run(1))
    for attempt in range(3):  # the ports were free a moment ago; another program may take one
        base = free_port_run(3)
        result = spawn("-n", "3", "--discover", "--nick-prefix", "ann", "--base-port", str(base), "--",
                       "--discover-group", group,
                       input=f"hello all\n3: from three\n2: @127.0.0.1:{base} psst\n2: /who\n1: /peers\n1: /stats\n")
        if result.returncode != 1:
            break
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "found each other" not in result.stderr
    assert f"3 nodes up (found by discovery, mesh demo-{base})" in out
    a1, a2, a3 = (display_name(f"127.0.0.1:{base + i}", f"ann{i + 1}") for i in range(3))
    for node in (2, 3):
        assert f"[node {node} 127.0.0.1:{base + node - 1}] <{a1}> hello all" in out
    assert f"[node 1 127.0.0.1:{base}] <{a3}> from three" in out
    sealed = ", encrypted" if crypto.available() else ""
    assert f"[node 1 127.0.0.1:{base}] <{a2}> (private{sealed}) psst" in out and out.count("psst") == 2
    who = [line for line in out.splitlines() if line.startswith(f"[node 2 127.0.0.1:{base + 1}] * ")]
    assert any(a2 in line and line.rstrip().endswith("you") for line in who)
    # Right after the handshake one side may not know the other's nick yet (it comes with the next HELLO).
    assert any(f"127.0.0.1:{base + 2}" in line and "neighbour up" in line for line in who)
    peers = [line for line in out.splitlines() if line.startswith(f"[node 1 127.0.0.1:{base}] * ")]
    assert any(line.split("] * ")[1].split() == ["name", "address", "kind", "state", "heard", "rtt", "loss", "flag"]
               for line in peers)
    assert any(line.split("] * ")[1].split() == ["address", "in", "out", "dups", "dup", "share", "dropped"]
               for line in peers)
    assert any(f"127.0.0.1:{base + 1}" in line and " found " in line and " up " in line for line in peers)
    assert any("] * received " in line and "handled" in line for line in peers)
    assert any("] * sent " in line and "datagrams" in line for line in peers), "/stats: each of its lines marked"


def test_the_demo_shows_why_map_trace_and_deliveries_as_the_terminal_does():
    for attempt in range(3):  # the ports were free a moment ago; another program may take one
        base = free_port_run(3)
        # --linger: a private message may wait for its destination's key, then for its acknowledgement.
        # It goes from 2 to 3: node 1 never shows it, so its /why (the last message it showed) can only
        # be "hello all", however late node 1 reads that line.
        result = spawn("-n", "3", "--base-port", str(base), "--linger", "4",
                       input="hello all\n/why\n/map\n/trace n3\n2: @n3 psst\n3: /nick\n")
        if result.returncode != 1:
            break
    assert result.returncode == 0, result.stderr
    n1, n2, n3 = (display_name(f"127.0.0.1:{base + i}", f"n{i + 1}") for i in range(3))
    one, two = f"[node 1 127.0.0.1:{base}] ", f"[node 2 127.0.0.1:{base + 1}] "
    lines = result.stdout.splitlines()
    mine = [line[len(one):] for line in lines if line.startswith(one)]
    # Its age is "now", or a few seconds on a loaded machine.
    assert any(line.startswith("* ") and re.search(r": CHAT of ours, (now|[0-9.]+ s ago)$", line) for line in mine), "/why"
    assert f"* sent by us to {n2}, {n3}" in mine or f"* sent by us to {n3}, {n2}" in mine
    assert f"{n1} (you, 127.0.0.1:{base})" in mine, "/map: the tree"
    assert any(line.startswith(("├── ", "└── ")) and n3 in line for line in mine)
    assert f"* trace to {n3}: 1 hop" in mine
    assert any(line.split() == ["*", "1", n3] + line.split()[3:] and line.endswith(" ms") for line in mine)
    assert f"{two}\u2713 delivered to {n3} (" in result.stdout
    assert "{'" not in result.stdout and "mid " not in result.stdout, "no event as a raw dict"
    assert f"[node 3 127.0.0.1:{base + 2}] * you are {n3}" in result.stdout


def one_line(text):
    return text.count("\n") == 1 and "Traceback" not in text


def test_degree_is_refused_with_another_topology():
    result = spawn("--topology", "ring", "--degree", "3", "--print")
    assert result.returncode == 2 and "--degree" in result.stderr and one_line(result.stderr)
    assert spawn("--topology", "random", "--degree", "3", "--print").returncode == 0


def test_bad_node_arguments_show_the_nodes_own_error_and_exit_2():
    result = spawn("-n", "2", "--base-port", str(free_port_run(2)), "--", "--bogus")
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) and "--bogus" in result.stderr and "in use" not in result.stderr


def test_ports_in_use_are_reported_before_anything_starts():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = spawn("-n", "3", "--base-port", str(port - 1), input="")
    assert result.returncode == 1 and result.stdout == ""
    assert one_line(result.stderr) and f"port {port} already in use" in result.stderr


def test_quit_in_the_demo_stops_every_node_and_n_quit_stops_node_n():
    for attempt in range(3):  # the ports were free a moment ago; another program may take one
        base = free_port_run(3)
        result = spawn("-n", "3", "--base-port", str(base),
                       input="2: /quit\n2: are you there\n/help\nfrom one\n/quit\nnot sent\n")
        if result.returncode != 1:
            break
    assert result.returncode == 0, result.stderr
    out, err = result.stdout, result.stderr
    assert "node 2 stopped; 2 nodes left: 1, 3" in out
    assert "node 2 has stopped; nothing was sent" in err and "are you there" not in out
    assert "N: text" in out and "N: /quit" in out, "the demo's /help tells its own commands"
    assert f"[node 3 127.0.0.1:{base + 2}] <{display_name(f'127.0.0.1:{base}', 'n1')}> from one" in out
    assert "stopping every node" in out and "not sent" not in out
    assert "not running" not in err


def test_the_demo_ends_when_its_last_node_is_stopped():
    for attempt in range(3):
        base = free_port_run(2)
        proc = subprocess.Popen([sys.executable, SCRIPT, "-n", "2", "--base-port", str(base)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.stdin.write("1: /quit\n2: /quit\n")
            proc.stdin.flush()  # and the input stays open: the demo must end by itself
            code = proc.wait(30)  # its few lines fit in the pipes
            out, err = proc.stdout.read(), proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        if code != 1:
            break
    assert code == 0, err
    assert "0 nodes left" in out and "every node has stopped" in out


@pytest.fixture
def tmux_env():
    """An own tmux server (its socket in a fresh short directory), killed afterwards."""
    if shutil.which("tmux") is None or sys.platform == "win32":
        pytest.skip("tmux is not installed")
    directory = tempfile.mkdtemp(prefix="tmx")  # short: a socket path has a length limit
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}
    env.update(TMUX_TMPDIR=directory, TERM=env.get("TERM", "xterm"))
    try:
        yield env
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def spawn_tmux(env, *args):
    return subprocess.run([sys.executable, SCRIPT, "--tmux", *args], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


def test_tmux_labels_panes_says_how_to_stop_and_refuses_a_second_run(tmux_env):
    for attempt in range(3):
        base = free_port_run(3)
        first = spawn_tmux(tmux_env, "-n", "3", "--base-port", str(base))
        if first.returncode != 1:
            break
    session = f"meshchat-{base}"
    assert first.returncode == 0, first.stderr
    assert f"tmux kill-session -t {session}" in first.stdout and f"tmux attach -t {session}" in first.stdout
    titles = subprocess.run(["tmux", "list-panes", "-t", session, "-F", "#{pane_title}"], env=tmux_env,
                            capture_output=True, text=True).stdout.splitlines()
    assert titles == [f"node {i + 1} n{i + 1} 127.0.0.1:{base + i}" for i in range(3)]
    second = spawn_tmux(tmux_env, "-n", "3", "--base-port", str(base))
    assert second.returncode == 1 and one_line(second.stderr)
    assert "already exists" in second.stderr and f"tmux kill-session -t {session}" in second.stderr


def test_tmux_with_a_port_in_use_or_bad_node_arguments_starts_nothing(tmux_env):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        busy = spawn_tmux(tmux_env, "-n", "2", "--base-port", str(port - 1))
    assert busy.returncode == 1 and one_line(busy.stderr) and f"port {port} already in use" in busy.stderr
    bogus = spawn_tmux(tmux_env, "-n", "2", "--base-port", str(free_port_run(2)), "--", "--bogus")
    assert bogus.returncode == 2 and one_line(bogus.stderr) and "--bogus" in bogus.stderr
    sessions = subprocess.run(["tmux", "list-sessions"], env=tmux_env, capture_output=True, text=True)
    assert "meshchat-" not in sessions.stdout
