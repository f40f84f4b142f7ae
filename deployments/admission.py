"""Admission control for the model stage, counted in tokens and images rather than requests.

A request's cost is known before it is queued: its prompt tokens (image tokens included, from the
preprocessed patch grids) plus its `max_tokens`. The stage holds a budget of tokens in flight (the
KV cache it can afford) and of images per batch. A request that could never fit is refused with a
400 naming the limit; one that does not fit now waits, boundedly, for running requests to finish,
and is refused with 503 and Retry-After if it still does not fit. Memory is never overcommitted,
so large or many images meet a clear refusal instead of an out-of-memory crash.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from serve_app.errors import InvalidRequestError, ServiceUnavailableError


@dataclass(frozen=True)
class Cost:
    tokens: int
    images: int


class AdmissionBudget:
    def __init__(self, max_tokens: int | None, max_images: int | None) -> None:
        self.max_tokens = max_tokens
        self.max_images = max_images
        self.tokens_in_use = 0
        self.images_in_use = 0
        self._changed = asyncio.Condition()

    def resize(self, max_tokens: int | None, max_images: int | None) -> None:
        self.max_tokens, self.max_images = max_tokens, max_images

    def check_possible(self, cost: Cost) -> None:
        """400 for a request that exceeds the whole budget: waiting would never help."""
        if self.max_tokens is not None and cost.tokens > self.max_tokens:
            raise InvalidRequestError(
                f"This request needs {cost.tokens} tokens of model memory (prompt with image tokens plus "
                f"max_tokens), more than the model stage's budget of {self.max_tokens}. Send smaller or fewer "
                "images (e.g. image_url.detail='low') or lower max_tokens.",
                param="messages",
                code="request_too_large_for_model",
            )
        if self.max_images is not None and cost.images > self.max_images:
            raise InvalidRequestError(
                f"This request has {cost.images} images; the model stage takes at most {self.max_images} at once.",
                param="messages",
                code="too_many_images",
            )

    def _fits(self, cost: Cost) -> bool:
        tokens_ok = self.max_tokens is None or self.tokens_in_use + cost.tokens <= self.max_tokens
        images_ok = self.max_images is None or self.images_in_use + cost.images <= self.max_images
        return tokens_ok and images_ok

    async def acquire(self, cost: Cost, timeout_s: float) -> None:
        self.check_possible(cost)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._fits(cost)), timeout_s)
            except TimeoutError:
                raise ServiceUnavailableError(
                    "The model is at capacity for a request of this size; try again shortly.",
                    code="model_at_capacity",
                    retry_after_s=max(1.0, timeout_s),
                ) from None
            self.tokens_in_use += cost.tokens
            self.images_in_use += cost.images

    async def release(self, cost: Cost) -> None:
        async with self._changed:
            self.tokens_in_use -= cost.tokens
            self.images_in_use -= cost.images
            self._changed.notify_all()
