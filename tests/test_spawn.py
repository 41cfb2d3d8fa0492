"""scripts/spawn_local_mesh.py: topologies, --print, and a real piped run."""

import os
import subprocess
import sys

import pytest

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
    assert out == ["meshchat --port 20001 --peers 127.0.0.1:20002",
                   "meshchat --port 20002 --peers 127.0.0.1:20001 127.0.0.1:20003",
                   "meshchat --port 20003 --peers 127.0.0.1:20002"]


def test_bad_arguments_exit_2():
    result = spawn("-n", "0", "--print")
    assert result.returncode == 2 and "--nodes" in result.stderr


def test_piped_lines_reach_the_whole_mesh_then_everything_stops():
    for attempt in range(3):  # the ports were free a moment ago; another program may take one
        base = free_port_run(3)
        result = spawn("-n", "3", "--topology", "line", "--base-port", str(base),
                       input=f"hello all\n3: from three\n{base + 1}: @127.0.0.1:{base} psst\n")
        if result.returncode != 1:
            break
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"[node 2 127.0.0.1:{base + 1}] <127.0.0.1:{base}> hello all" in out
    assert f"[node 3 127.0.0.1:{base + 2}] <127.0.0.1:{base}> hello all" in out
    assert f"[node 1 127.0.0.1:{base}] <127.0.0.1:{base + 2}> from three" in out
    assert f"[node 1 127.0.0.1:{base}] <127.0.0.1:{base + 1}> (private) psst" in out
    assert out.count("psst") == 2, "shown at its target and as sent, nowhere else"
    assert "\x1b" not in out
