"""RateLimiter: one replica holding every client's request and token budget for the application.

Ingress replicas ask it before admitting a request, so a limit holds for the whole application
however many ingress replicas there are. Budgets are sliding windows over the last minute: a
limit of 60 requests per minute admits at most 60 in any 60 seconds, with no burst at a window
edge. Token budgets are reserved on admission (prompt estimate + max_tokens) and settled with the
real usage when the answer is done.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from ray import serve

from serve_app.settings import RateLimitSettings
from serve_app.stage_types import LimitState, RateDecision

WINDOW_S = 60.0


@dataclass
class _Window:
    """Entries (time, amount, id) inside the last minute, and their sum."""

    entries: deque = field(default_factory=deque)
    total: int = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            self.total -= self.entries.popleft()[1]

    def wait_for(self, amount: int, limit: int, now: float) -> float:
        """Seconds until `amount` more fits under `limit` (0 when it fits now)."""
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        for at, size, _ in self.entries:
            excess -= size
            if excess <= 0:
                return at + WINDOW_S - now
        return WINDOW_S

    def state(self, limit: int, now: float) -> LimitState:
        reset = self.entries[-1][0] + WINDOW_S - now if self.entries else 0.0
        return LimitState(limit, max(0, limit - self.total), max(0.0, reset))

    def add(self, now: float, amount: int, ident: int) -> None:
        self.entries.append((now, amount, ident))
        self.total += amount

    def settle(self, ident: int, amount: int) -> None:
        for i, (at, size, entry_id) in enumerate(self.entries):
            if entry_id == ident:
                self.entries[i] = (at, amount, entry_id)
                self.total += amount - size
                return


@serve.deployment
class RateLimiter:
    def __init__(self) -> None:
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}
        self._ids = itertools.count(1)

    def admit(self, client: str, tokens: int, limits: RateLimitSettings) -> RateDecision:
        """Admit and reserve, or refuse with the wait until the request would fit."""
        now = time.monotonic()
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        requests = self._window(self._requests, client, now)
        token_window = self._window(self._tokens, client, now)
        wait = 0.0
        if rpm is not None:
            wait = max(wait, requests.wait_for(1, rpm, now))
        if tpm is not None:
            # A request larger than the whole budget could never pass: charge it the full budget.
            wait = max(wait, token_window.wait_for(min(tokens, tpm), tpm, now))
        reservation = None
        if wait == 0.0:
            reservation = next(self._ids)
            requests.add(now, 1, reservation)
            token_window.add(now, tokens, reservation)
        return RateDecision(
            admitted=wait == 0.0,
            reservation=reservation,
            retry_after_s=wait,
            requests=requests.state(rpm, now) if rpm is not None else None,
            tokens=token_window.state(tpm, now) if tpm is not None else None,
        )

    def settle(self, client: str, reservation: int, tokens_used: int) -> None:
        """Replace a reservation's estimate by what the request really used."""
        window = self._tokens.get(client)
        if window is not None:
            window.settle(reservation, tokens_used)

    @staticmethod
    def _window(windows: dict[str, _Window], client: str, now: float) -> _Window:
        window = windows.setdefault(client, _Window())
        window.expire(now)
        return window
