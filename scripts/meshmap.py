#!/usr/bin/env python3
"""Draw the mesh as a running node knows it: a text tree, or a self-contained SVG with -o.

    python scripts/meshmap.py http://127.0.0.1:9100 -o mesh.svg   # a node started with --metrics 9100
    meshchat --json ... | tee events.jsonl                        # then /map in it, and:
    python scripts/meshmap.py events.jsonl -o mesh.svg            # the last "map" event in a --json log

A URL is a node's --metrics endpoint: its /map.json is read (what /map
shows). A file (or - for stdin) is --json output: the last {"event": "map"}
line in it is drawn. Exit status: 0 drawn, 1 nothing to draw (one line on
stderr saying why), 2 bad arguments.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshchat import meshmap  # noqa: E402

FETCH_TIMEOUT_S = 5.0
MAX_FETCH_BYTES = 16 * 1024 * 1024


class Unusable(Exception):
    pass


def from_url(url: str) -> dict:
    base = url.rstrip("/")
    if base.endswith("/metrics") or base.endswith("/map.json"):
        base = base.rsplit("/", 1)[0]
    try:
        with urllib.request.urlopen(base + "/map.json", timeout=FETCH_TIMEOUT_S) as r:
            return json.loads(r.read(MAX_FETCH_BYTES))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Unusable(f"cannot read {base}/map.json: {getattr(e, 'reason', e)}") from None


def from_lines(path: str) -> dict:
    try:
        stream = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise Unusable(f"cannot read {path}: {e.strerror or e}") from None
    found = None
    with stream:
        for line in stream:
            if '"map"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "map":
                found = event
    if found is None:
        raise Unusable(f"no map event in {path}: type /map in the node (run with --json) first")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="http://HOST:PORT of a node's --metrics, or a --json log file (- for stdin)")
    p.add_argument("-o", "--output", metavar="FILE.svg", help="write an SVG here (default: a text tree on stdout)")
    args = p.parse_args(argv)
    try:
        snap = from_url(args.source) if args.source.startswith(("http://", "https://")) else from_lines(args.source)
        if not isinstance(snap, dict) or not isinstance(snap.get("nodes"), list):
            raise Unusable("that is not a map: no list of nodes in it")
        if args.output:
            try:
                with open(args.output, "w", encoding="utf-8") as f:
                    f.write(meshmap.svg(snap))
            except OSError as e:
                raise Unusable(f"cannot write {args.output}: {e.strerror or e}") from None
            print(f"meshmap: {len(snap['nodes'])} nodes written to {args.output}", file=sys.stderr)
        else:
            print("\n".join(meshmap.text_lines(snap)))
    except (Unusable, KeyError, TypeError, AttributeError) as e:
        print(f"meshmap: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
