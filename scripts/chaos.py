#!/usr/bin/env python3
"""Chaos run: a mesh of real meshchat processes on lossy links, with nodes killed and restarted.

    python scripts/chaos.py --nodes 30 --degree 4 --loss 0.2 --duration 120 --kills-per-minute 6 --seed 7

Every link goes through a UDP proxy (tests/lossy.py) that drops, delays,
duplicates and reorders datagrams with a seeded random generator; it needs no
privileges and runs anywhere. Random live nodes send messages at ``--rate`` a
second; nodes are killed with SIGKILL at random (``--kills-per-minute``) and
restarted on the same port with the same command line after ``--down``
seconds. At the end every node is up, the mesh settles, and this prints the
delivery (node x message pairs where the node was up while the message
flooded), both on the first flood (shown within 1 s, not late) and in the end
(after repair, late included), duplicates shown, and memory per node (VmRSS; "n/a" where
/proc/PID/status does not exist).

``--netns`` (Linux, root, ``ip`` and ``nft``): one network namespace per node
with its own address 10.77.0.N/24 on a bridge in a namespace of its own, and
the loss done by the kernel (an nftables ``numgen random`` drop rule). Every
namespace is deleted at the end, on error, on Ctrl-C and on SIGTERM; a run
killed with -9 leaves them behind, and the next --netns run deletes them.
Delay, duplication and reordering are proxy-only.

Exit status: 0 if it ran (whatever the figures), 1 if --min-delivery was given
and not reached or a message was shown twice, 2 for bad arguments, 3 if the
network could not be set up.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from lossy import NetnsUnavailable, format_report, install_stop_signals, run_chaos  # noqa: E402


def _fraction(text: str) -> float:
    value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1 (or 0% and 100%)")
    return value


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is negative")
        return value
    return convert


def _bad_link(text: str):
    try:
        pair, loss = text.split(":", 1)
        a, b = (int(x) for x in pair.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A-B:LOSS, e.g. 3-5:0.4")
    return (a, b), _fraction(loss)


def _span(text: str):
    parts = [float(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] < 0 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not SECONDS or MIN,MAX")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", "-n", type=int, default=12, help="number of nodes (default 12)")
    p.add_argument("--degree", "-d", type=int, default=4, help="neighbours per node (default 4)")
    p.add_argument("--loss", type=_fraction, default=0.2, help="loss per link, 0.2 or 20%% (default 0.2)")
    p.add_argument("--duration", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="seconds of traffic (default 30)")
    p.add_argument("--kills-per-minute", type=_positive(float), default=6.0,
                   help="SIGKILLs per minute on average (default 6; 0 for none)")
    p.add_argument("--down", type=_span, default=(1.0, 3.0), metavar="MIN,MAX",
                   help="seconds a killed node stays down (default 1,3)")
    p.add_argument("--max-down", type=int, help="most nodes down at once (default nodes/4)")
    p.add_argument("--seed", type=int, default=1, help="seed for topology, proxies and the schedule")
    p.add_argument("--rate", type=_positive(float), default=10.0, help="messages a second, all nodes together")
    p.add_argument("--dup", type=_fraction, default=0.0, help="duplication per link (proxies only)")
    p.add_argument("--delay", type=_span, default=(0.0, 0.0), metavar="MIN,MAX",
                   help="delay per link in seconds (proxies only)")
    p.add_argument("--reorder", type=_fraction, default=0.0, help="reordering per link (proxies only)")
    p.add_argument("--netns", action="store_true", help="one network namespace per node, kernel loss")
    p.add_argument("--min-delivery", type=_fraction, help="exit 1 below this delivery")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON line at the end")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.add_argument("--html", metavar="FILE", help="also write the report with its charts as one HTML file")
    p.add_argument("--bad-link", type=_bad_link, action="append", default=[], metavar="A-B:LOSS",
                   help="this link loses LOSS instead of --loss (e.g. 3-5:0.4); repeatable. The report "
                   "then shows which links the nodes' /peers flag")
    p.add_argument("--map", metavar="FILE.svg", help="at the end, node 0 draws the mesh as it knows it (/map FILE.svg)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.degree < 1:
        parser.error("--nodes must be at least 2 and --degree at least 1")
    if args.netns and (args.dup or args.reorder or args.delay != (0.0, 0.0)):
        parser.error("--dup, --delay and --reorder need the proxies; leave out --netns")
    install_stop_signals()
    head = (f"chaos: {args.nodes} nodes, degree {args.degree}, loss {args.loss:.0%}, {args.duration:g} s, "
            f"{args.kills_per_minute:g} kills/min, seed {args.seed}")
    print(head, flush=True)

    def progress(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    try:
        report = run_chaos(nodes=args.nodes, degree=args.degree, loss=args.loss, duration_s=args.duration,
                           kills_per_min=args.kills_per_minute, seed=args.seed, rate=args.rate, dup=args.dup,
                           delay=args.delay, reorder=args.reorder, netns=args.netns, down_s=args.down,
                           max_down=args.max_down, progress=progress, bad_links=dict(args.bad_link),
                           map_svg=args.map)
    except NetnsUnavailable as e:
        print(f"chaos: --netns is not possible here: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # a --bad-link that is not a link of this mesh
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chaos: interrupted; every node and namespace was stopped", file=sys.stderr)
        return 130
    print(format_report(report), flush=True)
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True), flush=True)
    if args.html:
        import reports

        error = reports.write(args.html, reports.chaos_html(dict(report.as_dict(), loss=args.loss),
                                                            head + "\n" + format_report(report)))
        print(f"chaos: {error or 'report written to ' + args.html}", file=sys.stderr, flush=True)
    if report.duplicates or (args.min_delivery is not None and report.delivery < args.min_delivery):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
