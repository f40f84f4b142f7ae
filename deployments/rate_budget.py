"""The ingress's side of the rate limits: admission through the RateLimiter with a deadline, and one
settle per admitted request, whatever way the request ends.

- Admission waits at most `rate_limits.limiter_timeout_s`. A limiter that is dead, restarting or
  slow gives a 503 with Retry-After at once (fail closed), or with `rate_limits.fail_open` the
  request goes through unmetered; it never gives a 500 or a hang. (A slow limiter may still make
  the reservation of an admission that timed out; it then counts until it leaves the window.)
- Settling never waits and never fails the answer: `Budget.settle` is synchronous and hands the
  call to a background task of its own, so it also runs from the `finally` of a stream whose
  client went away (a cancelled scope, where any await would be cancelled too). A settle that
  fails is logged; the reservation's estimate then stays charged until it leaves the window.
- What is settled is what the request used: the prompt once plus each of its n choices' completion
  tokens, from the latest chunk of each (deployments/choice_tally.py), 0 when none was sent. It is
  settled when every choice has finished, or when the stream fails or is cut, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from deployments.choice_tally import ChoiceTally
from serve_app.errors import RateLimitError, ServiceUnavailableError
from serve_app.openai.auth import Principal
from serve_app.openai.ratelimit_headers import ratelimit_headers
from serve_app.settings import RateLimitSettings
from serve_app.stage_types import GenerationChunk, RateDecision

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

logger = logging.getLogger("ray.serve")

# A replacement limiter replica starts within seconds: when to come back after a 503.
LIMITER_RETRY_AFTER_S = 5.0
# A settle still unanswered after this long is dropped, so a dead limiter cannot pile up tasks.
SETTLE_TIMEOUT_S = 30.0
# A limiter outage is logged at most this often, not once per request.
WARN_EVERY_S = 10.0


class Budget:
    """One request's reservation: its `x-ratelimit-*` headers, and one settle with the tokens used."""

    def __init__(self, gate: RateLimitGate | None, principal: Principal | None, decision: RateDecision | None) -> None:
        self._gate = gate
        self._principal = principal
        self._reservation = decision.reservation if decision is not None else None
        self._used = 0
        self.headers = ratelimit_headers(decision)

    @classmethod
    def unmetered(cls) -> Budget:
        return cls(None, None, None)

    async def metered(self, chunks: AsyncIterator[GenerationChunk], n: int) -> AsyncIterator[GenerationChunk]:
        """`chunks` of a request of `n` choices, counted as they pass; settled once every choice has
        finished, or when the stream is cut."""
        tally = ChoiceTally(n)
        try:
            async for chunk in chunks:
                tally.add(chunk)
                self._used = tally.usage().total_tokens
                if chunk.finish_reason is not None and tally.finished:
                    self.settle()
                yield chunk
        finally:
            self.settle()  # failed, cancelled, or closed by a client that went away

    def settle(self) -> None:
        """Settle the reservation with what was recorded; later calls do nothing. Never waits."""
        if self._gate is None or self._principal is None or self._reservation is None:
            return
        reservation, self._reservation = self._reservation, None
        self._gate.settle_soon(self._principal.name, reservation, self._used)


class RateLimitGate:
    """Admission and settling against the RateLimiter deployment (None: no limits configured)."""

    def __init__(self, limiter: DeploymentHandle | None, settings: RateLimitSettings) -> None:
        self._limiter = limiter
        self._settings = settings
        self._settling: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self._warned_at = float("-inf")

    async def admit(self, principal: Principal, tokens: int) -> Budget:
        """A budget for the request; RateLimitError (429) when over a limit, ServiceUnavailableError
        (503) when the limiter cannot say within the deadline and the gate fails closed."""
        if self._limiter is None or not principal.limits.enabled:
            return Budget.unmetered()
        try:
            decision: RateDecision = await asyncio.wait_for(
                self._limiter.admit.remote(principal.name, tokens, principal.limits),
                self._settings.limiter_timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 -- timed out, dead, restarting, unreachable: no answer
            return self._without_limiter(exc)
        if not decision.admitted:
            error = RateLimitError(
                f"Rate limit reached for {principal.name.split(':', 1)[0]} requests. "
                f"Please try again in {decision.retry_after_s:.1f}s.",
                retry_after_s=decision.retry_after_s,
            )
            error.extra_headers = ratelimit_headers(decision)
            raise error
        return Budget(self, principal, decision)

    def settle_soon(self, client: str, reservation: str, tokens_used: int) -> None:
        """Send the settle from a task of its own, outside the request's (maybe cancelled) scope."""
        try:
            task = asyncio.get_running_loop().create_task(self._settle(client, reservation, tokens_used))
        except RuntimeError:  # no event loop in this thread: nothing can be sent from here
            logger.warning("A rate-limit reservation could not be settled outside an event loop.")
            return
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, client: str, reservation: str, tokens_used: int) -> None:
        assert self._limiter is not None
        try:
            await asyncio.wait_for(self._limiter.settle.remote(client, reservation, tokens_used), SETTLE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 -- whatever failed, the answer is already given
            self._warn("could not settle a reservation (its estimate stays charged for the window)", exc)

    def _without_limiter(self, exc: Exception) -> Budget:
        if self._settings.fail_open:
            self._warn("admitting requests unmetered (rate_limits.fail_open)", exc)
            return Budget.unmetered()
        self._warn("answering 503", exc)
        raise ServiceUnavailableError(
            "Rate limits cannot be checked right now; try again shortly.", retry_after_s=LIMITER_RETRY_AFTER_S
        ) from exc

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            logger.warning("The RateLimiter did not answer (%s: %s): %s.", type(exc).__name__, exc, what)
