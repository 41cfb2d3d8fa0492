"""/map: the pure drawing (text tree and SVG), PRESENCE's links field, and /map on real nodes."""

import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from meshchat import meshmap
from meshchat.cli import run_command
from meshchat.console import JsonConsole, TerminalConsole
from meshchat.commands import Bad, Map, parse_line
from meshchat.membership import MAX_LINKS, Membership, MembershipConfig, display_name, parse_links
from meshchat.wire import Message

from nodes import Cluster

SVG = "{http://www.w3.org/2000/svg}"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lbl(i: int) -> str:
    return f"127.0.0.1:{i}"


def node(i, hops, state, nick="", via=None, links=()):
    return {"label": lbl(i), "nick": nick, "hops": hops, "last_seen_s": 1.0, "state": state, "via": via,
            "links": list(links)}


SNAP = {
    "label": lbl(1),
    "nodes": [node(1, 0, "you", "me"), node(2, 1, "neighbour up", "bob", lbl(2), [lbl(1), lbl(3)]),
              node(4, 1, "neighbour down"), node(3, 2, "alive", "c<&>\"", lbl(2), [lbl(2), lbl(5), lbl(4)]),
              node(5, 3, "alive", "dave", lbl(2)), node(6, None, "silent", "eve"),
              node(7, 4, "alive", "far", lbl(2))],
    "neighbours": [{"label": lbl(2), "state": "up", "loss": 0.25, "rtt_ms": 1.25},
                   {"label": lbl(4), "state": "down", "loss": None, "rtt_ms": None}],
}


def test_the_text_map_is_a_tree_from_us_with_link_health_and_the_other_links():
    lines = meshmap.text_lines(SNAP)
    text = "\n".join(lines)
    assert lines[1] == "me#" + display_name(lbl(1), "me").split("#")[1] + " (you, 127.0.0.1:1)"
    # bob is our neighbour (health of our link), c hangs under bob, dave under c (c announced the link).
    bob = next(i for i, x in enumerate(lines) if "bob#" in x)
    assert "up, rtt 1.2 ms, loss 25%" in lines[bob]
    assert lines[bob + 1].startswith("│   ├── c<&>\"#") and "2 hops, alive" in lines[bob + 1]
    assert lines[bob + 2].startswith("│   │   └── dave#") and "3 hops" in lines[bob + 2]
    assert "127.0.0.1:4  1 hop, down" in text
    # A node 4 hops away whose links nobody announced hangs from its way in, marked so.
    assert "far#" in text and "link not known" in text
    assert "way not known: eve#" in text
    assert "other links:" in text and "(announced)" in text  # c - 4, announced by c
    for row in SNAP["nodes"]:
        assert display_name(row["label"], row["nick"]) in text


def test_the_svg_is_well_formed_lists_every_node_and_colours_links_by_loss():
    svg = meshmap.svg(SNAP)
    root = ET.fromstring(svg)
    labels = [g.get("data-label") for g in root.iter(SVG + "g") if g.get("class") == "node"]
    assert sorted(labels) == sorted(r["label"] for r in SNAP["nodes"])
    lines = {(ln.get("data-a"), ln.get("data-b")): ln for ln in root.iter(SVG + "line") if ln.get("data-a")}
    ours = lines[(lbl(1), lbl(2))]
    assert ours.get("stroke") == meshmap.loss_colour(0.25) != meshmap.loss_colour(0.0)
    assert lines[(lbl(1), lbl(4))].get("stroke-dasharray")  # down: dashed red
    assert meshmap.svg(SNAP) == svg  # deterministic


def test_the_layout_puts_us_in_the_middle_and_a_ring_per_hop():
    pos = meshmap.layout(SNAP)
    assert pos[lbl(1)] == (0.0, 0.0)
    for row in SNAP["nodes"][1:]:
        x, y = pos[row["label"]]
        ring = row["hops"] if row["hops"] is not None else meshmap.MAX_RINGS
        assert abs((x * x + y * y) ** 0.5 - ring * meshmap.RING_PX) < 1e-6


def test_hostile_text_is_escaped_in_the_svg():
    snap = json.loads(json.dumps(SNAP))
    snap["nodes"][1]["nick"] = "</text><script>x</script>\x01\ud800"
    root = ET.fromstring(meshmap.svg(snap))
    assert not list(root.iter(SVG + "script"))


def test_presence_links_are_bounded_and_validated():
    assert parse_links([lbl(2), lbl(3), lbl(2)]) == (lbl(2), lbl(3))
    assert parse_links([]) == ()
    for bad in (None, "127.0.0.1:2", [lbl(i) for i in range(1, MAX_LINKS + 2)], [1], ["nohost"], ["a:0"],
                ["x" * 70 + ":1"]):
        assert parse_links(bad) is None, bad
    m = Membership(MembershipConfig(label=lbl(1)), secret=b"k")
    m.learn(Message("p", 1.0, 5, "PRESENCE", lbl(9), "", "", {"ttl0": 8, "caps": ["HELLO"], "links": [lbl(8)]}),
            ("127.0.0.1", 2), 1.0)
    m.learn(Message("q", 1.0, 5, "PRESENCE", lbl(7), "", "", {"ttl0": 8, "caps": ["HELLO"], "links": [1, 2]}),
            ("127.0.0.1", 2), 1.0)
    assert m.members[lbl(9)].links == (lbl(8),) and m.members[lbl(7)].links == ()
    rows = {r["label"]: r for r in m.mesh_map(2.0)["nodes"]}
    assert rows[lbl(9)]["links"] == [lbl(8)] and rows[lbl(9)]["hops"] == 4


def test_map_commands_parse():
    assert parse_line("/map") == Map("")
    assert parse_line("/map mesh.svg") == Map("mesh.svg")
    assert isinstance(parse_line("/map mesh.png"), Bad)


def test_map_on_a_line_of_four_nodes_draws_every_node_and_the_far_links(tmp_path):
    """1 - 2 - 3 - 4: node 1 hears of 3 and 4 only from floods; their PRESENCE names their links."""
    with Cluster(4, edges=[(1, 2), (2, 3), (3, 4)], membership=MembershipConfig(label="")) as c:
        labels = {c[i].label for i in range(1, 5)}

        def knows_all() -> bool:
            rows = {r["label"]: r for r in c[1].node.mesh_map()["nodes"]}
            if set(rows) != labels or any(r["hops"] is None for r in rows.values()):
                return False
            return c[4].label in rows[c[3].label]["links"] or c[3].label in rows[c[4].label]["links"]

        c.wait_until(knows_all, timeout=15)
        out = io.StringIO()
        term = TerminalConsole(out, color=False, interactive=False, columns=lambda: 200)
        assert run_command(Map(""), c[1].node, term)
        text = out.getvalue()
        assert all(label in text for label in labels - {c[1].label}) and "3 hops" in text
        assert "link not known" not in text  # every link on the way was proved or announced

        path = tmp_path / "mesh.svg"
        json_out = io.StringIO()
        assert run_command(Map(str(path)), c[1].node, JsonConsole(json_out))
        assert "written to" in json.loads(json_out.getvalue())["text"]
        root = ET.parse(path).getroot()
        drawn = {g.get("data-label") for g in root.iter(SVG + "g") if g.get("class") == "node"}
        assert drawn == labels
        drawn_links = {tuple(sorted((ln.get("data-a"), ln.get("data-b")))) for ln in root.iter(SVG + "line")
                       if ln.get("data-a")}
        assert drawn_links >= {
            tuple(sorted((c[3].label, c[4].label))), tuple(sorted((c[2].label, c[3].label)))}

        json_out = io.StringIO()
        run_command(parse_line("/map"), c[1].node, JsonConsole(json_out))
        event = json.loads(json_out.getvalue())
        assert event["event"] == "map" and {r["label"] for r in event["nodes"]} == labels

        bad = io.StringIO()
        run_command(Map(str(tmp_path / "no" / "such" / "dir.svg")), c[1].node, JsonConsole(bad))
        assert json.loads(bad.getvalue())["event"] == "error"


def test_meshmap_script_draws_from_a_map_event_file(tmp_path):
    src = tmp_path / "events.jsonl"
    src.write_text(json.dumps({"event": "ready", "node": lbl(1)}) + "\n" + json.dumps(dict(SNAP, event="map")) + "\n")
    svg_path = tmp_path / "out.svg"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "meshmap.py"), str(src), "-o",
                           str(svg_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    drawn = {g.get("data-label") for g in ET.parse(svg_path).getroot().iter(SVG + "g") if g.get("class") == "node"}
    assert drawn == {r["label"] for r in SNAP["nodes"]}
    text = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "meshmap.py"), str(src)],
                          capture_output=True, text=True, timeout=30)
    assert text.returncode == 0 and "bob#" in text.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "meshmap.py"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
