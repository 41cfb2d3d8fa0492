"""By hand, not in CI: how fast the store's writer is, and what put() costs the caller.

    python scripts/bench_store.py [--items N] [--dir DIR]

Reports the items per second the writer sustains (SaveMessage of a typical
chat datagram, committed in batches), put()'s time per call (the relaying
thread's whole cost), the time of a flush, and of next_seq (mostly memory,
one fsynced write per block).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from meshchat.store import SaveMessage, Store

RAW = (b'{"mid":"0123456789abcdef-1","ts":1700000000.0,"ttl":7,"kind":"CHAT",'
       b'"src":"127.0.0.1:9001","dst":"","body":"hello there, this is a typical line"}')


def item(i: int) -> SaveMessage:
    return SaveMessage(f"0123456789abcdef-{i}", 1.7e9 + i, "127.0.0.1:9001", "", "CHAT",
                       "hello there, this is a typical line", "0123456789abcdef", i, False, RAW)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dir", help="data dir (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir or tmp) / "bench"
        store = Store.open(directory, queue_max=args.items + 1, history_max=max(args.items, 1))
        items = [item(i) for i in range(1, args.items + 1)]
        store.start()

        put_ns = []
        began = time.perf_counter()
        for it in items:
            t0 = time.perf_counter_ns()
            store.put(it)
            put_ns.append(time.perf_counter_ns() - t0)
        queued_s = time.perf_counter() - began
        assert store.flush(timeout_s=600)
        total_s = time.perf_counter() - began

        t0 = time.perf_counter()
        store.flush()
        empty_flush_ms = (time.perf_counter() - t0) * 1000

        seq_ns = []
        for _ in range(1000):
            t0 = time.perf_counter_ns()
            store.next_seq()
            seq_ns.append(time.perf_counter_ns() - t0)
        store.close()

        put_ns.sort()
        seq_ns.sort()
        print(f"items: {args.items}, dropped {store.dropped}, written {store.written}")
        print(f"writer: {args.items / total_s:,.0f} items/s ({total_s:.2f} s in all; puts took {queued_s:.2f} s)")
        print(f"put(): median {statistics.median(put_ns) / 1000:.2f} us,"
              f" p99 {put_ns[len(put_ns) * 99 // 100] / 1000:.2f} us, max {put_ns[-1] / 1000:.0f} us")
        print(f"flush() of an empty queue: {empty_flush_ms:.2f} ms")
        print(f"next_seq(): median {statistics.median(seq_ns) / 1000:.2f} us,"
              f" max {seq_ns[-1] / 1000:.0f} us (one fsynced write per block)")


if __name__ == "__main__":
    main()
