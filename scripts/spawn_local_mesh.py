#!/usr/bin/env python3
"""Open N meshchat nodes on this machine, for demos and manual testing.

    python scripts/spawn_local_mesh.py -n 5 --topology ring

By default every node is a child process and their output is merged here,
each line prefixed with the node's coloured name. Type ``3: hello`` to send
from node 3 (an index, or a port), a plain line to send from node 1, and
Ctrl-C (or Ctrl-D) to stop them all. ``--tmux`` opens a tmux pane per node
instead; ``--print`` prints one ``meshchat`` command per node and exits.
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
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Set

# Run from a clean clone too: the package beside this script, for us and for the nodes.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from meshchat.console import peer_lines, sanitize, stats_text  # noqa: E402

TOPOLOGIES = ("full", "ring", "line", "star", "random")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 3.0
_ROUTE = re.compile(r"\s*(\d+):\s*(.*)\Z")
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
    peers = [f"127.0.0.1:{args.base_port + j}" for j in sorted(links[i])]
    out = ["--port", str(args.base_port + i)]
    if peers:
        out += ["--peers", *peers]
    return out + args.extra


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to every node, e.g. -- --ttl 3")
    p.add_argument("-n", "--nodes", type=int, default=3, help="how many nodes (default 3)")
    p.add_argument("--topology", choices=TOPOLOGIES, default="full", help="how they are linked (default full)")
    p.add_argument("--degree", type=int, default=4, help="links per node for --topology random (default 4)")
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


def run_tmux(args: argparse.Namespace, links: List[Set[int]]) -> int:
    if shutil.which("tmux") is None:
        print("spawn_local_mesh: tmux is not installed; run without --tmux", file=sys.stderr)
        return 1
    session = f"meshchat-{args.base_port}"
    cmds = [shlex.join([sys.executable, "-m", "meshchat", *node_args(i, args, links)]) for i in range(args.nodes)]
    subprocess.run(["tmux", "new-session", "-d", "-s", session, cmds[0]], check=True)
    for cmd in cmds[1:]:
        subprocess.run(["tmux", "split-window", "-t", session, cmd], check=True)
        subprocess.run(["tmux", "select-layout", "-t", session, "tiled"], check=True)
    if not sys.stdout.isatty():
        print(f"tmux session {session} started; attach with: tmux attach -t {session}")
        return 0
    verb = "switch-client" if os.environ.get("TMUX") else "attach-session"
    return subprocess.run(["tmux", verb, "-t", session]).returncode


class Mesh:
    """The child processes, and one thread per child turning its JSON events into lines here."""

    def __init__(self, args: argparse.Namespace, links: List[Set[int]], color: bool) -> None:
        self.color = color
        self.events: "queue.Queue[tuple]" = queue.Queue()
        self.children: List[subprocess.Popen] = []
        self.names: List[str] = []
        self.ports: Dict[int, int] = {}
        self._print_lock = threading.Lock()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        for i in range(args.nodes):
            cmd = [sys.executable, "-m", "meshchat", "--json", *node_args(i, args, links)]
            child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1, env=env)
            self.children.append(child)
            self.names.append(f"node {i + 1}")
            self.ports[args.base_port + i] = i
            threading.Thread(target=self._pump, args=(i,), name=f"pump-{i + 1}", daemon=True).start()

    def _pump(self, i: int) -> None:
        for line in self.children[i].stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.put((i, event))
            self.show(i, event)
        self.events.put((i, None))

    def paint(self, i: int, text: str) -> str:
        return f"{PALETTE[i % len(PALETTE)]}{text}\x1b[0m" if self.color else text

    def show(self, i: int, e: dict) -> None:
        kind = e.get("event")
        if kind == "ready":
            self.names[i] = f"node {i + 1} {e['node']}"
            text = "ready"
        elif kind == "chat":
            private = " (private)" if e.get("dst") else ""
            text = f"<{sanitize(e['src'])}>{private} {sanitize(e['body'])}"
        elif kind == "sent":
            to = f" (private to {e['dst']})" if e.get("dst") else ""
            text = f"<you>{to} {sanitize(e['body'])}"
        elif kind == "ping":
            text = f"* ping sent to {e.get('dst') or 'every node'}"
        elif kind == "pong":
            text = f"* pong from {e['src']}: {e['rtt_ms']:.1f} ms"
        elif kind in ("notice", "error"):
            mark = "*" if kind == "notice" else "!"
            text = "\n".join(f"{mark} {line}" for line in str(e.get("text") or e.get("error")).splitlines())
        elif kind == "stats":
            text = "* " + stats_text(e)
        elif kind == "peers":
            rows = [(p["addr"], p["configured"], p["last_heard_s"]) for p in e["peers"]]
            text = "\n".join("* " + line for line in peer_lines(rows))
        else:
            text = "* " + ", ".join(f"{k} {v}" for k, v in e.items() if k != "event")
        self.print("\n".join(f"{self.paint(i, '[' + self.names[i] + ']')} {line}"
                             for line in text.splitlines() or [""]))

    def print(self, text: str) -> None:
        with self._print_lock:
            print(text, flush=True)

    def wait_ready(self) -> bool:
        ready: Set[int] = set()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(ready) < len(self.children):
            try:
                i, event = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                return False
            if event is None:
                return False  # it exited: port in use, or bad arguments; it said why on stderr
            if event.get("event") == "ready":
                ready.add(i)
        return True

    def send(self, i: int, line: str) -> None:
        try:
            self.children[i].stdin.write(line + "\n")
            self.children[i].stdin.flush()
        except (OSError, ValueError):
            print(f"spawn_local_mesh: node {i + 1} is not running", file=sys.stderr)

    def route(self, line: str) -> None:
        """``3: hello`` goes to node 3 (or to the node on port 3), anything else to node 1."""
        match = _ROUTE.match(line)
        if not match:
            self.send(0, line)
            return
        key = int(match.group(1))
        target = self.ports.get(key, key - 1)
        if 0 <= target < len(self.children):
            self.send(target, match.group(2))
        else:
            print(f"spawn_local_mesh: no node {key}; nodes are 1 to {len(self.children)}", file=sys.stderr)

    def linger(self, quiet_s: float) -> None:
        """Let what is in flight arrive: return once no node has said anything for ``quiet_s``."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                self.events.get(timeout=quiet_s)
            except queue.Empty:
                return

    def stop(self) -> None:
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
        if not mesh.wait_ready():
            print("spawn_local_mesh: not every node started (is a port in use? try --base-port)", file=sys.stderr)
            return 1
        mesh.print(f"{args.nodes} nodes up ({args.topology}). Type a line to send it from node 1, "
                   f"'2: hello' to send from node 2, '/help' for commands, Ctrl-C to stop.")
        for line in sys.stdin:
            line = line.rstrip("\r\n")
            if line.strip():
                mesh.route(line)
        mesh.linger(args.linger)
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
    if args.degree < 1:
        parser.error("argument --degree: must be at least 1")
    links = neighbours(args.nodes, args.topology, args.degree, args.seed)
    if args.print:
        return print_commands(args, links)
    if args.tmux:
        return run_tmux(args, links)
    return run_children(args, links)


if __name__ == "__main__":
    sys.exit(main())
