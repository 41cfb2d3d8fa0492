import pytest

from meshchat.seen import SeenCache


def test_add_reports_new_once():
    seen = SeenCache(ttl_s=10, max_entries=100)
    assert seen.add("a", 0.0, 0.0)
    assert not seen.add("a", 1.0, 0.0)
    assert "a" in seen and "b" not in seen and len(seen) == 1


def test_expire_forgets_only_what_is_older_than_ttl():
    seen = SeenCache(ttl_s=10, max_entries=100)
    for i in range(5):
        seen.add(f"m{i}", float(i), float(i))
    assert seen.expire(now=12.0) == 3  # m0, m1, m2 are 10 s old or more
    assert [m for m in ("m0", "m1", "m2", "m3", "m4") if m in seen] == ["m3", "m4"]
    assert seen.add("m0", 12.0, 0.0), "an expired id is new again"


def test_bound_drops_the_oldest_first():
    seen = SeenCache(ttl_s=1000, max_entries=100)
    for i in range(1000):
        seen.add(f"m{i}", float(i), float(i))
    assert len(seen) <= 100
    assert "m999" in seen and "m900" in seen and "m0" not in seen


@pytest.mark.parametrize("ttl, size", [(0, 10), (10, 0)])
def test_bad_settings_are_refused(ttl, size):
    with pytest.raises(ValueError):
        SeenCache(ttl, size)


def test_a_million_unique_ids_stay_within_the_bound_and_memory():
    import tracemalloc

    seen = SeenCache(ttl_s=120, max_entries=100_000)
    tracemalloc.start()
    try:
        for i in range(1_000_000):
            seen.add("%032x" % i, i * 1e-4, i * 1e-4)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(seen) <= 100_000
    assert current < 100_000 * 200, f"{current / len(seen):.0f} bytes per entry"


def test_the_horizon_is_the_newest_ts_of_any_forgotten_id():
    seen = SeenCache(ttl_s=10, max_entries=100)
    assert seen.horizon_ts == float("-inf")
    seen.add("a", 0.0, 500.0)  # dated ahead
    seen.add("b", 0.4, 90.0)  # shares a's time stamp, so it is forgotten with a
    seen.add("c", 1.0, 99.0)
    assert seen.expire(10.0) == 2 and seen.horizon_ts == 500.0, "b's batch held a's newer ts"
    assert seen.expire(11.0) == 1 and seen.horizon_ts == 500.0, "never goes down"
    assert seen.young_forgotten == 0, "expiry is not eviction"


def test_eviction_raises_the_horizon_and_counts_young_ids():
    seen = SeenCache(ttl_s=100, max_entries=20)
    for i in range(25):
        seen.add(f"m{i}", i * 1.0, 1000.0 + i)
    assert "m4" not in seen and "m5" in seen, "one at a time (5% of 20)"
    assert seen.horizon_ts == 1004.0 and seen.young_forgotten == 5
    old = SeenCache(ttl_s=10, max_entries=20)
    for i in range(20):
        old.add(f"m{i}", 0.0, 1.0)
    old.add("late", 50.0, 2.0)  # the ids pushed out were already past ttl_s: not young
    assert old.young_forgotten == 0 and old.horizon_ts == 1.0


def test_batches_kept_for_the_horizon_stay_few():
    seen = SeenCache(ttl_s=120, max_entries=1000)
    for i in range(100_000):
        seen.add("%x" % i, i * 0.01, i * 0.01)  # 100 ids a second for 1,000 s
        if i % 500 == 0:
            seen.expire(i * 0.01)
    assert len(seen) <= 1000 and len(seen._batches) <= 1000 * 0.01 / 0.5 + 2
