#!/usr/bin/env python3
"""Open N meshchat nodes on this machine, for demos and manual testing.

    python scripts/spawn_local_mesh.py -n 5 --topology ring
    python scripts/spawn_local_mesh.py -n 5 --discover

Nodes are called n1, n2, ... (``--nick-prefix`` for other names). With
``--discover`` they get no --peers and find each other by multicast beacons,
in a mesh named after the base port, so that two demos never merge.
By default every node is a child process and their output is merged here,
each line prefixed with the node's coloured name. Type ``3: hello`` to send
from node 3 (an index, or a port), a plain line to send from node 1,
``3: /quit`` to stop node 3, and ``/quit``, Ctrl-D or Ctrl-C to stop them all.
``--tmux`` opens a tmux pane per node instead (stop it with ``tmux
kill-session -t meshchat-PORT``); ``--print`` prints one ``meshchat`` command
per node and exits. Exit status: 0 after a clean stop, 1 if the mesh could
not start, 2 for bad arguments (ours, or those given to the nodes after --).
"""

import argparse
import json
import os
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

# Run from a clean clone too: the package beside this script, for us and for the nodes.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from meshchat.cli import parse_args as parse_node_args, stdin_lines  # noqa: E402
from meshchat.jsonview import JsonView  # noqa: E402
from meshchat.membership import display_name, valid_nick  # noqa: E402

TOPOLOGIES = ("full", "ring", "line", "star", "random")
READY_TIMEOUT_S = 15.0
JOIN_TIMEOUT_S = 15.0  # for the nodes to see each other's links up (to find each other, with --discover)
STOP_TIMEOUT_S = 3.0
MAX_STDERR_LINES = 20  # of a node's stderr kept until the mesh is up, to say why it did not start
_ROUTE = re.compile(r"\s*(\d+):\s*(.*)\Z")
_QUIT = ("/quit", "/exit")
_EOF = object()  # end of our input, in the inbox
_ALL_STOPPED = object()  # every node has stopped, in the inbox
PALETTE = ("\x1b[36m", "\x1b[32m", "\x1b[33m", "\x1b[34m", "\x1b[35m", "\x1b[96m", "\x1b[92m", "\x1b[93m",
           "\x1b[94m", "\x1b[95m")


def neighbours(n: int, topology: str, degree: int = 4, seed: int = 1) -> List[Set[int]]:
    """Neighbour sets of nodes 0..n-1; every topology is connected."""
    links: List[Set[int]] = [set() for _ in range(n)]

    def link(a: int, b: int) -> None:
        if a != b:
            links[a].add(b)
            links[b].add(a)

    if topology == "full":
        for a in range(n):
            for b in range(a + 1, n):
                link(a, b)
    elif topology in ("ring", "line", "random"):
        for a in range(n - 1):
            link(a, a + 1)
        if topology != "line" and n > 2:
            link(n - 1, 0)
        if topology == "random":
            rng = random.Random(seed)
            for _ in range(n * degree * 4):
                short = [a for a in range(n) if len(links[a]) < degree]
                if len(short) < 2:
                    break
                a, b = rng.sample(short, 2)
                link(a, b)
    elif topology == "star":
        for a in range(1, n):
            link(0, a)
    else:
        raise ValueError(f"unknown topology {topology!r}")
    return links


def node_args(i: int, args: argparse.Namespace, links: List[Set[int]]) -> List[str]:
    out = ["--port", str(args.base_port + i), "--nick", nick(i, args)]
    if args.discover:
        # A mesh name of this demo's own: another demo on the LAN (or this machine) stays apart.
        return out + ["--discover", "--mesh", mesh_name(args)] + args.extra
    peers = [f"127.0.0.1:{args.base_port + j}" for j in sorted(links[i])]
    if peers:
        out += ["--peers", *peers]
    return out + args.extra


def nick(i: int, args: argparse.Namespace) -> str:
    return f"{args.nick_prefix}{i + 1}"


def mesh_name(args: argparse.Namespace) -> str:
    return f"demo-{args.base_port}"


def effective_nicks(args: argparse.Namespace) -> List[str]:
    """Each node's nick: ours, unless a --nick after -- gives them all another."""
    given = argparse.ArgumentParser(add_help=False)
    given.add_argument("--nick")
    override = given.parse_known_args(args.extra)[0].nick
    return [override or nick(i, args) for i in range(args.nodes)]


def how_linked(args: argparse.Namespace) -> str:
    return f"found by discovery, mesh {mesh_name(args)}" if args.discover else args.topology


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
        # One line, naming the argument, as meshchat's own.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to every node, e.g. -- --ttl 3")
    p.add_argument("-n", "--nodes", type=int, default=3, help="how many nodes (default 3)")
    p.add_argument("--topology", choices=TOPOLOGIES, help="how they are linked (default full)")
    p.add_argument("--discover", action="store_true",
                   help="no --peers: the nodes find each other by multicast (mesh demo-BASEPORT)")
    p.add_argument("--nick-prefix", default="n", metavar="P", help="nodes are called P1, P2, ... (default n)")
    p.add_argument("--degree", type=int, help="links per node for --topology random (default 4)")
    p.add_argument("--seed", type=int, default=1, help="random seed for --topology random (default 1)")
    p.add_argument("--base-port", type=int, default=9001, help="port of node 1; the others follow (default 9001)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--tmux", action="store_true", help="one tmux pane per node")
    how.add_argument("--print", action="store_true", help="print one meshchat command per node and exit")
    p.add_argument("--linger", type=float, default=1.0,
                   help="after end of input, stop once the mesh has been quiet this long (default 1 s)")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    return p


def print_commands(args: argparse.Namespace, links: List[Set[int]]) -> int:
    for i in range(args.nodes):
        print(shlex.join(["meshchat", *node_args(i, args, links)]))
    return 0


def busy_ports(base_port: int, count: int) -> List[int]:
    """The ports from ``base_port`` on that cannot be bound now (another mesh, another program)."""
    busy = []
    for port in range(base_port, base_port + count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def ports_free(args: argparse.Namespace) -> bool:
    """Checked before starting: a node that cannot bind would only say so in its own pane, then vanish."""
    busy = busy_ports(args.base_port, args.nodes)
    if busy:
        fail(f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} already in use "
             f"(another mesh running? stop it, or pick another --base-port)")
    return not busy


def fail(text: str) -> None:
    print(f"spawn_local_mesh: {text}", file=sys.stderr)


def _tmux(*argv: str) -> str:
    """Run one tmux command; its output, or CalledProcessError with tmux's own words."""
    done = subprocess.run(["tmux", *argv], capture_output=True, text=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout.strip()


def run_tmux(args: argparse.Namespace, links: List[Set[int]]) -> int:
    if shutil.which("tmux") is None:
        fail("tmux is not installed; run without --tmux")
        return 1
    session = f"meshchat-{args.base_port}"
    how = f"attach with: tmux attach -t {session}; stop it with: tmux kill-session -t {session}"
    if subprocess.run(["tmux", "has-session", "-t", f"={session}"], capture_output=True).returncode == 0:
        fail(f"tmux session {session} already exists ({how}), or pick another --base-port")
        return 1
    if not ports_free(args):
        return 1
    try:
        # A pane whose node refuses its arguments closes at once: check them here, where the error stays.
        parse_node_args(node_args(0, args, links))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    cmds = [shlex.join([sys.executable, "-m", "meshchat", *node_args(i, args, links)]) for i in range(args.nodes)]
    try:
        # -c REPO: "python -m meshchat" finds the package beside this script, as the other modes do.
        panes = [_tmux("new-session", "-d", "-s", session, "-c", REPO, "-P", "-F", "#{pane_id}", cmds[0])]
        for cmd in cmds[1:]:
            panes.append(_tmux("split-window", "-t", session, "-c", REPO, "-P", "-F", "#{pane_id}", cmd))
            _tmux("select-layout", "-t", session, "tiled")
    except subprocess.CalledProcessError as e:
        subprocess.run(["tmux", "kill-session", "-t", f"={session}"], capture_output=True)
        said = (e.stderr or "").strip().splitlines()
        fail(f"tmux failed: {said[-1] if said else f'exit status {e.returncode}'}")
        return 1
    # Labels and the way out; older tmux versions lack some of these options, and the mesh runs anyway.
    for i, pane in enumerate(panes):
        subprocess.run(["tmux", "select-pane", "-t", pane, "-T",
                        f"node {i + 1} {nick(i, args)} 127.0.0.1:{args.base_port + i}"], capture_output=True)
    for verb, option, value in (
            ("set-window-option", "pane-border-status", "top"),
            ("set-window-option", "pane-border-format", " #{pane_title} "),
            ("set-option", "status-right-length", "60"),
            ("set-option", "status-right", f" stop: tmux kill-session -t {session} ")):
        subprocess.run(["tmux", verb, "-t", session, option, value], capture_output=True)
    print(f"tmux session {session}: {args.nodes} nodes ({how_linked(args)}); {how}", flush=True)
    if not sys.stdout.isatty():
        return 0
    verb = "switch-client" if os.environ.get("TMUX") else "attach-session"
    status = subprocess.run(["tmux", verb, "-t", session]).returncode
    if subprocess.run(["tmux", "has-session", "-t", f"={session}"], capture_output=True).returncode == 0:
        print(f"the mesh is still running in tmux session {session}; {how}")
    return status


class Mesh:
    """The child processes; per child one thread turning its JSON events into lines here and
    one passing on its stderr; one thread reading our input into the inbox."""

    def __init__(self, args: argparse.Namespace, links: List[Set[int]], color: bool) -> None:
        self.color = color
        self.events: "queue.Queue[tuple]" = queue.Queue()
        self.inbox: "queue.Queue[object]" = queue.Queue()
        self.children: List[subprocess.Popen] = []
        self.names: List[str] = []
        self.nicks = effective_nicks(args)
        self.views: List[JsonView] = []  # per node: its events as its terminal would show them
        self.ports: Dict[int, int] = {}
        self.discover = args.discover
        self.errors: List[List[str]] = []  # each node's stderr until the mesh is up
        self.asked_to_quit: Set[int] = set()
        self.links: Set[Tuple[int, int]] = set()  # (i, j): node i has node j up as a neighbour
        self.gone: Set[int] = set()
        self.up = threading.Event()
        self.stopping = threading.Event()
        self._print_lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        for i in range(args.nodes):
            cmd = [sys.executable, "-m", "meshchat", "--json", *node_args(i, args, links)]
            # Their own process group: Ctrl-C stops us, and we stop them, each once and in order.
            child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8", errors="replace", bufsize=1, env=env,
                                     start_new_session=True,
                                     creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
            self.children.append(child)
            self.names.append(f"node {i + 1}")
            self.views.append(JsonView(self.name_of))
            self.errors.append([])
            self.ports[args.base_port + i] = i
            for body, name in ((self._pump, "pump"), (self._pump_stderr, "stderr")):
                thread = threading.Thread(target=body, args=(i,), name=f"{name}-{i + 1}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, i: int) -> None:
        for line in self.children[i].stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") in ("peer_up", "peer_down"):
                self._note_link(i, event)
            self.events.put((i, event))
            self.show(i, event)
        self.events.put((i, None))
        status = self.children[i].wait()
        with self._print_lock:
            self.gone.add(i)
            left = self.running()
        if not self.up.is_set() or (self.stopping.is_set() and i not in self.asked_to_quit):
            return
        how = "stopped" if i in self.asked_to_quit else f"exited with status {status}"
        names = f": {', '.join(str(j + 1) for j in left)}" if left else ""
        self.print(f"{self.paint(i, '[' + self.names[i] + ']')} * node {i + 1} {how}; "
                   f"{len(left)} node{'' if len(left) == 1 else 's'} left{names}")
        if not left:
            self.inbox.put(_ALL_STOPPED)

    def _note_link(self, i: int, e: dict) -> None:
        """Node i says another of ours is up or down (as its neighbour): the links --discover waits for."""
        j = self.index_of(str(e.get("peer", "")))
        if j is None:
            return
        with self._print_lock:
            if e["event"] == "peer_up":
                self.links.add((i, j))
            else:
                self.links.discard((i, j))

    def joined(self) -> bool:
        """Every node reaches every other over links both ends see up."""
        with self._print_lock:
            both = {(a, b) for a, b in self.links if (b, a) in self.links}
        reached, todo = {0}, [0]
        while todo:
            a = todo.pop()
            for b in range(len(self.children)):
                if (a, b) in both and b not in reached:
                    reached.add(b)
                    todo.append(b)
        return len(reached) == len(self.children)

    def wait_joined(self) -> bool:
        """Wait until the nodes have found each other; False if they did not in time."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not self.joined():
            try:
                self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                return False
        return True

    def _pump_stderr(self, i: int) -> None:
        """Kept until the mesh is up (to say why a node did not start), passed on after."""
        for line in self.children[i].stderr:
            line = line.rstrip("\r\n")
            with self._print_lock:
                if not self.up.is_set():
                    if len(self.errors[i]) < MAX_STDERR_LINES:
                        self.errors[i].append(line)
                    continue
            print(f"[node {i + 1}] {line}", file=sys.stderr, flush=True)

    def running(self) -> List[int]:
        return [i for i in range(len(self.children)) if i not in self.gone and i not in self.asked_to_quit]

    def paint(self, i: int, text: str) -> str:
        return f"{PALETTE[i % len(PALETTE)]}{text}\x1b[0m" if self.color else text

    def show(self, i: int, e: dict) -> None:
        """Node i's event as its terminal would show it (meshchat.jsonview), after its coloured name."""
        lines = self.views[i].lines(e)
        if e.get("event") == "ready" and isinstance(e.get("node"), str):
            self.names[i] = f"node {i + 1} {e['node']}"
            # Instead of "meshchat node ... is up": the name the other nodes will show it by.
            lines = [f"ready: {display_name(e['node'], self.nicks[i])}"] + lines[1:]
        self.print("\n".join(f"{self.paint(i, '[' + self.names[i] + ']')} {line}" for line in lines or [""]))

    def index_of(self, label: str) -> Optional[int]:
        """Which of our nodes has ``label`` (they are all 127.0.0.1:PORT), if any."""
        host, _, port = label.rpartition(":")
        return self.ports.get(int(port)) if host == "127.0.0.1" and port.isdigit() else None

    def name_of(self, label: str) -> str:
        """``nick#tag`` for the label of one of our nodes, else the label."""
        j = self.index_of(label)
        return label if j is None else display_name(label, self.nicks[j])

    def print(self, text: str) -> None:
        # The tree of /map and the tick of a delivery in a pipe or console that cannot show them: as escapes.
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        try:
            text = text.encode(encoding, "backslashreplace").decode(encoding)
        except LookupError:
            text = text.encode("ascii", "backslashreplace").decode("ascii")
        with self._print_lock:
            print(text, flush=True)

    def wait_ready(self) -> Optional[Tuple[int, str]]:
        """None once every node is ready; else our exit status and one line saying why not."""
        ready: Set[int] = set()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(ready) < len(self.children):
            try:
                i, event = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                return 1, f"not every node was ready within {READY_TIMEOUT_S:g} s"
            if event is None:
                return self._why_not_started(i)
            if event.get("event") == "ready":
                ready.add(i)
        with self._print_lock:
            self.up.set()
            for i, lines in enumerate(self.errors):
                for line in lines:
                    print(f"[node {i + 1}] {line}", file=sys.stderr, flush=True)
        return None

    def _why_not_started(self, i: int) -> Tuple[int, str]:
        try:
            status = self.children[i].wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = None
        for thread in self._threads:
            if thread.name == f"stderr-{i + 1}":
                thread.join(STOP_TIMEOUT_S)
        said = [line for line in self.errors[i] if line.strip()]
        last = said[-1] if said else f"it exited with status {status}"
        if status == 2:  # bad arguments: the node's own line names the one
            return 2, f"node {i + 1}: {last}"
        advice = "; try another --base-port" if "in use" in last else ""
        return 1, f"node {i + 1} could not start: {last}{advice}"

    def start_reading(self) -> None:
        thread = threading.Thread(target=self._read_stdin, name="stdin", daemon=True)
        thread.start()

    def _read_stdin(self) -> None:
        """Raw reads on the descriptor (as meshchat's own stdin thread): a daemon thread blocked
        inside sys.stdin's buffer would hold its lock at interpreter exit."""
        try:
            fd = sys.stdin.fileno()
            for raw in stdin_lines(lambda n: os.read(fd, n)):
                self.inbox.put(raw.decode("utf-8", "replace").rstrip("\r"))
        except (OSError, ValueError):
            pass
        finally:
            self.inbox.put(_EOF)

    def serve(self, linger_s: float) -> None:
        """Route our lines until /quit, the end of input, or every node has stopped."""
        while True:
            item = _get(self.inbox)
            if item is _ALL_STOPPED:
                self.print("spawn_local_mesh: every node has stopped")
                return
            if item is _EOF or not self.route(item):
                self.linger(linger_s)
                return

    def send(self, i: int, line: str) -> None:
        try:
            self.children[i].stdin.write(line + "\n")
            self.children[i].stdin.flush()
        except (OSError, ValueError):
            fail(f"node {i + 1} is not running")

    def route(self, line: str) -> bool:
        """``3: hello`` goes to node 3 (or to the node on port 3), anything else to node 1.
        False when the line asks to stop the whole demo."""
        if not line.strip():
            return True
        match = _ROUTE.match(line)
        if match:
            key = int(match.group(1))
            target, text = self.ports.get(key, key - 1), match.group(2)
            if not 0 <= target < len(self.children):
                fail(f"no node {key}; nodes are 1 to {len(self.children)}")
                return True
        else:
            target, text = 0, line
            if line.strip() in _QUIT:
                self.print(f"spawn_local_mesh: stopping every node ({len(self.running())} running)")
                return False
            if line.strip() == "/help":
                self.print(self.help())
                if target not in self.running():
                    return True
        running = self.running()
        if target not in running:
            others = f"running: {', '.join(str(j + 1) for j in running)}" if running else "none is running"
            fail(f"node {target + 1} has stopped; nothing was sent ({others}; send from one with 'N: text')")
            return True
        if text.strip() in _QUIT:
            self.asked_to_quit.add(target)  # it says so when it has gone
        self.send(target, text)
        return True

    def help(self) -> str:
        n = len(self.children)
        return "\n".join([
            "This demo:",
            "  a line           sent from node 1",
            f"  N: text          sent from node N (1 to {n}, or its port); also N: /ping, N: /stats, ...",
            "  N: /quit         stop node N only",
            "  /quit, Ctrl-D    stop every node and leave (so does Ctrl-C)",
            "Each node's commands (here from node 1):" if 0 in self.running() else "",
        ]).rstrip("\n")

    def linger(self, quiet_s: float) -> None:
        """Let what is in flight arrive: return once no node has said anything for ``quiet_s``."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                self.events.get(timeout=quiet_s)
            except queue.Empty:
                return

    def stop(self) -> None:
        self.stopping.set()
        for child in self.children:
            if child.poll() is None:
                try:
                    child.stdin.close()  # end of input: the node stops by itself
                except OSError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                child.terminate()
        for child in self.children:
            try:
                child.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for thread in self._threads:
            thread.join(STOP_TIMEOUT_S)


def _get(inbox: "queue.Queue[object]") -> object:
    """Block on the inbox; on Windows wake now and then, since Ctrl-C cannot interrupt a lock there."""
    if sys.platform != "win32":
        return inbox.get()
    while True:
        try:
            return inbox.get(timeout=0.5)
        except queue.Empty:
            continue


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_children(args: argparse.Namespace, links: List[Set[int]]) -> int:
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if color and sys.platform == "win32":
        import colorama

        colorama.just_fix_windows_console()
    mesh = Mesh(args, links, color)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        failed = mesh.wait_ready()
        if failed:
            status, why = failed
            fail(why)
            return status
        # Until their links are up, a node knows no other's nick (and with --discover, no other at all).
        if not mesh.wait_joined():
            why = " (is multicast blocked here? try without --discover)" if args.discover else ""
            fail(f"the nodes have not all found each other within {JOIN_TIMEOUT_S:g} s{why}; carrying on")
        mesh.print(f"{args.nodes} nodes up ({how_linked(args)}). Type a line to send it from node 1, "
                   f"'2: hello' to send from node 2, '/help' for commands, /quit or Ctrl-C to stop them all.")
        mesh.start_reading()
        mesh.serve(args.linger)
    except KeyboardInterrupt:
        pass
    finally:
        mesh.stop()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("argument -n/--nodes: must be at least 1")
    if not 1 <= args.base_port <= 65535 - args.nodes + 1:
        parser.error("argument --base-port: the ports must fit below 65536")
    if args.discover and (args.topology or args.degree is not None):
        parser.error(f"argument --discover: not with --{'topology' if args.topology else 'degree'} "
                     "(the nodes find their own links)")
    if args.topology is None:
        args.topology = "full"
    if args.degree is not None and args.topology != "random":
        parser.error(f"argument --degree: only for --topology random (not {args.topology})")
    for name in (nick(0, args), nick(args.nodes - 1, args)):
        if not valid_nick(name):
            parser.error(f"argument --nick-prefix: {name!r} is not a nick (at most 32 printable characters, "
                         "no spaces and none of @ # : / \\)")
    if args.degree is None:
        args.degree = 4
    if args.degree < 1:
        parser.error("argument --degree: must be at least 1")
    links = neighbours(args.nodes, args.topology, args.degree, args.seed)
    if args.print:
        return print_commands(args, links)
    if args.tmux:
        return run_tmux(args, links)
    if not ports_free(args):
        return 1
    return run_children(args, links)


if __name__ == "__main__":
    sys.exit(main())
