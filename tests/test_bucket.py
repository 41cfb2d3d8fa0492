"""The one token bucket: a burst, then the rate, and nothing taken when empty."""

from meshchat.bucket import new_bucket, take


def test_a_full_bucket_gives_its_burst_then_refills_at_its_rate():
    b = new_bucket(10.0)  # 10 a second, a burst of 2 s
    assert sum(take(b, 10.0, 0.0) for _ in range(30)) == 20
    assert not take(b, 10.0, 0.05)  # half a token
    assert take(b, 10.0, 0.1) and not take(b, 10.0, 0.1)
    assert sum(take(b, 10.0, 100.0) for _ in range(30)) == 20  # never more than the burst


def test_a_one_second_burst():
    b = new_bucket(5.0, burst_s=1.0)
    assert sum(take(b, 5.0, 1.0, burst_s=1.0) for _ in range(10)) == 5
