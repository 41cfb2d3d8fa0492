"""--html of scripts/chaos.py and scripts/bench.py: one well-formed page with inline SVG charts, from
whatever the run's JSON holds (a failed section is left out, never a traceback)."""

import os
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import reports  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
XHTML = "{http://www.w3.org/1999/xhtml}"


def charts(html: str):
    root = ET.fromstring(html)  # the page is well-formed XML: any HTML reader takes it too
    return root, list(root.iter(SVG + "svg"))


def test_chaos_report_has_delivery_before_and_after_repair_and_per_node():
    r = {"nodes": 3, "loss": 0.2, "delivery": 0.99, "first_flood_delivery": 0.8,
         "per_node": {"0": [10, 10], "1": [9, 10], "2": [0, 0]}, "rss_kib": {"0": 20480, "1": None},
         "net": {"dropped_loss": 12, "links": {"x": 1}}}
    root, svgs = charts(reports.chaos_html(r, "chaos: 3 nodes <&>\ndelivery: 99.00%"))
    assert len(svgs) == 3
    bars = [float(t.text.split(": ")[1].split()[0]) for t in svgs[0].iter(SVG + "title")]
    assert bars == [80.0, 99.0]
    per_node = [t.text for t in svgs[1].iter(SVG + "title")]
    assert len(per_node) == 2 and "node 1: 90" in per_node[1]  # node 2 expected nothing: no bar
    assert "chaos: 3 nodes <&>" in "".join(root.find(f"{XHTML}body").itertext())


def test_bench_report_draws_what_ran_and_skips_what_failed():
    r = {"quick": True,
         "relay": {"relays": {"bare": {"cpu_us_per_msg": 5.0, "max_rate_per_s": 9000},
                              "meshchat": {"cpu_us_per_msg": 20.0, "max_rate_per_s": 4000}}},
         "history": {"error": "RuntimeError: boom"},
         "latency": {"lines": [{"hops": 1, "p50_ms": 0.2, "p99_ms": 0.5, "max_ms": 1.0},
                               {"hops": 4, "p50_ms": 0.8, "p99_ms": 2.0, "max_ms": 3.0}]},
         "flood": [{"nodes": 10, "per_message": 22.0, "ideal_per_message": 9, "naive_per_message": 30}],
         "scale": [{"error": "x"}],
         "repair": [{"loss": 0.0, "delivery_fraction": 1.0, "per_message": {"all_datagrams": 30}}],
         "targets": [{"target": "t", "value": 1, "op": "<=", "limit": 2, "unit": "ms", "met": True}]}
    root, svgs = charts(reports.bench_html(r, "bench text"))
    titles = [t.text for s in svgs for t in s.iter() if t.tag == SVG + "text" and t.get("font-weight") == "bold"]
    assert titles == ["CPU per message relayed", "highest rate relayed", "one-way latency along a line of nodes",
                      "datagrams a broadcast costs the mesh", "delivery, and datagrams per message"]
    headings = [h.text for h in root.iter(XHTML + "h2")]
    assert "Relay cost, history on and off" not in headings and "Targets" in headings


def test_an_empty_run_is_still_a_page():
    root, svgs = charts(reports.bench_html({}, ""))
    assert svgs == [] and root.find(f"{XHTML}head/{XHTML}title").text == "meshchat benchmark"
