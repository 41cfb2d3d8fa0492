"""The mesh as this node knows it, as a text diagram (/map) and as a self-contained SVG (/map FILE.svg).

Pure: the input is ``Membership.mesh_map`` (plain dicts, as the node returns
them and ``--json`` prints them as the ``map`` event); nothing here does I/O.

What a node knows: its neighbours (state, round-trip time, loss), and for
every other node that announced itself its distance in hops, the neighbour
its messages came through (``via``) and the neighbours it listed in its last
PRESENCE (``links``, at most 16). So the links drawn are ours (with their
health), the ones other nodes announced, and, for a node two hops away, the
one its first copy proved; a node further away whose links are unknown hangs
from the neighbour it is reached through, drawn dashed.

The layout is deterministic: us in the middle, a ring per hop count.
"""

import math
from typing import Any, Dict, List, Optional, Tuple

from .membership import display_name
from .svgchart import esc

MAX_RINGS = 8  # nodes further than this (or at an unknown distance) share the outer ring
RING_PX = 110
NODE_R_PX = 13
STATE_COLOURS = {
    "you": "#3465a4", "neighbour up": "#4e9a06", "alive": "#73d216", "neighbour down": "#cc0000",
    "silent": "#888a85", "neighbour legacy": "#75507b", "neighbour unknown": "#babdb6",
}
UNKNOWN_COLOUR = "#babdb6"


def loss_colour(loss: Optional[float], state: str = "up") -> str:
    """A link's colour: green to red with its loss; grey when its health is not known."""
    if state == "down":
        return "#cc0000"
    if loss is None:
        return "#888a85"
    if loss < 0.02:
        return "#4e9a06"
    if loss < 0.10:
        return "#c4a000"
    if loss < 0.30:
        return "#f57900"
    return "#cc0000"


class Link(dict):
    """Two labels, how we know of the link ("ours", "announced", "route"), and its health if ours."""


def build(snapshot: Dict[str, Any]) -> Tuple[Dict[str, dict], List[Link], Dict[str, Optional[str]]]:
    """The nodes by label, the links (each pair once) and each node's parent in the drawing's tree."""
    nodes = {row["label"]: row for row in snapshot.get("nodes", [])}
    me = snapshot.get("label") or next(iter(nodes), "")
    links: Dict[frozenset, Link] = {}

    def add(a: str, b: str, **info: Any) -> None:
        if a == b or a not in nodes or b not in nodes:
            return
        key = frozenset((a, b))
        if key not in links or info.get("how") == "ours":
            links[key] = Link(a=a, b=b, **info)

    for row in snapshot.get("nodes", []):
        for other in row.get("links") or ():
            add(row["label"], other, how="announced", state="", loss=None, rtt_ms=None)
        if row.get("hops") == 2 and row.get("via"):
            add(row["via"], row["label"], how="route", state="", loss=None, rtt_ms=None)
    for n in snapshot.get("neighbours", []):
        add(me, n["label"], how="ours", state=n.get("state", ""), loss=n.get("loss"), rtt_ms=n.get("rtt_ms"))

    linked: Dict[str, List[str]] = {}
    for link in links.values():
        linked.setdefault(link["a"], []).append(link["b"])
        linked.setdefault(link["b"], []).append(link["a"])
    parent: Dict[str, Optional[str]] = {me: None}
    by_hops = sorted((r for r in nodes.values() if r["label"] != me),
                     key=lambda r: (r.get("hops") is None, r.get("hops") or 0, r["label"]))
    for row in by_hops:
        label, hops = row["label"], row.get("hops")
        if hops == 1:
            parent[label] = me
            continue
        # A linked node one hop nearer, preferably on the way we reach it (its via's branch).
        options = sorted(o for o in linked.get(label, ()) if o in parent and hops is not None
                         and nodes[o].get("hops") == hops - 1)
        on_way = [o for o in options if _branch(o, parent, me) == row.get("via")]
        pick = (on_way or options or [None])[0]
        parent[label] = pick if pick is not None else (row.get("via") if row.get("via") in nodes else None)
    return nodes, list(links.values()), parent


def _branch(label: str, parent: Dict[str, Optional[str]], me: str) -> Optional[str]:
    """The neighbour (child of ``me``) whose subtree holds ``label``."""
    seen = 0
    while parent.get(label) not in (me, None) and seen < MAX_RINGS * 64:
        label = parent[label]  # type: ignore[assignment]
        seen += 1
    return label if parent.get(label) == me else None


def _name(row: dict) -> str:
    return display_name(row["label"], row.get("nick") or "")


def _health(link: Optional[Link]) -> str:
    if link is None or link["how"] != "ours":
        return ""
    parts = [link["state"]] if link.get("state") else []
    if link.get("rtt_ms") is not None:
        parts.append(f"rtt {link['rtt_ms']:.1f} ms")
    if link.get("loss") is not None:
        parts.append(f"loss {link['loss']:.0%}")
    return ", ".join(parts)


def text_lines(snapshot: Dict[str, Any]) -> List[str]:
    """The mesh as a tree from us, a node per line, then the links the tree does not show."""
    nodes, links, parent = build(snapshot)
    if not nodes:
        return ["nothing known: this node has no membership"]
    me = snapshot.get("label") or next(iter(nodes))
    by_pair = {frozenset((k["a"], k["b"])): k for k in links}
    children: Dict[Optional[str], List[str]] = {}
    for label, p in parent.items():
        if label != me:
            children.setdefault(p, []).append(label)
    out = [f"{len(nodes) - 1} other node{'' if len(nodes) == 2 else 's'} known, {len(links)} "
           f"link{'' if len(links) == 1 else 's'}; a branch is the way we reach a node"]
    root = nodes.get(me, {"label": me})
    out.append(f"{_name(root)} (you{', ' + me if root.get('nick') else ''})")
    shown = set()
    drawn = {me}

    def walk(label: str, prefix: str) -> None:
        # Parents are strictly nearer, so there is no cycle; ``drawn`` keeps it so whatever the input.
        kids = sorted((k for k in children.get(label, []) if k not in drawn),
                      key=lambda k: (nodes[k].get("hops") or 0, k))
        drawn.update(kids)
        for i, kid in enumerate(kids):
            last = i == len(kids) - 1
            row = nodes[kid]
            link = by_pair.get(frozenset((label, kid)))
            if link is not None:
                shown.add(frozenset((label, kid)))
            hops = row.get("hops")
            bits = [row["label"]] if row.get("nick") else []
            bits.append(f"{hops} hop{'' if hops == 1 else 's'}" if hops is not None else "? hops")
            health = _health(link)
            bits.append(health if health else row.get("state", ""))
            if link is None:
                bits.append("link not known")
            branch = "└── " if last else "├── "
            out.append(f"{prefix}{branch}{_name(row)}  " + ", ".join(b for b in bits if b))
            walk(kid, prefix + ("    " if last else "│   "))

    walk(me, "")
    lost = sorted(k for k, p in parent.items() if p is None and k != me)
    if lost:
        out.append("way not known: " + ", ".join(_name(nodes[k]) for k in lost))
    extra = sorted((k for k in links if frozenset((k["a"], k["b"])) not in shown),
                   key=lambda k: (k["a"], k["b"]))
    if extra:
        out.append("other links:")
        for k in extra:
            health = _health(k)
            out.append(f"  {_name(nodes[k['a']])} ── {_name(nodes[k['b']])}"
                       + (f"  {health}" if health else f"  ({k['how']})"))
    return out


def layout(snapshot: Dict[str, Any]) -> Dict[str, Tuple[float, float]]:
    """Each node's position: us at (0, 0), a ring per hop, each ring in its parents' order."""
    nodes, _, parent = build(snapshot)
    me = snapshot.get("label") or next(iter(nodes), "")
    rings: Dict[int, List[str]] = {}
    for label, row in nodes.items():
        if label == me:
            continue
        hops = row.get("hops")
        ring = min(hops, MAX_RINGS) if isinstance(hops, int) and hops > 0 else MAX_RINGS
        rings.setdefault(ring, []).append(label)
    pos: Dict[str, Tuple[float, float]] = {me: (0.0, 0.0)}
    angle: Dict[str, float] = {me: 0.0}
    for ring in sorted(rings):
        order = sorted(rings[ring], key=lambda k: (angle.get(parent.get(k) or "", 7.0), k))
        n = len(order)
        for i, label in enumerate(order):
            a = 2 * math.pi * i / n - math.pi / 2 + (math.pi / n if ring % 2 == 0 else 0.0)
            angle[label] = (a + math.pi / 2) % (2 * math.pi)
            pos[label] = (ring * RING_PX * math.cos(a), ring * RING_PX * math.sin(a))
    return pos


def svg(snapshot: Dict[str, Any]) -> str:
    """The mesh as one self-contained SVG: nodes coloured by state, links by loss (grey: not known)."""
    nodes, links, _ = build(snapshot)
    pos = layout(snapshot)
    me = snapshot.get("label") or next(iter(nodes), "")
    radius = max((math.hypot(x, y) for x, y in pos.values()), default=0.0)
    half = radius + 120
    size = 2 * half
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size:.0f}" height="{size + 40:.0f}" '
           f'viewBox="{-half:.0f} {-half - 30:.0f} {size:.0f} {size + 40:.0f}" '
           f'font-family="sans-serif" font-size="11">',
           f'<title>meshchat: the mesh as {esc(me)} knows it</title>',
           f'<text x="0" y="{-half - 10:.0f}" text-anchor="middle" font-size="14" font-weight="bold">'
           f'the mesh as {esc(_name(nodes[me]) if me in nodes else me)} knows it: {len(nodes)} nodes, '
           f'{len(links)} links</text>']
    rings = sorted({round(math.hypot(x, y) / RING_PX) for x, y in pos.values()} - {0})
    for ring in rings:
        out.append(f'<circle cx="0" cy="0" r="{ring * RING_PX}" fill="none" stroke="#eee"/>')
    for k in sorted(links, key=lambda k: (k["a"], k["b"])):
        (x1, y1), (x2, y2) = pos[k["a"]], pos[k["b"]]
        colour = loss_colour(k.get("loss"), k.get("state", "")) if k["how"] == "ours" else UNKNOWN_COLOUR
        dash = ' stroke-dasharray="6,4"' if k["how"] != "ours" or k.get("state") == "down" else ""
        what = _health(k) or k["how"]
        width = 3 if k["how"] == "ours" else 1.5
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
                   f'data-a="{esc(k["a"])}" data-b="{esc(k["b"])}" stroke-width="{width}"{dash}><title>{esc(k["a"])} - '
                   f'{esc(k["b"])}: {esc(what)}</title></line>')
    for label in sorted(nodes, key=lambda k: (k != me, k)):
        row = nodes[label]
        x, y = pos[label]
        state = row.get("state", "")
        colour = STATE_COLOURS.get(state, UNKNOWN_COLOUR)
        hops = row.get("hops")
        out.append(f'<g class="node" data-label="{esc(label)}"><title>{esc(_name(row))} ({esc(label)}): '
                   f'{esc(state)}, {esc("?" if hops is None else hops)} hops</title>'
                   f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{NODE_R_PX}" fill="{colour}" stroke="#2e3436"/>'
                   f'<text x="{x:.1f}" y="{y + NODE_R_PX + 13:.1f}" text-anchor="middle">{esc(_name(row))}</text>'
                   f'</g>')
    lx, ly = -half + 10, half - 10
    for i, (state, colour) in enumerate(STATE_COLOURS.items()):
        out.append(f'<circle cx="{lx + 6}" cy="{ly - 14 * i - 4}" r="5" fill="{colour}"/>'
                   f'<text x="{lx + 15}" y="{ly - 14 * i}">{esc(state)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
