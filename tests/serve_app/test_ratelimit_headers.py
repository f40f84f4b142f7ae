"""OpenAI's `x-ratelimit-*` headers from the RateLimiter's decision."""

from __future__ import annotations

import pytest

from serve_app.openai.ratelimit_headers import ratelimit_headers
from serve_app.stage_types import LimitState, RateDecision


@pytest.mark.parametrize(
    ("seconds", "written"),
    [(0.02, "20ms"), (0.9996, "999ms"), (1.0, "1s"), (6.4, "6s"), (59.4, "59s"), (59.7, "1m0s"), (60.0, "1m0s"),
     (119.6, "2m0s"), (125.0, "2m5s")],
)
def test_resets_are_written_as_openai_does_with_no_60_seconds(seconds: float, written: str) -> None:
    decision = RateDecision(True, "r", 0.0, LimitState(60, 0, seconds), None)
    assert ratelimit_headers(decision) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": written,
    }


def test_no_decision_no_headers() -> None:
    assert ratelimit_headers(None) == {}
