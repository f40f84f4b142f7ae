"""The ingress's view of the model stage's stream (deployments/ingress.py `_observed`), without a cluster:
a request's tokens go into the metrics once all its n choices have finished, and a stream left before
then is cancelled upstream, so every choice's batch row is freed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

from deployments.ingress import Ingress
from serve_app.stage_types import GenerationChunk

# (choice, its completion tokens so far, whether this is its last chunk): three choices, interleaved;
# choice 1 finishes first (at 2 tokens), then 0 (at 4), then 2 (at 3).
THREE_CHOICES = [(0, 1, False), (1, 1, False), (2, 1, False), (1, 2, True), (0, 2, False), (2, 2, False),
                 (0, 3, False), (0, 4, True), (2, 3, True)]
PROMPT = 20


class ModelStream:
    """A stand-in for Serve's streaming response: the planned chunks, then (if `then_wait`) a long wait;
    `cancel()` is recorded."""

    def __init__(self, plan: list[tuple[int, int, bool]], then_wait: bool = False) -> None:
        self.plan, self.then_wait, self.cancelled = plan, then_wait, False

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        for choice, tokens, last in self.plan:
            yield GenerationChunk("x", prompt_tokens=PROMPT, completion_tokens=tokens,
                                  finish_reason="stop" if last else None, choice=choice)
            await asyncio.sleep(0)
        if self.then_wait:
            await asyncio.sleep(3600)

    def cancel(self) -> None:
        self.cancelled = True


class Counter:
    def __init__(self) -> None:
        self.total = 0
        self.increments = 0

    def inc(self, value: float = 1.0) -> None:
        assert value > 0, "Ray's counters refuse increments that are not positive"
        self.total += value
        self.increments += 1


class Histogram:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


class Metrics:
    def __init__(self) -> None:
        self.prompt_tokens, self.completion_tokens = Counter(), Counter()
        self.ttft, self.inter_token = Histogram(), Histogram()


def ingress() -> SimpleNamespace:
    """What `_observed` reads of an Ingress: its metrics. (Not an instance: Serve's ASGI wrapper class
    has a coroutine `__del__` that warns when an instance is collected outside a replica.)"""
    return SimpleNamespace(_metrics=Metrics())


async def consume(
    replica: SimpleNamespace, stream: ModelStream, n: int, chunks: int | None = None
) -> list[GenerationChunk]:
    """Read `chunks` chunks (all when None) as the response does, then close the stream as a response
    that ends or a client that leaves does."""
    observed = Ingress.func_or_class._observed(replica, stream, 0.0, n)
    seen: list[GenerationChunk] = []
    try:
        async for chunk in observed:
            seen.append(chunk)
            if len(seen) == chunks:
                break
    finally:
        await observed.aclose()
    return seen


def test_n_choices_count_the_prompt_once_and_every_completion_once_all_have_finished() -> None:
    replica, stream = ingress(), ModelStream(THREE_CHOICES)
    seen = asyncio.run(consume(replica, stream, 3))
    assert len(seen) == len(THREE_CHOICES) and not stream.cancelled
    metrics = replica._metrics
    assert (metrics.prompt_tokens.total, metrics.prompt_tokens.increments) == (PROMPT, 1)
    assert (metrics.completion_tokens.total, metrics.completion_tokens.increments) == (4 + 2 + 3, 1)
    assert len(metrics.ttft.values) == 1 and len(metrics.inter_token.values) == len(THREE_CHOICES) - 1


def test_a_client_leaving_after_the_first_choice_finished_cancels_the_others() -> None:
    """Choice 1 has finished, 0 and 2 have not: the model stage is told to stop, and nothing is counted
    (a request's tokens count once it has finished, as with one choice)."""
    replica, stream = ingress(), ModelStream(THREE_CHOICES, then_wait=True)
    asyncio.run(consume(replica, stream, 3, chunks=5))
    assert stream.cancelled
    assert replica._metrics.prompt_tokens.increments == replica._metrics.completion_tokens.increments == 0


def test_a_stream_that_ends_before_every_choice_finished_is_cancelled() -> None:
    """The model stage's stream ends with choice 2 unfinished: it is cancelled, so no row stays behind."""
    replica, stream = ingress(), ModelStream(THREE_CHOICES[:-1])
    asyncio.run(consume(replica, stream, 3))
    assert stream.cancelled


def test_one_choice_finishing_at_its_first_token_is_counted_without_a_zero_increment() -> None:
    replica, stream = ingress(), ModelStream([(0, 0, True)])
    asyncio.run(consume(replica, stream, 1))
    assert not stream.cancelled
    assert (replica._metrics.prompt_tokens.total, replica._metrics.completion_tokens.increments) == (PROMPT, 0)

