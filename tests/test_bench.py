"""scripts/bench.py --quick --json: every section runs and its figures are sane (no timing asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench.py")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def fraction(value) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


@pytest.mark.skipif(sys.platform == "win32", reason="bench.py reads child pipes through a selector: POSIX only")
def test_quick_benchmark_runs_and_reports_every_section(tmp_path):
    html = tmp_path / "bench.html"
    done = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", "--html", str(html)], capture_output=True,
                          text=True, timeout=400)  # about 60 s alone; a loaded machine takes twice or more
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    have_proc = os.path.exists("/proc/self/stat")

    relay = r["relay"]
    assert set(relay["relays"]) == {"bare", "straightforward", "meshchat", "meshchat_no_trace"}
    for name, row in relay["relays"].items():
        assert row["sent"] > 0 and fraction(row["delivered_fraction"]), (name, row)
        assert row["delivered_fraction"] > 0.5, (name, row)
        assert positive(row["max_rate_per_s"]), (name, row)
        if have_proc:
            assert positive(row["cpu_us_per_msg"]) and positive(row["max_rate_cpu_us_per_msg"]), (name, row)
    if have_proc:
        assert positive(relay["ratio_node_bare"]) and positive(relay["ratio_node_straightforward"])
        assert positive(relay["ratio_trace_on_off"])

    # History on and off: both display everything they relay; with history on every message shown is in
    # SQLite (read from the file), with it off nothing is kept.
    hist = r["history"]
    assert set(hist["relays"]) == {"off", "on"}
    for name, row in hist["relays"].items():
        assert row["sent"] > 0 and row["delivered_fraction"] == 1.0, (name, row)
        assert row["shown"] == row["displayed"] == row["sent"], (name, row)
        if have_proc:
            assert positive(row["cpu_us_per_msg"]) and positive(row["cpu_us_per_msg_burst"]), (name, row)
    assert hist["relays"]["on"]["history_rows"] == hist["relays"]["on"]["shown"], hist["relays"]["on"]
    assert hist["relays"]["off"]["history_rows"] is None
    if have_proc:
        assert 0.2 < hist["ratio_on_off"] < 10 and 0.2 < hist["ratio_on_off_burst"] < 10, hist

    # A network key on and off: both relay everything; the primitives cost something, under a millisecond.
    seal = r["seal"]
    assert set(seal["relays"]) == {"off", "on"}
    for name, row in seal["relays"].items():
        assert row["sent"] > 0 and row["delivered_fraction"] > 0.5, (name, row)
    assert 0 < seal["seal_us"] < 1000 and 0 < seal["unseal_us"] < 1000 and seal["overhead_bytes"] == 36
    if have_proc:
        assert 0.2 < seal["ratio_on_off"] < 10 and 0.2 < seal["ratio_on_off_burst"] < 10, seal

    lat = r["latency"]
    assert [x["hops"] for x in lat["lines"]] == [1, 4, 8]
    for row in lat["lines"]:
        assert row["received"] > 0, row
        assert positive(row["p50_ms"]) and row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row

    (scale,) = r["scale"]
    assert scale["nodes"] == 10 and positive(scale["ready_s"])
    assert fraction(scale["delivery_fraction"]) and scale["delivery_fraction"] > 0.5
    assert scale["delivered_pairs"] <= scale["expected_pairs"] == scale["broadcasts"] * 9
    if have_proc:
        assert positive(scale["rss_mb_mean"]) and scale["rss_mb_mean"] <= scale["rss_mb_max"] < 1000
        assert scale["idle_cpu_pct_of_core"] >= 0

    mem = r["memory"]
    assert 40 < mem["seen"]["filled_bytes_per_entry"] <= mem["seen"]["worst_bytes_per_entry"] < 10_000
    assert mem["node"]["ids_sent"] > 0 and 0 < mem["node"]["ids_relayed"] <= mem["node"]["ids_sent"]
    if have_proc:
        assert positive(mem["node"]["peak_rss_mb"])

    (flood,) = r["flood"]
    assert flood["ideal_per_message"] == 9
    assert flood["ideal_per_message"] <= flood["naive_per_message"] <= flood["every_neighbour_per_message"]
    # A node relays a message at most twice (the second time only after a copy with no hops left).
    assert positive(flood["per_message"]) and flood["per_message"] <= 2 * flood["every_neighbour_per_message"]

    # HELLOs are left out of the flood figures: without them the count is close to naive flooding's.
    assert flood["per_message"] <= flood["per_message_raw"] and flood["other_floods"] >= 0

    direct = r["direct"]
    assert direct["nodes"] == 10
    for kind in ("broadcast", "routed", "flooded"):
        row = direct[kind]
        assert row["messages"] >= 1 and row["delivery_fraction"] == 1.0, (kind, row)
        assert row["min"] <= row["per_message"] <= row["max"], (kind, row)
    # A routed message costs one datagram a hop, within the ttl; a flooded one about what a broadcast costs.
    routed = direct["routed"]
    assert 1 <= routed["hops_mean"] <= direct["ttl"] and routed["shortest_mean"] <= routed["hops_mean"]
    assert routed["max"] <= direct["ttl"]
    # A flood reaches every node: at least one datagram to each but the sender.
    assert direct["flooded"]["min"] >= flood["ideal_per_message"] and direct["broadcast"]["min"] >= 9
    assert direct["flooded"]["per_message"] <= 2 * flood["every_neighbour_per_message"]
    assert 0 < direct["routed_vs_broadcast"] < 0.5

    (idle,) = r["idle"]
    assert idle["nodes"] == 10 and idle["stats_from"] == 10 and idle["seconds"] > 2
    # HELLOs go on in an idle mesh, backed off: a 10-node mesh with 20 links sends far fewer than 1 a link a second
    # each way (the mesh started at once, so they come in waves: no lower bound in a 3-second window but some).
    assert 0 < idle["hello_sent_per_s"] < 2 * flood["edges"], idle
    assert idle["hello_received_per_s"] <= idle["hello_sent_per_s"] * 1.5 + 2, idle
    assert idle["other_datagrams_per_s"] >= 0
    if have_proc:
        assert 0 <= idle["cpu_pct_of_core"] < 100
    # No gap in a lossless idle mesh: nothing asked for, nothing served; summaries only after the last
    # broadcasts (one soon after, one more round at most), never more than one per link each way a round.
    rep = idle["repair_datagrams"]
    assert rep["wants_sent"] == 0 and rep["served"] == 0 and rep["retries"] == 0, idle
    assert 0 <= rep["haves_sent"] <= 2 * 2 * flood["edges"], idle
    assert sum(idle["have_sent_by_slice"]) == rep["haves_sent"] and len(idle["have_sent_by_slice"]) == idle["slices"]

    (live,) = r["liveness"]
    assert live["killed"] == 1 and live["reported"] == live["neighbours"] >= 2, live
    assert live["wrong_downs"] == 0
    # Down after 3 announced intervals of silence: never before 2 of them, never after the bound.
    assert 2 * live["hello_max_s"] < live["min_s"] <= live["max_s"] <= live["bound_s"] + 1.0, live

    disc = r["discovery"]
    assert disc["trials"] == 1
    for key in ("start_s", "found_s", "chat_s"):
        assert 0 <= disc[key]["median"] <= disc[key]["max"] < 30, (key, disc)
    assert disc["found_s"]["max"] <= disc["chat_s"]["max"]

    # Delivery's datagrams: every datagram a node sends to a neighbour crosses the lossy proxy, so the
    # proxy's count of what it got (link chatter apart) is about the nodes' count of what they sent but link chatter.
    lossless, lossy = r["repair"]
    assert (lossless["loss"], lossy["loss"]) == (0.0, 0.2)
    for row in (lossless, lossy):
        c = row["counters"]
        assert row["stats_from"] == row["nodes"] == 6 and row["directs"] >= 1 and row["broadcasts"] >= 1, row
        # (Not exactly: the snapshots of the nodes and of the proxy are a moment apart while the mesh is busy.)
        assert abs(row["hub"]["received"] - (c["sent"] - c["link_sent"])) <= max(5, 0.1 * row["hub"]["received"]), row
        assert row["shown_twice"] == 0, row
        assert c["acks_sent"] >= row["directs_acknowledged"] and c["haves_sent"] <= c["link_sent"], row
        assert row["per_message"]["all_datagrams"] >= row["per_message"]["flood"] > 0, row
        # A broadcast reaches every node: at least one datagram for each but its origin.
        assert row["per_message"]["flood"] >= (row["nodes"] - 1) * row["broadcasts"] / row["messages"], row
    # Without loss: every message shown once, every direct acknowledged once, nothing retried or repaired.
    c = lossless["counters"]
    assert lossless["delivery_fraction"] == 1.0 and lossless["hub"]["dropped_loss"] == 0, lossless
    assert lossless["directs_acknowledged"] == lossless["directs"] and lossless["ack_per_direct"] == 1.0, lossless
    assert c["retries"] == c["wants_sent"] == c["served"] == c["repaired"] == lossless["shown_late"] == 0, lossless
    # With 20% loss the proxy drops about a fifth, and acks, retries and repair get (nearly) everything through.
    assert 0.05 < lossy["hub_dropped_fraction"] < 0.4, lossy
    assert lossy["delivery_fraction"] >= 0.9, lossy
    assert lossy["per_message"]["all_datagrams"] < 10 * lossless["per_message"]["all_datagrams"], (lossless, lossy)

    # --html: one well-formed page with a chart per section that ran (relay, history, latency, flood, ...).
    import xml.etree.ElementTree as ET

    svgs = list(ET.parse(html).getroot().iter("{http://www.w3.org/2000/svg}svg"))
    assert len(svgs) >= 6
    # Security: signatures and boxes cost something, and a sealed datagram is bigger than a signed one.
    sec = r["security"]
    if "error" not in sec or "secure extra" not in sec["error"]:
        assert all(positive(sec[k]) for k in ("relay_off_us", "relay_on_us", "display_clear_us", "display_sealed_us",
                                             "sign_us", "seal_and_sign_us")), sec
        b = sec["datagram_bytes"]
        assert b["unsigned"] < b["signed"] < b["sealed_signed"], sec

    # Lazy push against flooding (simulated): fewer payloads, announcements counted apart, all delivered.
    for row in r["lazy"]["rows"]:
        f, z = row["flood"], row["lazy"]
        assert z["payload_per_msg"] < f["payload_per_msg"] and z["announce_per_msg"] > 0 == f["announce_per_msg"], row
        assert z["delivery_after_repair"] == f["delivery_after_repair"] == 1.0, row

    names = [t["target"] for t in r["targets"]]
    assert len(names) >= 15 and all(t["met"] in (True, False, None) for t in r["targets"])
    assert all(key in r["machine"] for key in ("cpu", "cores", "python", "os"))
