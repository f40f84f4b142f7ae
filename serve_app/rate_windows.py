"""Sliding-window request and token budgets per identity: the logic behind the RateLimiter deployment.

A limit of N per minute admits at most N in any 60 seconds, with no burst at a window edge. Tokens
are reserved on admission (an estimate: prompt + max_tokens) and settled later with what the
request really used. Plain Python, no Ray: every public method holds one lock for its whole run,
so any number of threads (or event loops) may call it at once.

Reservation ids are random (uuid4), so an id from another instance, such as a limiter that has
since restarted, never matches a reservation of this one. An identity whose admissions have all
left the window is forgotten, so memory follows the traffic of the last minute, not every identity
ever seen.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.settings import RateLimitSettings
from serve_app.stage_types import LimitState, RateDecision

WINDOW_S = 60.0


@dataclass(slots=True)
class _Admission:
    at: float
    tokens: int
    reservation: str


class _Identity:
    """One identity's admissions inside the window, oldest first, and the sum of their tokens."""

    __slots__ = ("admissions", "by_reservation", "tokens")

    def __init__(self) -> None:
        self.admissions: deque[_Admission] = deque()
        self.by_reservation: dict[str, _Admission] = {}
        self.tokens = 0

    def expire(self, now: float) -> None:
        while self.admissions and self.admissions[0].at <= now - WINDOW_S:
            gone = self.admissions.popleft()
            self.tokens -= gone.tokens
            self.by_reservation.pop(gone.reservation, None)

    def requests_wait(self, limit: int, now: float) -> float:
        """Seconds until one more request fits under `limit` (0 when it fits now)."""
        over = len(self.admissions) + 1 - limit
        return 0.0 if over <= 0 else self.admissions[over - 1].at + WINDOW_S - now

    def tokens_wait(self, amount: int, limit: int, now: float) -> float:
        """Seconds until `amount` more tokens fit under `limit` (0 when they fit now)."""
        excess = self.tokens + amount - limit
        if excess <= 0:
            return 0.0
        for admission in self.admissions:
            excess -= admission.tokens
            if excess <= 0:
                return admission.at + WINDOW_S - now
        return WINDOW_S

    def state(self, limit: int, used: int, now: float) -> LimitState:
        reset = self.admissions[-1].at + WINDOW_S - now if self.admissions else 0.0
        return LimitState(limit, max(0, limit - used), max(0.0, reset))


class SlidingWindowLimiter:
    """Every identity's budgets; `admit` reserves, `settle` replaces a reservation by the real use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # Ordered by latest admission, so the identities that went idle are at the front.
        self._identities: OrderedDict[str, _Identity] = OrderedDict()

    @property
    def tracked_identities(self) -> int:
        with self._lock:
            self._forget_idle(self._clock())
            return len(self._identities)

    def admit(self, identity: str, tokens: int, limits: RateLimitSettings) -> RateDecision:
        """Admit and reserve, or refuse with the wait until the request would fit."""
        with self._lock:
            now = self._clock()
            self._forget_idle(now)
            known = self._identities.get(identity)
            current = known or _Identity()
            current.expire(now)
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            wait = 0.0
            if rpm is not None:
                wait = max(wait, current.requests_wait(rpm, now))
            if tpm is not None:
                # A request larger than the whole budget could never pass: it waits for an empty window.
                wait = max(wait, current.tokens_wait(min(tokens, tpm), tpm, now))
            reservation = None
            if wait == 0.0:
                reservation = uuid.uuid4().hex
                admission = _Admission(now, tokens, reservation)
                current.admissions.append(admission)
                current.by_reservation[reservation] = admission
                current.tokens += tokens
                self._identities[identity] = current
                self._identities.move_to_end(identity)
            return RateDecision(
                admitted=reservation is not None,
                reservation=reservation,
                retry_after_s=wait,
                requests=current.state(rpm, len(current.admissions), now) if rpm is not None else None,
                tokens=current.state(tpm, current.tokens, now) if tpm is not None else None,
            )

    def settle(self, identity: str, reservation: str, tokens_used: int) -> bool:
        """Replace a reservation's estimate by what the request really used, once.

        False when there is nothing to settle: the reservation left the window, was settled
        already, or was made by another instance (a limiter before a restart)."""
        with self._lock:
            now = self._clock()
            self._forget_idle(now)
            current = self._identities.get(identity)
            if current is None:
                return False
            current.expire(now)
            admission = current.by_reservation.pop(reservation, None)
            if admission is None:
                return False
            used = max(0, tokens_used)
            current.tokens += used - admission.tokens
            admission.tokens = used
            return True

    def _forget_idle(self, now: float) -> None:
        """Drop identities whose latest admission has left the window: their budgets are whole."""
        while self._identities:
            identity, oldest = next(iter(self._identities.items()))
            if oldest.admissions and oldest.admissions[-1].at > now - WINDOW_S:
                return
            del self._identities[identity]
