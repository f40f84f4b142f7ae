"""The sliding-window budgets: exact limits, settling, restarts, idle identities, and real threads."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest

from serve_app.rate_windows import WINDOW_S, SlidingWindowLimiter
from serve_app.settings import RateLimitSettings
from tests.support.concurrency import admit_from_threads
from tests.support.concurrency import tiny_switch_interval as switching_often


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    with switching_often():
        yield


def test_requests_per_minute_is_a_sliding_window() -> None:
    clock = Clock()
    windows, limits = SlidingWindowLimiter(clock), RateLimitSettings(requests_per_minute=3)
    assert [windows.admit("a", 1, limits).admitted for _ in range(4)] == [True, True, True, False]
    refused = windows.admit("a", 1, limits)
    assert refused.reservation is None
    assert refused.retry_after_s == pytest.approx(WINDOW_S) and refused.requests.remaining == 0
    assert windows.admit("b", 1, limits).admitted  # budgets are per identity
    clock.advance(30)
    assert not windows.admit("a", 1, limits).admitted  # no burst at a window edge
    clock.advance(30.01)
    assert windows.admit("a", 1, limits).admitted


def test_tokens_are_reserved_then_settled_once() -> None:
    windows, limits = SlidingWindowLimiter(Clock()), RateLimitSettings(tokens_per_minute=1000)
    first = windows.admit("a", 800, limits)
    assert first.admitted and first.tokens.remaining == 200
    assert not windows.admit("a", 300, limits).admitted
    assert windows.settle("a", first.reservation, 100)  # it really used 100
    assert not windows.settle("a", first.reservation, 0)  # a second settle changes nothing
    second = windows.admit("a", 300, limits)
    assert second.admitted and second.tokens.remaining == 600


def test_a_request_larger_than_the_budget_waits_for_an_empty_window() -> None:
    clock = Clock()
    windows, limits = SlidingWindowLimiter(clock), RateLimitSettings(tokens_per_minute=100)
    assert windows.admit("a", 10, limits).admitted
    huge = windows.admit("a", 5000, limits)
    assert not huge.admitted and huge.retry_after_s == pytest.approx(WINDOW_S)
    clock.advance(WINDOW_S + 0.01)
    assert windows.admit("a", 5000, limits).admitted


def test_a_stale_settle_from_before_a_restart_never_touches_a_new_reservation() -> None:
    """A restarted limiter is a new instance: the old one's ids must match nothing of the new one,
    however many reservations either has made."""
    limits = RateLimitSettings(tokens_per_minute=100_000)
    before = SlidingWindowLimiter(Clock())
    old_ids = [before.admit("a", 500, limits).reservation for _ in range(50)]
    after = SlidingWindowLimiter(Clock())
    new_ids = [after.admit("a", 500, limits).reservation for _ in range(50)]
    assert not set(old_ids) & set(new_ids)
    assert len(set(old_ids) | set(new_ids)) == 100
    for stale in old_ids:
        assert not after.settle("a", stale, 0)
    assert after.admit("a", 0, limits).tokens.remaining == 100_000 - 50 * 500


def test_idle_identities_are_forgotten() -> None:
    clock = Clock()
    windows, limits = SlidingWindowLimiter(clock), RateLimitSettings(requests_per_minute=5)
    for i in range(2000):
        windows.admit(f"ip:10.0.{i // 256}.{i % 256}", 1, limits)
    assert windows.tracked_identities == 2000
    clock.advance(WINDOW_S / 2)
    windows.admit("ip:recent", 1, limits)
    clock.advance(WINDOW_S / 2 + 0.01)
    assert windows.tracked_identities == 1  # only the one admitted within the last minute
    assert windows.admit("ip:10.0.0.0", 1, limits).requests.remaining == 4  # a forgotten budget is whole
    refused = SlidingWindowLimiter(clock)
    for _ in range(3):
        refused.admit("x", 1, RateLimitSettings(requests_per_minute=1))
    assert refused.tracked_identities == 1  # refusals keep nothing


def test_concurrent_admissions_from_threads_never_exceed_the_limit(tiny_switch_interval: None) -> None:
    limits = RateLimitSettings(requests_per_minute=50, tokens_per_minute=10**9)
    for round_ in range(15):
        windows = SlidingWindowLimiter()
        admitted, errors = admit_from_threads(lambda: windows.admit("shared", 10, limits),
                                              lambda d: windows.settle("shared", d.reservation, 5))
        assert not errors, (round_, errors[:3])
        assert admitted == 50, (round_, admitted)


def test_admit_settle_and_expiry_race_from_threads_keep_the_books_exact(tiny_switch_interval: None) -> None:
    """Threads admit and settle for a few identities while time moves on and windows expire; at the
    end every identity's token sum is exactly the sum of what its window holds."""
    clock = Clock()
    windows = SlidingWindowLimiter(clock)
    limits = RateLimitSettings(requests_per_minute=40, tokens_per_minute=4000)
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                identity = f"key:{rng.randrange(4)}"
                decision = windows.admit(identity, rng.randrange(1, 200), limits)
                if decision.admitted and rng.random() < 0.8:
                    windows.settle(identity, decision.reservation, rng.randrange(0, 200))
                if decision.requests.remaining < 0 or decision.tokens.remaining < 0:
                    raise AssertionError(decision)
            except Exception as exc:  # noqa: BLE001 -- any failure is the finding
                errors.append(exc)
                return

    def time_passes() -> None:
        while not stop.is_set():
            clock.advance(0.37)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)] + [threading.Thread(target=time_passes)]
    for thread in threads:
        thread.start()
    stop.wait(3.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    for identity in windows._identities.values():  # the books themselves
        assert identity.tokens == sum(a.tokens for a in identity.admissions)
        assert len(identity.admissions) <= limits.requests_per_minute
        assert set(identity.by_reservation) <= {a.reservation for a in identity.admissions}
