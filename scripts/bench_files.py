"""bench.py's ``files`` section: file sharing between real meshchat processes on 127.0.0.1.

- a line of 4 nodes: one file from one end to the other (MiB/s, target >= 2 for 10 MiB), and chat
  latency from end to end while it moves against the same line idle;
- a mesh of 20: one file to everyone (every node complete; chunks sent against the ideal of each
  node receiving each chunk once, target <= 1.5x; the time against one transfer to one
  neighbour times the nodes it reached, as sending it to each node one by one would take);
- a line of 4 with 10% loss on every link (tests/lossy.py's hub): completes, verified; then a file
  for the far end only (/send @NAME PATH: sealed end to end when the secure extra is installed).

bench.py passes itself in (``b``): its Fleet, meshchat_argv and helpers, so that this file keeps
no second copy of them and bench.py's run keeps one temporary data folder.
"""

import hashlib
import os
import random
import tempfile
import time
from typing import Dict, List, Sequence

FILES_FULL = dict(line_mib=10.0, mesh_nodes=20, mesh_mib=10.0, lossy_mib=1.0, lossy_loss=0.1, chat_messages=40,
                  chat_gap_s=0.05, deadline_s=300.0)
FILES_QUICK = dict(line_mib=1.0, mesh_nodes=6, mesh_mib=0.5, lossy_mib=0.25, lossy_loss=0.1, chat_messages=10,
                   chat_gap_s=0.05, deadline_s=120.0)
ACCEPT = "1G"  # every node fetches without /accept


def a_file(folder: str, mib: float, seed: int) -> tuple:
    size = int(mib * (1 << 20))
    path = os.path.join(folder, f"bench-{seed}.bin")
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return path, size, hashlib.sha256(data).hexdigest()


def node_argv(b, *args: str) -> List[str]:
    return b.meshchat_argv("--json", "--accept-files", ACCEPT, *args)


def line(b, fleet, n: int, peer_of=None) -> list:
    """``n`` processes, each peered with the next (built from the far end, ports from ready events)."""
    nodes: list = []
    for _ in range(n):
        peers = ["--peers", nodes[0].label] if nodes else []
        child = fleet.spawn(node_argv(b, "--port", "0", *peers), tag=("files-line", len(nodes)))
        fleet.wait_ready([child])
        nodes.insert(0, child)
    return nodes


def wait_peers(b, fleet, nodes: Sequence, want: Dict[int, int], timeout: float) -> None:
    """Until node i has ``want[i]`` neighbours up (from /stats: peer_up events may have gone by
    while the fleet waited for later nodes to start)."""
    deadline = time.perf_counter() + timeout
    while True:
        got = b.collect_stats(fleet, list(nodes), timeout=5.0)
        short = {i: got.get(i, {}).get("neighbours_up", 0) for i in want
                 if got.get(i, {}).get("neighbours_up", 0) < want[i]}
        if not short:
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"neighbours not up in {timeout:g} s: {short} of {want}")
        fleet.drain(0.2)


def send_and_wait(fleet, sender, receivers: Sequence, path: str, sha: str, timeout: float,
                  during=None, dst: str = "") -> Dict[int, float]:
    """/send PATH at ``sender`` (/send @DST PATH with ``dst``); when each receiver said file_done with
    the offered sha256 (seconds from the send). ``during(elapsed)`` is called between polls (the chat probe)."""
    index = {id(c): i for i, c in enumerate(receivers)}
    done: Dict[int, float] = {}
    t0 = time.perf_counter()

    def seen(child, obj: dict, at: float) -> None:
        ev = obj.get("event")
        i = index.get(id(child))
        if ev == "file_failed" and i is not None:
            raise RuntimeError(f"a transfer failed: {obj.get('reason')}")
        if ev == "file_done" and i is not None:
            if obj.get("sha256") != sha:
                raise RuntimeError("a node finished a file whose sha256 is not the one sent")
            with open(obj["path"], "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != sha:
                    raise RuntimeError(f"{obj['path']}: its content differs from the file sent")
            done[i] = at - t0

    sender.write(f"/send @{dst} {path}" if dst else f"/send {path}")
    while len(done) < len(receivers):
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{len(done)} of {len(receivers)} nodes had the file after {timeout:g} s")
        for child, obj, at in fleet.poll(0.05):
            seen(child, obj, at)
        if during is not None and len(done) < len(receivers):
            during(time.perf_counter() - t0, seen)
    return done


def chat_probe(fleet, first, last, count: int, gap_s: float, tag: str, other=None) -> List[float]:
    """Chat lines typed at ``first``; each one's delay until ``last`` prints it (ms). Every other event
    read meanwhile goes to ``other`` (a transfer's file_done must not be lost to the probe)."""
    delays: List[float] = []
    for k in range(count):
        body = f"probe {tag} {k}"
        t = time.perf_counter()
        first.write(body)
        end = t + 2.0
        got = None
        while got is None and time.perf_counter() < end:
            for child, obj, at in fleet.poll(end - time.perf_counter()):
                if child is last and obj.get("event") == "chat" and obj.get("body") == body:
                    got = at
                elif other is not None:
                    other(child, obj, at)
        if got is not None:
            delays.append((got - t) * 1000.0)
        pause = t + gap_s - time.perf_counter()
        if pause > 0:
            fleet.drain(pause)
    return delays


def stats_sum(b, fleet, nodes: Sequence, keys: Sequence[str]) -> Dict[str, int]:
    got = b.collect_stats(fleet, list(nodes))
    return {k: sum(int(s.get(k, 0) or 0) for s in got.values()) for k in keys}


def bench_line(b, cfg: dict, fleet, folder: str, seed: int) -> dict:
    nodes = line(b, fleet, 4)
    try:
        wait_peers(b, fleet, nodes, {0: 1, 1: 2, 2: 2, 3: 1}, 30.0)
        idle = chat_probe(fleet, nodes[0], nodes[-1], cfg["chat_messages"], cfg["chat_gap_s"], "idle")
        path, size, sha = a_file(folder, cfg["line_mib"], seed)
        busy: List[float] = []
        probing = {"k": 0, "next": 0.3}

        def during(elapsed: float, seen) -> None:
            # One chat line at a time while the file moves, each waited for (its delay is the figure).
            if elapsed >= probing["next"] and probing["k"] < cfg["chat_messages"]:
                busy.extend(chat_probe(fleet, nodes[0], nodes[-1], 1, 0.0, f"busy{probing['k']}", seen))
                probing["k"] += 1
                probing["next"] = elapsed + cfg["chat_gap_s"]

        done = send_and_wait(fleet, nodes[0], nodes[1:], path, sha, cfg["deadline_s"], during)
        seconds = done[len(nodes) - 2]
        out = {"nodes": 4, "bytes": size, "seconds": seconds, "mib_per_s": size / (1 << 20) / seconds,
               "chat_idle": b.stats_ms(idle) if idle else None, "chat_busy": b.stats_ms(busy) if busy else None,
               "chat_busy_sent": probing["k"], "chat_busy_received": len(busy)}
        if idle and busy:
            out["chat_p99_ratio"] = out["chat_busy"]["p99_ms"] / max(out["chat_idle"]["p99_ms"], 1e-3)
        # Which share of all datagrams went between bulk sockets (file link datagrams, node.py).
        counts = stats_sum(b, fleet, nodes, ("sent", "bulk_sent"))
        out["bulk_share"] = counts["bulk_sent"] / max(counts["sent"], 1)
        return out
    finally:
        fleet.stop(nodes)


def bench_pair(b, cfg: dict, fleet, folder: str, seed: int, mib: float) -> float:
    """Seconds to move one file of ``mib`` to one neighbour: what each step of one-by-one would take."""
    nodes = line(b, fleet, 2)
    try:
        wait_peers(b, fleet, nodes, {0: 1, 1: 1}, 30.0)
        path, size, sha = a_file(folder, mib, seed)
        return send_and_wait(fleet, nodes[0], nodes[1:], path, sha, cfg["deadline_s"])[0]
    finally:
        fleet.stop(nodes)


def bench_mesh(b, cfg: dict, fleet, folder: str, seed: int) -> dict:
    n = cfg["mesh_nodes"]
    mesh = b.Mesh(fleet, n, seed, argv=lambda *a: node_argv(b, *a))
    try:
        want = {i: len(mesh.links[i]) for i in range(n)}
        wait_peers(b, fleet, mesh.nodes, want, 30.0 + n)
        keys = ("sent", "file_pieces_served", "file_pieces_received", "file_requests_sent")
        before = stats_sum(b, fleet, mesh.nodes, keys)
        path, size, sha = a_file(folder, cfg["mesh_mib"], seed + 1)
        done = send_and_wait(fleet, mesh.nodes[0], mesh.nodes[1:], path, sha, cfg["deadline_s"])
        after = stats_sum(b, fleet, mesh.nodes, keys)
    finally:
        mesh.close()
    chunks = -(-size // 768)
    ideal = chunks * (n - 1)  # each node receives each chunk once (a spanning tree's n - 1 links)
    delta = {k: after[k] - before[k] for k in keys}
    one = bench_pair(b, cfg, fleet, folder, seed + 2, cfg["mesh_mib"])
    return {"nodes": n, "links": mesh.edges, "bytes": size, "complete": len(done), "seconds": max(done.values()),
            "chunks": chunks, "ideal_chunks_sent": ideal, "chunks_sent": delta["file_pieces_served"],
            "chunk_ratio": delta["file_pieces_served"] / ideal, "datagrams": delta["sent"],
            "datagram_ratio": delta["sent"] / ideal, "requests": delta["file_requests_sent"],
            "one_neighbour_s": one, "one_by_one_s": one * (n - 1),
            "speedup": one * (n - 1) / max(done.values())}


def bench_lossy(b, cfg: dict, fleet, folder: str, seed: int) -> dict:
    LossyHub, LinkSpec = b.lossy_hub_class()
    hub = LossyHub(seed=seed + 11, max_life_s=cfg["deadline_s"] + 120.0)
    nodes: list = []
    try:
        n = 4
        peer_ports: Dict[int, List[int]] = {i: [] for i in range(n)}
        for _ in range(n):
            hub.add_node()
        for a in range(n - 1):
            pa, pb = hub.link(a, a + 1)
            peer_ports[a].append(pa)
            peer_ports[a + 1].append(pb)
        ports = b.reserve_ports(n)
        for i in range(n):
            hub.set_up(i, ports[i])
        hub.start()
        for i in range(n):
            nodes.append(fleet.spawn(node_argv(b, "--port", str(ports[i]),
                                               "--peers", *[f"{b.HOST}:{p}" for p in peer_ports[i]]),
                                     tag=("files-lossy", i)))
        fleet.wait_ready(nodes)
        wait_peers(b, fleet, nodes, {0: 1, 1: 2, 2: 2, 3: 1}, 30.0)
        hub.set_spec(LinkSpec(loss=cfg["lossy_loss"]))
        path, size, sha = a_file(folder, cfg["lossy_mib"], seed + 3)
        done = send_and_wait(fleet, nodes[0], nodes[1:], path, sha, cfg["deadline_s"])
        got = stats_sum(b, fleet, nodes, ("file_timeouts", "file_pieces_served"))
        # The same line, a file for the far end only: carried by the two nodes on the way (sealed, when
        # the secure extra is installed), so loss is repaired hop by hop as for a file to everyone.
        path, _, sha = a_file(folder, cfg["lossy_mib"], seed + 4)
        direct = send_and_wait(fleet, nodes[0], nodes[n - 1:], path, sha, cfg["deadline_s"],
                               dst=f"{b.HOST}:{ports[n - 1]}")
        return {"nodes": n, "loss": cfg["lossy_loss"], "bytes": size, "complete": len(done), "verified": True,
                "seconds": done[n - 2], "timeouts": got["file_timeouts"], "chunks_sent": got["file_pieces_served"],
                "direct_seconds": direct[0], "direct_sealed": crypto_available()}
    finally:
        fleet.stop(nodes)
        hub.stop()


def crypto_available() -> bool:
    from meshchat import crypto
    return crypto.available()


def bench_files(b, quick: bool, fleet, seed: int) -> dict:
    cfg = FILES_QUICK if quick else FILES_FULL
    folder = tempfile.mkdtemp(prefix="files-", dir=b.DATA_ROOT)
    out: dict = {"config": cfg}
    for name, body in (("line", bench_line), ("mesh", bench_mesh), ("lossy", bench_lossy)):
        b.say(f"files: {name} ...")
        try:
            out[name] = body(b, cfg, fleet, folder, seed)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            out["error"] = out[name]["error"]
    return out


def report(r: dict, fmt, table) -> List[str]:
    """The section's lines for bench.py's text report."""
    lines = ["", "Files (real processes on 127.0.0.1)"]
    x = r.get("line", {})
    if "error" in x:
        lines.append(f"  line: {x['error']}")
    elif x:
        idle, busy = x.get("chat_idle") or {}, x.get("chat_busy") or {}
        lines.append(table(("4-node line", "MiB", "seconds", "MiB/s (target >= 2)", "chat p99 idle ms",
                            "chat p99 during ms", "ratio", "on bulk sockets"),
                           [("end to end", fmt(x["bytes"] / (1 << 20), 1), fmt(x["seconds"]), fmt(x["mib_per_s"]),
                             fmt(idle.get("p99_ms")), fmt(busy.get("p99_ms")), fmt(x.get("chat_p99_ratio")),
                             fmt(x.get("bulk_share")))]))
    x = r.get("mesh", {})
    if "error" in x:
        lines.append(f"  mesh: {x['error']}")
    elif x:
        lines.append(table(("mesh", "MiB", "complete", "seconds", "chunks sent / ideal (target <= 1.5)",
                            "datagrams / ideal", "one by one s", "speed-up"),
                           [(f"{x['nodes']} nodes, {x['links']} links", fmt(x["bytes"] / (1 << 20), 1),
                             f"{x['complete']}/{x['nodes'] - 1}", fmt(x["seconds"]), fmt(x["chunk_ratio"]),
                             fmt(x["datagram_ratio"]), fmt(x["one_by_one_s"]), fmt(x["speedup"]))]))
    x = r.get("lossy", {})
    if "error" in x:
        lines.append(f"  lossy line: {x['error']}")
    elif x:
        rows = [("to all", fmt(x["bytes"] / (1 << 20), 2), fmt(x["loss"]),
                 f"{x['complete']}/{x['nodes'] - 1}", fmt(x["seconds"]), x["timeouts"])]
        if "direct_seconds" in x:
            rows.append(("to the far end only" + (", sealed" if x.get("direct_sealed") else ", in clear"),
                         fmt(x["bytes"] / (1 << 20), 2), fmt(x["loss"]), "1/1", fmt(x["direct_seconds"]), "-"))
        lines.append(table(("lossy 4-node line", "MiB", "loss per link", "complete, verified", "seconds",
                            "timeouts"), rows))
    return lines


def targets(r: dict) -> List[dict]:
    """bench.py's target rows (its format: target, value, op, limit, unit, met, note)."""
    out: List[dict] = []

    def add(name: str, value, op: str, limit: float, unit: str, note: str = "") -> None:
        met = None if value is None else bool({"<=": value <= limit, ">=": value >= limit, ">": value > limit}[op])
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met,
                    "note": note})

    x = r.get("line") or {}
    mib = (x.get("bytes") or 0) / (1 << 20)
    add("files: 4-node line, end to end", x.get("mib_per_s"), ">=", 2.0, "MiB/s",
        "" if not mib or mib >= 10 else f"target is for 10 MiB; this run sent {mib:g}")
    x = r.get("mesh") or {}
    whole = x.get("complete") == x.get("nodes", 0) - 1 if x else None
    add(f"files: mesh of {x.get('nodes', '?')}, chunks sent / each node's once", x.get("chunk_ratio") if whole else None,
        "<=", 1.5, "x", "" if whole or not x else "not every node finished")
    add("files: mesh, one by one / to all at once (faster: over 1)", x.get("speedup"), ">=", 1.0, "x")
    x = r.get("lossy") or {}
    add(f"files: line with {x.get('loss', 0.1):g} loss per link, nodes done and verified", x.get("complete"),
        ">=", float(x.get("nodes", 4) - 1), "")
    return out
