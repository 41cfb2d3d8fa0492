"""The store: round trips, bounds, the dir lock, damaged databases, seqs across crashes, a put that never blocks."""

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshchat import store as store_mod
from meshchat.store import (
    HeldAdd,
    HeldRemove,
    OutboxAdd,
    OutboxRemove,
    SaveMessage,
    SetMeta,
    Store,
    StoreError,
    data_dir_for,
    safe_label,
)

SUBPROCESS_TIMEOUT_S = 30


def chat(i, dst="", ts=None, late=False, origin="0123456789abcdef"):
    mid = f"{origin}-{i}"
    return SaveMessage(mid, 1000.0 + i if ts is None else ts, "a:1", dst, "CHAT", f"hello {i}", origin, i, late,
                       f"raw {i}".encode())


@pytest.fixture
def opened(tmp_path):
    stores = []

    def open_store(directory=None, **kwargs):
        s = Store.open(directory or tmp_path / "node", **kwargs)
        stores.append(s)
        return s

    yield open_store
    for s in stores:
        s.close()


def run_python(code, *args):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


# Data dirs

def test_safe_label():
    assert safe_label("127.0.0.1:9001") == "127.0.0.1_9001"
    assert safe_label("[::1]:9001") == "___1__9001"
    assert safe_label("..") == "_"  # never the parent dir
    assert safe_label("con") == "_con"
    assert "/" not in safe_label("../../etc/x:1") and "\\" not in safe_label("a\\b")


def test_data_dir_for_base_and_platform(monkeypatch, tmp_path):
    assert data_dir_for("127.0.0.1:9001", str(tmp_path)) == tmp_path / "127.0.0.1_9001"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir_for("h:1", None) == tmp_path / "xdg" / "meshchat" / "h_1"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert data_dir_for("h:1", None) == Path.home() / ".local" / "share" / "meshchat" / "h_1"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert data_dir_for("h:1", None) == Path.home() / "Library" / "Application Support" / "meshchat" / "h_1"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert data_dir_for("h:1", None) == tmp_path / "local" / "meshchat" / "h_1"


# Round trips

def test_round_trip_through_the_writer(opened, tmp_path):
    s = opened()
    s.start()
    s.put(chat(1))
    s.put(chat(2, late=True))
    s.put(SaveMessage("x-d1", 1003.0, "a:1", "b:2", "CHAT", "psst", None, None, False, b"direct"))
    s.put(OutboxAdd("m1", "b:2", b"one", s.clock()))
    s.put(OutboxAdd("m2", "b:2", b"two", s.clock()))
    s.put(OutboxAdd("m1", "b:2", b"one", s.clock(), tries=3))
    s.put(OutboxRemove("m2"))
    s.put(HeldAdd("h1", "c:3", b"held", s.clock()))
    s.put(HeldAdd("h2", "c:3", b"held2", s.clock()))
    s.put(HeldRemove("h1"))
    s.put(SetMeta("k", "v"))
    assert s.flush()
    last = s.last_messages(10)
    assert [m["mid"] for m in last] == ["0123456789abcdef-1", "0123456789abcdef-2", "x-d1"]
    assert last[1] == {"mid": "0123456789abcdef-2", "ts": 1002.0, "src": "a:1", "dst": "", "kind": "CHAT",
                       "body": "hello 2", "late": True, "nick": ""}
    assert s.messages_since(1001.0, 10) == [b"raw 2"]  # broadcasts only, newer than ts
    assert s.messages_since(0, 1) == [b"raw 1"]
    assert s.has_message("x-d1") and not s.has_message("nope")
    assert [(m, tries) for m, _, _, _, tries in s.outbox()] == [("m1", 3)]
    assert [m for m, *_ in s.held()] == ["h2"]
    assert s.meta("k") == "v"
    assert s.last_ts() == 1003.0
    assert s.highest_seqs() == {"0123456789abcdef": 2}
    s.close()
    again = opened()
    assert [m["mid"] for m in again.last_messages(2)] == ["0123456789abcdef-2", "x-d1"]
    assert again.has_message("0123456789abcdef-1")


def test_duplicate_mid_stored_once(opened):
    s = opened()
    for _ in range(3):
        s.put(chat(1))
    s.flush()
    assert len(s.last_messages(10)) == 1


def test_last_messages_in_conversation_order(opened):
    s = opened()
    s.put(chat(2))
    s.put(chat(1, late=True))  # repaired later, but older
    s.flush()
    assert [m["mid"][-1] for m in s.last_messages(5)] == ["1", "2"]
    assert [m["mid"][-1] for m in s.last_messages(1)] == ["2"]


def test_node_id_stable_across_reopen(opened, tmp_path):
    s = opened()
    node_id = s.node_id()
    assert len(node_id) == 16 and int(node_id, 16) >= 0
    s.close()
    assert opened().node_id() == node_id
    assert opened(tmp_path / "other").node_id() != node_id


# Bounds

def test_history_bounded_oldest_first(opened):
    s = opened(history_max=100)
    s.start()
    for i in range(1, 251):
        assert s.put(chat(i))
    s.flush()
    kept = s.last_messages(1000)
    assert 95 <= len(kept) <= 100
    assert kept[-1]["mid"].endswith("-250")
    assert not s.has_message(chat(1).mid) and not s.has_message(chat(150).mid)
    assert s.history_trimmed == 250 - len(kept)


def test_history_bound_lowered_applies_at_open(opened, tmp_path):
    s = opened()
    for i in range(1, 51):
        s.put(chat(i))
    s.close()
    small = opened(history_max=10)
    assert len(small.last_messages(100)) <= 10
    assert small.has_message(chat(50).mid)


def test_outbox_and_held_bounded_per_dst_and_in_total(opened):
    s = opened(per_dst_max=3, held_max=5)
    now = s.clock()
    for i in range(6):
        s.put(OutboxAdd(f"o{i}", "b:2", b"x", now + i))
        s.put(HeldAdd(f"h{i}", f"d{i % 3}", b"x", now + i))
    s.put(OutboxAdd("other", "c:3", b"x", now))
    s.flush()
    assert [m for m, *_ in s.outbox()] == ["other", "o3", "o4", "o5"]
    assert s.outbox_dropped == 3
    assert [m for m, *_ in s.held()] == ["h1", "h2", "h3", "h4", "h5"]
    assert s.held_dropped == 1


def test_outbox_and_held_expire_on_read_write_and_open(opened, tmp_path):
    clock = [10_000.0]
    s = opened(hold_s=100, clock=lambda: clock[0])
    s.put(OutboxAdd("old", "b:2", b"x", 9_950.0))
    s.put(HeldAdd("old-h", "b:2", b"x", 9_950.0))
    s.flush()
    assert [m for m, *_ in s.outbox()] == ["old"]
    clock[0] = 10_060.0
    assert s.outbox() == [] and s.held() == []  # past hold_s: not offered even before deletion
    s.put(OutboxAdd("new", "b:2", b"x", 10_060.0))  # a write expires the old ones
    s.flush()
    assert s.expired == 2
    s.close()
    clock[0] = 10_200.0
    reopened = opened(hold_s=100, clock=lambda: clock[0])
    assert reopened.expired == 1 and reopened.outbox() == []


# The dir lock

def test_second_open_in_process_refused_in_one_line(opened, tmp_path):
    s = opened()
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path / "node")
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"data dir {tmp_path / 'node'} is in use by another meshchat process;"
                       " use --data-dir or --no-history")
    s.close()
    opened().close()  # released by close


OPEN_IN_CHILD = """
import sys
from meshchat.store import Store, StoreError
try:
    Store.open(sys.argv[1])
except StoreError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
print("opened")
"""


def test_second_process_refused_with_one_line(opened, tmp_path):
    opened()
    result = run_python(OPEN_IN_CHILD, tmp_path / "node")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "is in use by another meshchat process" in result.stderr


def test_lock_released_when_process_dies(tmp_path):
    code = "import os, sys\nfrom meshchat.store import Store\nStore.open(sys.argv[1])\nos._exit(0)\n"
    assert run_python(code, tmp_path / "node").returncode == 0
    Store.open(tmp_path / "node").close()


# Damaged databases

def test_garbage_database_moved_aside(opened, tmp_path):
    directory = tmp_path / "node"
    directory.mkdir()
    (directory / "history.db").write_bytes(b"this is not sqlite at all" * 100)
    s = opened(clock=lambda: 1234567.0)
    assert len(s.warnings) == 1 and "\n" not in s.warnings[0]
    assert "moved aside to history.db.corrupt-1234567" in s.warnings[0]
    assert (directory / "history.db.corrupt-1234567").read_bytes().startswith(b"this is not sqlite")
    s.put(chat(1))
    s.flush()
    assert s.has_message(chat(1).mid)


def test_corrupt_pages_moved_aside(opened, tmp_path):
    s = opened()
    for i in range(1, 400):
        s.put(chat(i))
    s.close()
    path = tmp_path / "node" / "history.db"
    data = bytearray(path.read_bytes())
    for offset in range(4096, len(data), 1024):  # keep the header, damage the pages
        data[offset:offset + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    fresh = opened()
    assert len(fresh.warnings) == 1 and "moved aside" in fresh.warnings[0]
    assert fresh.last_messages(5) == []


def test_other_schema_version_moved_aside(opened, tmp_path):
    directory = tmp_path / "node"
    directory.mkdir()
    db = sqlite3.connect(str(directory / "history.db"))
    db.execute("CREATE TABLE messages(x)")
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    s = opened()
    assert len(s.warnings) == 1 and "schema version 99" in s.warnings[0]
    assert list(directory.glob("history.db.corrupt-*"))
    s.put(chat(1))
    s.flush()
    assert s.has_message(chat(1).mid)


def test_healthy_database_kept_without_warning(opened):
    opened().close()
    assert opened().warnings == []


def test_two_corruptions_in_one_second_keep_both_copies(opened, tmp_path):
    directory = tmp_path / "node"
    directory.mkdir()
    for _ in range(2):
        (directory / "history.db").write_bytes(b"garbage" * 100)
        opened(clock=lambda: 5.0).close()
    assert sorted(p.name for p in directory.glob("history.db.corrupt-*")) == [
        "history.db.corrupt-5", "history.db.corrupt-5.2"]


# Sequence numbers

def test_seqs_continue_after_clean_close(opened):
    s = opened()
    assert [s.next_seq() for _ in range(3)] == [1, 2, 3]
    assert s.next_seq("direct") == 1
    s.close()
    again = opened()
    assert again.highest_seq() == 3
    assert again.next_seq() == 4 and again.next_seq("direct") == 2


def test_set_highest_seq_never_goes_down(opened):
    s = opened()
    s.set_highest_seq(250)
    s.set_highest_seq(7)
    assert s.highest_seq() == 250 and s.next_seq() == 251


CRASH_IN_CHILD = """
import os, sys
from meshchat.store import Store, SaveMessage
s = Store.open(sys.argv[1])
s.start()
last = 0
for _ in range(int(sys.argv[2])):
    last = s.next_seq()
    s.put(SaveMessage(f"x-{last}", 1.0, "a", "", "CHAT", "b", "x", last, False, b"r"))
print(last, flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("taken", [1, 99, 100, 101, 150])
def test_seq_never_reused_after_a_crash(tmp_path, taken):
    result = run_python(CRASH_IN_CHILD, tmp_path / "node", taken)
    assert result.returncode == 0, result.stderr
    last = int(result.stdout)
    assert last == taken
    s = Store.open(tmp_path / "node")
    try:
        restored = s.highest_seq()
        assert last <= restored < last + store_mod.SEQ_BLOCK  # a crash skips less than a block
        assert s.next_seq() == restored + 1
    finally:
        s.close()


# The writer and its queue

def test_put_never_blocks_without_a_writer(opened):
    s = opened(queue_max=50)
    began = time.perf_counter()
    results = [s.put(chat(i)) for i in range(1, 201)]
    elapsed_s = time.perf_counter() - began
    assert results.count(True) == 50 and s.dropped == 150
    assert elapsed_s < 1.0
    s.close()  # writes what was queued
    assert len(opened().last_messages(1000)) == 50


def test_put_never_blocks_behind_a_stuck_writer(opened, monkeypatch):
    s = opened(queue_max=50)
    release = threading.Event()
    entered = threading.Event()
    real_write = s._write_batch

    def stuck_write(batch):
        entered.set()
        assert release.wait(10)
        real_write(batch)

    monkeypatch.setattr(s, "_write_batch", stuck_write)
    s.start()
    s.put(chat(1))
    assert entered.wait(5)  # the writer holds item 1 and is stuck on the disk
    began = time.perf_counter()
    results = [s.put(chat(i)) for i in range(2, 202)]
    elapsed_s = time.perf_counter() - began
    assert results.count(True) == 50 and s.dropped == 150
    assert elapsed_s < 1.0
    release.set()
    assert s.flush()
    assert len(s.last_messages(1000)) == 51


def test_writer_survives_a_bad_item(opened):
    s = opened()
    s.start()
    s.put(chat(1))
    s.put(SaveMessage("bad", 1.0, "a", "", "CHAT", object(), None, None, False, None))  # unbindable body
    s.put(chat(2))
    assert s.flush()
    assert s.has_message(chat(1).mid) and s.has_message(chat(2).mid)
    assert s.write_errors == 1


def test_put_refuses_what_is_not_an_item(opened):
    with pytest.raises(TypeError):
        opened().put(("mid", "body"))


def test_close_is_idempotent_and_joins_the_writer(opened):
    s = opened()
    s.start()
    s.put(chat(1))
    s.close()
    s.close()
    assert not any(t.name == "meshchat-store" for t in threading.enumerate())
    assert s.put(chat(2)) is False
    assert opened().has_message(chat(1).mid)  # flushed on close


def test_flush_waits_for_a_whole_batch(opened):
    s = opened()
    s.start()
    for i in range(1, 1001):
        s.put(chat(i))
    assert s.flush()
    assert s.written == 1000 and len(s.last_messages(2000)) == 1000


def test_reads_from_another_thread_beside_the_writer(opened):
    s = opened()
    s.start()
    errors = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                s.last_messages(20)
                s.has_message("x")
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    t = threading.Thread(target=reader, name="test-reader")
    t.start()
    for i in range(1, 2001):
        s.put(chat(i))
    s.flush()
    stop.set()
    t.join(5)
    assert errors == []
    assert len(s.last_messages(5000)) == 2000


def test_forward_hands_events_on_once_their_messages_are_committed(opened):
    # How the node shows what it saves: the main thread never waits for a commit of its own.
    s = opened()
    s.start()
    got = []
    done = threading.Event()

    def hand_on(events):
        got.append((list(events), s.has_message(chat(7).mid)))  # another connection: committed data only
        done.set()

    s.put(chat(7))
    s.forward(hand_on, ["shown"])
    assert done.wait(5.0)
    assert got == [(["shown"], True)]


def test_forward_without_a_writer_or_after_close_calls_at_once(opened):
    s = opened()
    got = []
    s.put(chat(1))
    s.forward(got.append, ["a"])  # no writer thread: written inline first
    assert got == [["a"]] and s.has_message(chat(1).mid)
    s.close()
    s.forward(got.append, ["b"])
    assert got == [["a"], ["b"]]


def test_history_rows_carry_the_nick_their_datagram_said(opened):
    s = opened()
    raw = b'{"mid":"n-1","ts":1.0,"ttl":3,"kind":"CHAT","src":"a:1","dst":"","body":"hi","nick":"alice"}'
    s.put(SaveMessage("n-1", 1.0, "a:1", "", "CHAT", "hi", "n", 1, False, raw))
    s.put(SaveMessage("n-2", 2.0, "a:1", "", "CHAT", "hi", "n", 2, False, b"not json"))
    s.flush()
    assert [m["nick"] for m in s.last_messages(5)] == ["alice", ""]
