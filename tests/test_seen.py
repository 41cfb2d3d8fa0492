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
