"""OpenAI's `x-ratelimit-*` response headers, from the RateLimiter's decision."""

from __future__ import annotations

from serve_app.stage_types import LimitState, RateDecision

RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")
]


def _duration(seconds: float) -> str:
    """OpenAI writes resets as '1s', '6m0s', '20ms'."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    # Whole seconds first, so 59.7 s reads '1m0s', never '60s'.
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def ratelimit_headers(decision: RateDecision | None) -> dict[str, str]:
    if decision is None:
        return {}
    headers: dict[str, str] = {}
    for kind, state in (("requests", decision.requests), ("tokens", decision.tokens)):
        if isinstance(state, LimitState):
            headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = _duration(state.reset_s)
    return headers
