"""One-file HTML reports of scripts/chaos.py and scripts/bench.py (``--html FILE``): the text
report and inline SVG charts, no dependency, so that a run can be shared as one file.

Both take the run's JSON (what ``--json`` prints) and draw whatever it holds:
a section that failed or did not run is left out.
"""

import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshchat.svgchart import bar_chart, html_page, html_table, line_chart  # noqa: E402


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else 100.0 * x


def chaos_html(r: Dict[str, Any], text: str) -> str:
    """Delivery on the first flood and after repair, delivery per node, memory per node."""
    sections: List[Tuple[str, str]] = []
    sections.append(("Delivery, before and after repair", bar_chart(
        f"delivery at {r.get('loss', 0):.0%} loss per link", ["first flood (no repair)", "in the end (repaired)"],
        [("delivery", [_pct(r.get("first_flood_delivery")), _pct(r.get("delivery"))])], unit="%", top=100.0)))
    per_node = r.get("per_node") or {}
    if per_node:
        ids = sorted(per_node, key=lambda k: int(k))
        sections.append(("Delivery per node", bar_chart(
            "share of the messages each node should have shown that it showed", [f"node {i}" for i in ids],
            [("delivered", [_pct(per_node[i][0] / per_node[i][1]) if per_node[i][1] else None for i in ids])],
            unit="%", top=100.0, width=max(640, 40 * len(ids)))))
    rss = {k: v for k, v in (r.get("rss_kib") or {}).items() if v is not None}
    if rss:
        ids = sorted(rss, key=lambda k: int(k))
        sections.append(("Memory per node", bar_chart(
            "resident memory (VmRSS)", [f"node {i}" for i in ids], [("MiB", [rss[i] / 1024 for i in ids])],
            unit="MiB", width=max(640, 40 * len(ids)))))
    net = {k: v for k, v in (r.get("net") or {}).items() if not isinstance(v, dict)}
    if net:
        sections.append(("Network counters", html_table(["counter", "value"], sorted(net.items()))))
    title = f"meshchat chaos run: {r.get('nodes', '?')} nodes, {r.get('loss', 0):.0%} loss"
    return html_page(title, sections, preamble=text)


def _ok(section: Any) -> bool:
    return isinstance(section, dict) and "error" not in section


def bench_html(r: Dict[str, Any], text: str) -> str:
    """Relay cost per relay, latency per hop, flood cost and delivery per mesh size, repair, targets."""
    sections: List[Tuple[str, str]] = []
    relay = r.get("relay")
    if _ok(relay) and relay.get("relays"):
        names = list(relay["relays"])
        rows = relay["relays"]
        sections.append(("Relay cost per relay", bar_chart(
            "CPU per message relayed", names, [("µs per message", [rows[n].get("cpu_us_per_msg") for n in names])],
            unit="µs/message")
            + "\n" + bar_chart("highest rate relayed", names,
                               [("messages/s", [rows[n].get("max_rate_per_s") for n in names])], unit="messages/s")))
    hist = r.get("history")
    if _ok(hist) and hist.get("relays"):
        names = list(hist["relays"])
        sections.append(("Relay cost, history on and off", bar_chart(
            "CPU per message shown and relayed", [f"history {n}" for n in names],
            [("steady", [hist["relays"][n].get("cpu_us_per_msg") for n in names]),
             ("burst", [hist["relays"][n].get("cpu_us_per_msg_burst") for n in names])], unit="µs/message")))
    lat = r.get("latency")
    if _ok(lat) and lat.get("lines"):
        hops = [x["hops"] for x in lat["lines"]]
        sections.append(("Latency per hop", line_chart(
            "one-way latency along a line of nodes", hops,
            [(k, [x.get(f"{k}_ms") for x in lat["lines"]]) for k in ("p50", "p99", "max")],
            xlabel="hops", unit="ms")))
    floods = [x for x in r.get("flood") or [] if _ok(x)]
    if floods:
        sizes = [str(x.get("nodes", "?")) for x in floods]
        sections.append(("Datagrams per broadcast", bar_chart(
            "datagrams a broadcast costs the mesh", [f"{s} nodes" for s in sizes],
            [(label, [x.get(key) for x in floods]) for label, key in (
                ("meshchat", "per_message"), ("ideal (one per node)", "ideal_per_message"),
                ("naive flooding", "naive_per_message"))], unit="datagrams")))
    scale = [x for x in r.get("scale") or [] if _ok(x)]
    if scale:
        sections.append(("Delivery per mesh size", bar_chart(
            "broadcasts shown by every node", [f"{x.get('nodes')} nodes" for x in scale],
            [("delivery", [_pct(x.get("delivery_fraction")) for x in scale])], unit="%", top=100.0)))
    repair = [x for x in r.get("repair") or [] if _ok(x)]
    if repair:
        cats = [f"{x.get('loss', 0):.0%} loss" for x in repair]
        sections.append(("Delivery with acks and repair", bar_chart(
            "delivery, and datagrams per message", cats,
            [("delivery %", [_pct(x.get("delivery_fraction")) for x in repair]),
             ("datagrams/message", [(x.get("per_message") or {}).get("all_datagrams") for x in repair])])))
    targets = r.get("targets") or []
    if targets:
        sections.append(("Targets", html_table(
            ["target", "this run", "limit", "status"],
            [[t.get("target"), t.get("value"), f"{t.get('op', '')} {t.get('limit')} {t.get('unit', '')}",
              {True: "met", False: "NOT MET", None: "n/a"}.get(t.get("met"), "n/a")] for t in targets])))
    title = "meshchat benchmark" + (" (quick)" if r.get("quick") else "")
    return html_page(title, sections, preamble=text)


def write(path: str, html: str) -> Optional[str]:
    """Write the page; None, or the one-line reason it could not be written."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(html)
    except OSError as e:
        return f"cannot write {path}: {e.strerror or e}"
    return None
