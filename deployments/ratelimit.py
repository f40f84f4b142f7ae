"""RateLimiter: one replica holding every client's request and token budget for the application.

Ingress replicas ask it before admitting a request, so a limit holds for the whole application
however many ingress replicas there are. The budgets themselves are serve_app/rate_windows.py's
sliding windows; this deployment only puts them behind a handle.

Budgets live in the replica's memory: a restarted limiter starts with every budget whole. Its
reservation ids are random, so a settle meant for the replica before the restart matches nothing.
While it is down the ingress answers 503 (or admits unmetered with `rate_limits.fail_open`).
"""

from __future__ import annotations

from ray import serve

from serve_app.rate_windows import SlidingWindowLimiter
from serve_app.settings import RateLimitSettings
from serve_app.stage_types import RateDecision


@serve.deployment
class RateLimiter:
    # The methods are async so that Serve runs them on the replica's event loop, one at a time,
    # never in its thread pool; the windows take a lock of their own as well.

    def __init__(self) -> None:
        self._windows = SlidingWindowLimiter()

    async def admit(self, client: str, tokens: int, limits: RateLimitSettings) -> RateDecision:
        """Admit and reserve, or refuse with the wait until the request would fit."""
        return self._windows.admit(client, tokens, limits)

    async def settle(self, client: str, reservation: str, tokens_used: int) -> bool:
        """Replace a reservation's estimate by what the request really used; False if none matched."""
        return self._windows.settle(client, reservation, tokens_used)
