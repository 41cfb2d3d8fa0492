"""Chaos: the lossy-link proxy itself, then real meshes on lossy links, SIGKILLs and restarts.

CI runs the short share (about 10 s here); ``MESHCHAT_SLOW=1`` adds long runs.
The network-namespace variant runs where it can (Linux, root, ``ip`` and
``nft``) and is skipped with the reason elsewhere.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lossy import REPO, LinkSpec, LossyHub, Mesh, netns_unavailable_reason, regular_links, run_chaos
from meshsim import connected

SCRIPT = os.path.join(REPO, "scripts", "chaos.py")
SLOW = pytest.mark.skipif(os.environ.get("MESHCHAT_SLOW") != "1", reason="long chaos run; set MESHCHAT_SLOW=1")
TIMEOUT_S = 10.0


# -- the proxy on its own, with plain sockets as nodes ------------------------------------------


class Pair:
    """A hub with two plain sockets as nodes A and B joined by one link."""

    def __init__(self, seed: int = 1, spec: LinkSpec = LinkSpec()):
        self.hub = LossyHub(seed, spec, max_life_s=60.0)
        self.socks = []
        try:
            self.a, self.b = self._sock(), self._sock()
            ia, ib = self.hub.add_node(), self.hub.add_node()
            self.a_to_b, self.b_to_a = self.hub.link(ia, ib)
            self.hub.set_up(ia, self.a.getsockname()[1])
            self.hub.set_up(ib, self.b.getsockname()[1])
            self.ia, self.ib = ia, ib
            self.hub.start()
        except BaseException:
            self.close()
            raise

    def _sock(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socks.append(s)
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(TIMEOUT_S)
        return s

    def through(self, payloads, sender=None, port=None, receiver=None):
        """Send ``payloads`` one way; return [(payload, source)] as the other side got them."""
        sender, port, receiver = sender or self.a, port or self.a_to_b, receiver or self.b
        before = self.hub.snapshot()
        for p in payloads:
            sender.sendto(p, ("127.0.0.1", port))
        assert self.hub.wait_received(before["received"] + len(payloads), TIMEOUT_S)
        count = self.hub.snapshot()["forwarded"] - before["forwarded"]
        return [receiver.recvfrom(65535) for _ in range(count)]

    def close(self):
        try:
            if self.hub._thread is not None:
                self.hub.stop()
        finally:
            for s in self.socks:
                s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def numbered(n):
    return [b"%d" % i for i in range(n)]


def test_proxy_forwards_both_ways_from_the_address_each_side_sends_to():
    with Pair() as pair:
        got = pair.through(numbered(5))
        assert [d for d, _ in got] == numbered(5)
        assert {src for _, src in got} == {("127.0.0.1", pair.b_to_a)}  # B sees A where B sends for A
        back = pair.through([b"reply"], pair.b, pair.b_to_a, pair.a)
        assert back == [(b"reply", ("127.0.0.1", pair.a_to_b))]  # and A sees B where A sends for B
        snap = pair.hub.snapshot()
        assert snap["in_from"] == {pair.ia: 5, pair.ib: 1}
        assert snap["out_to"] == {pair.ia: 1, pair.ib: 5}


def test_proxy_loss_is_seeded_near_its_rate_and_drops_exactly_what_it_decided():
    decisions = []
    for seed in (7, 7, 8):
        with Pair(seed, LinkSpec(loss=0.25)) as pair:
            pair.hub.record = True
            sent = numbered(400)
            got = []
            for start in range(0, 400, 50):  # in chunks, so that no socket buffer overflows
                got += [d for d, _ in pair.through(sent[start:start + 50])]
            kept = [p for p, (dropped, _, _) in zip(sent, pair.hub.decisions) if not dropped]
            assert got == kept
            assert 0.18 < pair.hub.counts["dropped_loss"] / 400 < 0.32
            decisions.append(pair.hub.decisions)
    assert decisions[0] == decisions[1]
    assert decisions[0] != decisions[2]


def test_proxy_duplicates_and_reorders_but_loses_nothing_without_loss():
    with Pair(3, LinkSpec(dup=0.2, reorder=0.3, hold_s=0.05)) as pair:
        sent = numbered(200)
        got = []
        for start in range(0, 200, 50):
            got += [d for d, _ in pair.through(sent[start:start + 50])]
        counts = pair.hub.counts
        assert counts["duplicated"] > 10 and counts["reordered"] > 20
        assert len(got) == 200 + counts["duplicated"]
        assert set(got) == set(sent)
        firsts = list(dict.fromkeys(int(d) for d in got))
        assert firsts != sorted(firsts)


def test_proxy_delays_every_datagram():
    with Pair(4, LinkSpec(delay=(0.08, 0.1))) as pair:
        for p in numbered(10):
            t = time.monotonic()
            data, _ = pair.through([p])[0]
            assert data == p and time.monotonic() - t >= 0.079
        assert pair.hub.counts["delayed"] == 10


def test_proxy_drops_what_goes_to_a_node_that_is_down():
    with Pair() as pair:
        pair.hub.set_down(pair.ib)
        assert pair.through(numbered(10)) == []
        assert pair.hub.counts["dropped_down"] == 10
        pair.b.setblocking(False)
        with pytest.raises(BlockingIOError):
            pair.b.recvfrom(100)
        pair.b.settimeout(TIMEOUT_S)
        pair.hub.set_up(pair.ib, pair.b.getsockname()[1])
        assert [d for d, _ in pair.through([b"back"])] == [b"back"]


@pytest.mark.parametrize("n, degree", [(12, 4), (5, 4), (30, 4), (9, 3), (2, 4)])
def test_topologies_are_connected_and_regular(n, degree):
    links = regular_links(n, degree, seed=5)
    assert all(i not in near and all(i in links[j] for j in near) for i, near in enumerate(links))
    assert connected(links)
    want = min(degree, n - 1)
    assert sum(want - len(near) for near in links) <= (n * want) % 2
    assert regular_links(n, degree, seed=5) == links


# -- real meshes -------------------------------------------------------------------------------


def test_12_nodes_degree_4_with_20_percent_loss_deliver_95_percent_and_show_nothing_twice():
    mesh = Mesh(12, degree=4, seed=11, loss=0.2, dup=0.05, delay=(0.0, 0.01), reorder=0.05)
    with mesh:
        for _ in range(5):
            assert mesh.wait_sent(mesh.round())
        assert mesh.settle(30.0), "the mesh did not go quiet"
        report = mesh.report(settled=True)
        stats = mesh.query_stats(mesh.live(), TIMEOUT_S)
        hub = mesh.net.hub.snapshot()
    assert report.messages == 60 and report.pairs == 60 * 11
    assert report.delivery >= 0.95, report.per_node
    assert report.duplicates == 0
    # The loss, duplicates and reordering really happened, and the nodes dropped the copies.
    assert 0.15 < hub["dropped_loss"] / hub["received"] < 0.25
    assert hub["duplicated"] > 0 and hub["reordered"] > 0
    assert sum(s["dropped_duplicate"] for s in stats.values()) > hub["duplicated"]
    assert mesh.bad_lines == []
    assert mesh.exits == {i: 0 for i in range(12)}


def _rounds(mesh, count):
    bodies = []
    for _ in range(count):
        sent = mesh.round()
        assert mesh.wait_sent(sent)
        bodies += sent
    return bodies


def _mids(mesh, bodies):
    bodies = set(bodies)
    return [m.mid for m in mesh.sent.values() if m.body in bodies]


def shown_by(mesh, j):
    """Every mid any process of node j displayed."""
    return set().union(*[counts for (k, _), counts in mesh.shown.items() if k == j])


def test_sigkilled_nodes_leave_the_others_talking_and_rejoin_on_the_same_port():
    # One node down at a time: with two of twelve down, degree 4 can leave a node with two
    # links, and 20% loss on those is more than flooding without resends can hide.
    mesh = Mesh(12, degree=4, seed=5, loss=0.2, dup=0.05, delay=(0.0, 0.01))
    victims = [3, 8]
    downs, after, after_mids = [], {}, {}
    with mesh:
        _rounds(mesh, 1)
        for i in victims:
            label = mesh.labels[i]
            mesh.round()  # kill in the middle of traffic: a round is written and flooding
            status = mesh.kill(i)
            if sys.platform != "win32":
                assert status == -signal.SIGKILL
            bodies = _rounds(mesh, 4)
            assert mesh.settle(30.0)
            downs.append(mesh.report(_mids(mesh, bodies)))
            assert downs[-1].per_node[i] == (0, 0)
            mesh.restart(i)  # the very same command line
            assert mesh.labels[i] == label
            bodies = _rounds(mesh, 4)
            assert mesh.settle(30.0)
            after_mids[i] = set(_mids(mesh, bodies))
            after[i] = mesh.report(after_mids[i])
        whole = mesh.report(settled=True)

    # While a node was down, the eleven others kept delivering among themselves; none stalled.
    assert [(d.messages, d.pairs) for d in downs] == [(44, 44 * 10)] * 2
    delivered = sum(d.delivered for d in downs)
    assert delivered >= 0.95 * 2 * 44 * 10, [d.per_node for d in downs]
    assert all(got >= 0.8 * want for d in downs for got, want in d.per_node.values())
    # After its restart, a node gets new messages and its own get through.
    for i, rejoined in after.items():
        assert rejoined.messages == 48 and rejoined.pairs == 48 * 11
        assert rejoined.delivery >= 0.95, rejoined.per_node
        got, want = rejoined.per_node[i]
        assert want == 44 and got >= 0.8 * want
        theirs = [m.mid for m in mesh.sent.values() if m.origin == i and m.mid in after_mids[i]]
        reached = sum(1 for mid in theirs for j in range(12) if j != i and mid in shown_by(mesh, j))
        assert len(theirs) == 4 and reached >= 0.8 * 4 * 11
    assert whole.duplicates == 0 and whole.reshown == 0
    assert mesh.exits == {i: 0 for i in range(12)}


def test_the_chaos_script_reports_delivery_duplicates_and_memory(tmp_path):
    html = tmp_path / "chaos.html"
    p = subprocess.run([sys.executable, SCRIPT, "--nodes", "6", "--degree", "3", "--loss", "10%",
                        "--duration", "4", "--kills-per-minute", "30", "--down", "0.5,1", "--seed", "5",
                        "--json", "--min-delivery", "0.8", "--html", str(html), "--map", str(tmp_path / "mesh.svg")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert any(line.startswith("delivery: ") and line.endswith("%") for line in lines)
    assert any(line.startswith("duplicates shown: 0 ") for line in lines)
    assert any(line.startswith("memory per node (VmRSS): ") for line in lines)
    assert any(line.startswith("links flagged by /peers: ") for line in lines)  # --bad-link's finding
    import xml.etree.ElementTree as ET

    svg = ET.parse(tmp_path / "mesh.svg").getroot()  # --map: node 0's /map FILE.svg
    drawn = {g.get("data-label") for g in svg.iter("{http://www.w3.org/2000/svg}g") if g.get("data-label")}
    assert len(drawn) >= 1 + 3  # node 0 and its three neighbours at least (the rest once their presence came)
    report = json.loads(lines[-1])
    assert report["nodes"] == 6 and report["settled"] is True
    assert report["kills"] >= 1 and report["restarts"] == report["kills"]
    assert report["delivery"] >= 0.8 and report["duplicates"] == 0
    assert report["exits"] == {str(i): 0 for i in range(6)}
    if os.path.exists("/proc/self/status"):
        assert all(isinstance(v, int) and v > 0 for v in report["rss_kib"].values())
    # --html: one well-formed page, its charts inline, the delivery chart's bars the report's figures.
    import xml.etree.ElementTree as ET

    svgs = list(ET.parse(html).getroot().iter("{http://www.w3.org/2000/svg}svg"))
    assert len(svgs) >= 2
    bars = [float(t.text.split(": ")[1].split()[0]) for t in svgs[0].iter("{http://www.w3.org/2000/svg}title")]
    assert bars == [float(f"{100 * report['first_flood_delivery']:.3g}"), float(f"{100 * report['delivery']:.3g}")]


def test_the_chaos_script_rejects_bad_arguments():
    p = subprocess.run([sys.executable, SCRIPT, "--loss", "150%"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert p.returncode == 2 and "--loss" in p.stderr
    for bad, said in (("0-x:0.5", "A-B:LOSS"), ("0-1:2", "between 0 and 1"), ("0-0:0.5", "not linked")):
        p = subprocess.run([sys.executable, SCRIPT, "--nodes", "4", "--degree", "2", "--bad-link", bad],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        assert p.returncode == 2 and said in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


def _netns_or_skip():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


def _our_namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"mchat{os.getpid()}-")]


def test_network_namespaces_with_kernel_loss_and_a_sigkill():
    _netns_or_skip()
    mesh = Mesh(8, degree=4, seed=2, loss=0.2, netns=True)
    try:
        mesh.start()
        assert mesh.labels[0] == "10.77.0.1:9001" and mesh.labels[7] == "10.77.0.8:9001"
        for _ in range(3):
            assert mesh.wait_sent(mesh.round())
        mesh.round()
        mesh.kill(5)
        for _ in range(3):
            assert mesh.wait_sent(mesh.round())
        assert mesh.settle(30.0)
        mesh.restart(5)
        for _ in range(3):
            assert mesh.wait_sent(mesh.round())
        assert mesh.settle(30.0)
        report = mesh.report(settled=True)
        kernel = mesh.net.nft_counters()
    finally:
        mesh.close()
    assert _our_namespaces() == []
    assert report.pairs >= 150
    # The kernel's random numbers are not seeded: a wide margin under the ~98% seen here.
    assert report.delivery >= 0.9, report.per_node
    assert report.duplicates == 0 and report.reshown == 0
    assert 0.1 < kernel["dropped"] / kernel["out"] < 0.3
    assert report.per_node[5][1] > 0 and report.per_node[5][0] >= 0.7 * report.per_node[5][1]
    assert mesh.exits == {i: 0 for i in range(8)}


# -- long runs ---------------------------------------------------------------------------------


@pytest.mark.slow
@SLOW
def test_long_chaos_on_proxies():
    report = run_chaos(nodes=30, degree=4, loss=0.2, duration_s=90.0, kills_per_min=10.0, seed=3, rate=10.0,
                       dup=0.05, delay=(0.0, 0.02), reorder=0.05)
    assert report.settled and report.kills >= 5 and report.restarts == report.kills
    assert report.delivery >= 0.95, report.per_node
    assert report.duplicates == 0
    assert all(s == 0 for s in report.exits.values()) and len(report.exits) == 30


@pytest.mark.slow
@SLOW
def test_long_chaos_in_network_namespaces():
    _netns_or_skip()
    report = run_chaos(nodes=20, degree=4, loss=0.2, duration_s=60.0, kills_per_min=10.0, seed=4, rate=10.0,
                       netns=True)
    assert _our_namespaces() == []
    assert report.settled and report.kills >= 3
    assert report.delivery >= 0.95, report.per_node
    assert report.duplicates == 0
